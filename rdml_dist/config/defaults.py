"""What a client of the cohort service needs of ``rpc`` when it has no config: plain defaults, no pydantic.

``rdml-dist status`` uses them, so it starts without building the schema; :class:`RpcConfig` takes its
defaults of these fields from here, so they are stated once.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RpcClientDefaults:
    """The fields of ``RpcConfig`` a client reads: the message limit and where the token comes from."""

    max_message_mb: int = 256
    token: str | None = None
    token_env: str = "RDML_RPC_TOKEN"


RPC_CLIENT = RpcClientDefaults()
