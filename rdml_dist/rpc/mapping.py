"""The gRPC messages from the dataclasses of :mod:`rdml_dist.messages`, field by field and by name.

The dataclasses are the one description of each message: the frame lane sends their fields
(:func:`~rdml_dist.messages.scalar_fields`), Ray pickles them, and here each becomes its ``rdml.v1``
message and back. A set field the proto lacks fails at once (protobuf raises ``ValueError``); a field
either side lacks is otherwise left out (a request's session id, sequential updates' ``refresh``), so
``tests/unit/test_message_mapping.py`` checks every pair field by field and round-trips each.
"""

from typing import Any, TypeVar

from google.protobuf.message import Message

from rdml_dist.messages import StudentInfo, from_fields, scalar_fields

P = TypeVar("P", bound=Message)
M = TypeVar("M")

# where a proto names a field otherwise (a request names its sender ``student``, as every other request does)
PROTO_NAMES: dict[type, dict[str, str]] = {StudentInfo: {"name": "student"}}


def to_proto(proto: type[P], message: Any, leave_out: tuple[str, ...] = (), **given: Any) -> P:
    """``message`` as a ``proto``: its scalar fields (a nested message as its submessage, None left unset), minus
    ``leave_out``, plus ``given`` (its tensors, encoded; a session id)."""
    names = PROTO_NAMES.get(type(message), {})
    values = {names.get(name, name): value for name, value in scalar_fields(message, leave_out).items() if value is not None}
    return proto(**values, **given)


def from_proto(kind: type[M], message: Message, **given: Any) -> M:
    """A ``kind`` from ``message``'s fields (an unset submessage is None; fields ``kind`` lacks, a session id, are left
    out) plus ``given`` (its tensors, decoded, which are never read here)."""
    names = {proto_name: name for name, proto_name in PROTO_NAMES.get(kind, {}).items()}
    named: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None:
            named[names.get(field.name, field.name)] = getattr(message, field.name)
        elif field.name not in given and message.HasField(field.name):
            nested = getattr(message, field.name)
            named[names.get(field.name, field.name)] = {item.name: getattr(nested, item.name) for item in field.message_type.fields}
    return from_fields(kind, named, **given)
