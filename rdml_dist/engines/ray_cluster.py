"""Start a private local Ray or join an existing cluster, and say which.

``ray.init()`` without an address attaches to whatever cluster the machine's current-cluster
file names (or waits on it when that cluster is gone), so a plain ``rdml-dist train`` asks for
``address="local"``: a new local instance, always. Joining happens only when the user names a
cluster (``--address`` / ``runtime.ray.address``, or ``RAY_ADDRESS`` as set inside a Ray job),
and a joined cluster's resources are never overridden.
"""

import math
import os
import socket
from dataclasses import dataclass

import ray

from rdml_dist.errors import ClusterError

ADDRESS_ENVIRONMENT = "RAY_ADDRESS"
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Connection:
    """How this process reached Ray: ``started`` is True when it owns (and must stop) a local instance."""

    started: bool
    description: str


def requested_address(configured: str | None) -> str | None:
    """The cluster the user asked for: the config/CLI address, else ``RAY_ADDRESS``, else None (start locally)."""
    if configured:
        return configured
    from_environment = os.environ.get(ADDRESS_ENVIRONMENT, "").strip()
    return from_environment or None


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when nothing accepts TCP connections at ``HOST:PORT`` (or ``ray://HOST:PORT``).

    Ray itself retries an unreachable GCS for a long time before it gives up.
    """
    target = address.removeprefix("ray://")
    if "://" in target:
        return
    host, separator, port = target.rpartition(":")
    if not separator or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({error.strerror or error}); start one with "
            "`ray start --head`, check the address, or leave --address out to start a local Ray"
        ) from None


def connect(address: str | None, cpus_needed: float) -> Connection:
    """Join the requested cluster, or start a private local Ray with at least ``cpus_needed`` logical CPUs.

    A local Ray's workers get the driver's working directory on their path, so
    ``package.module:function`` factories next to the config import in the actors. Whether it
    stays on loopback is decided when ray is imported: see
    :func:`rdml_dist.engines.loopback.keep_local_ray_on_loopback`.
    """
    if ray.is_initialized():  # a session this process already opened (tests, notebooks) is used as it is
        return Connection(False, "using the Ray session this process already opened")
    target = requested_address(address)
    if target is not None:
        probe(_resolve_auto(target))
        try:
            ray.init(address=target, log_to_driver=True)  # a job's own runtime_env (working_dir) applies
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ClusterError(f"cannot join the Ray cluster at {target}: {_first_line(error)}{_auth_hint()}") from None
        return Connection(False, f"joined the Ray cluster at {target}")
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}}
    context = ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    return Connection(True, f"started a local Ray at {context.address_info['gcs_address']} with {cpus} CPUs")


def _resolve_auto(address: str) -> str:
    """``auto`` means the cluster named by this machine's current-cluster file; find it so it can be probed."""
    if address != "auto":
        return address
    try:
        return ray._private.services.get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise ClusterError("--address auto: no Ray cluster runs on this machine (start one with `ray start --head`)") from None


def _auth_hint() -> str:
    """Ray 2.60 clusters require a token by default; a client without ``RAY_AUTH_MODE=token`` is refused."""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return ""
    return (" (if the cluster uses token authentication, the default in Ray 2.60, set RAY_AUTH_MODE=token "
            "and provide the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
