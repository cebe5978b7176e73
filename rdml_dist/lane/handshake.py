"""How a student proves on the frame lane who it is, without any secret crossing the wire.

The driver draws one secret per run and keeps it, and gives each student only its own key,
``HMAC(secret, name)``, through Ray. The coordinator's end opens every connection with a fresh
random challenge; the student answers with its name and ``HMAC(key, challenge)``. The coordinator
derives the key of the name claimed and compares in constant time. A proof is good for one
challenge only, and a key for one name only: a student cannot send frames in another's name, and
a recorded handshake cannot be replayed.
"""

import hashlib
import hmac
import secrets

HELLO_TIMEOUT_S = 10.0  # a connection that has not proved itself by then is closed
MAX_PENDING_HELLOS = 64  # unauthenticated connections held at once; more are closed at once
_KEY_LABEL = b"rdml-dist frame lane student key\0"
_PROOF_LABEL = b"rdml-dist frame lane hello\0"


def new_run_secret() -> str:
    return secrets.token_hex(32)


def new_challenge() -> str:
    return secrets.token_hex(32)


def student_key(run_secret: str, student: str) -> str:
    """The one student's lane key: what the driver hands that student, and what the coordinator derives again."""
    return hmac.new(run_secret.encode(), _KEY_LABEL + student.encode(), hashlib.sha256).hexdigest()


def proof(key: str, challenge: str, student: str) -> str:
    """The answer to one challenge, bound to the name it is given for."""
    return hmac.new(key.encode(), _PROOF_LABEL + challenge.encode() + b"\0" + student.encode(), hashlib.sha256).hexdigest()


def proves(run_secret: str, challenge: str, student: str, presented: str) -> bool:
    """Whether ``presented`` answers ``challenge`` for ``student`` under this run's secret (constant time)."""
    return hmac.compare_digest(proof(student_key(run_secret, student), challenge, student).encode(), presented.encode())
