"""The plain description of which data set to load; the config layer builds it."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataSpec:
    """Which data set to load and how to alter its training labels.

    ``name`` is a built-in name (see ``rdml_dist.data.registry.SOURCES``) or a
    ``package.module:function`` factory called with ``options`` as keyword arguments.
    """

    name: str
    root: str | None = None
    download: bool = False
    val_fraction: float = 0.2
    label_noise: float = 0.0
    unlabeled_fraction: float = 0.0
    augment: bool | None = None
    image_size: int | None = None
    transform: str | None = None
    memory_limit_mb: float = 2048.0
    workers: int = 2
    options: dict[str, Any] = field(default_factory=dict)
