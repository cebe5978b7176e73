"""Validation of a DataSpec without loading anything, so a bad config fails before launch."""

from pathlib import Path

from rdml_dist.data.registry import SOURCES, Source
from rdml_dist.data.spec import DataSpec
from rdml_dist.errors import ConfigError
from rdml_dist.factory import is_factory_reference, load_factory

DOWNLOADABLE = [name for name, source in SOURCES.items() if source.downloadable]


def _check_fractions(spec: DataSpec, field: str) -> None:
    for name, value, zero_allowed in (
        ("val_fraction", spec.val_fraction, False),
        ("label_noise", spec.label_noise, True),
        ("unlabeled_fraction", spec.unlabeled_fraction, True),
    ):
        in_range = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
        if not in_range or (value == 0 and not zero_allowed):
            allowed = "[0, 1)" if zero_allowed else "(0, 1)"
            raise ConfigError(f"{field}.{name}", f"must be a number in {allowed}, got {value!r}")


def _check_root(spec: DataSpec, source: Source, field: str) -> None:
    """Root given, and (unless downloading) holding every file the loader will open."""
    if spec.download and not source.downloadable:
        raise ConfigError(f"{field}.download", f"{spec.name} cannot be downloaded; only {', '.join(DOWNLOADABLE)} can")
    hint = (
        f"set {field}.download: true to fetch {spec.name}, or fix {field}.root"
        if source.downloadable
        else f"fix {field}.root"
    )
    if spec.root is None:
        raise ConfigError(f"{field}.root", f"{spec.name} needs a data folder; {hint}")
    if spec.download:
        return
    root = Path(spec.root)
    missing = [path for path in [root, *source.files(root)] if not path.exists()]
    if missing:
        raise ConfigError(f"{field}.root", f"{missing[0]} not found; {hint}")


def _check_loading(spec: DataSpec, field: str) -> None:
    """The batch transform hook, streaming limits and worker count."""
    if spec.transform is not None:
        load_factory(spec.transform, f"{field}.transform")
        if spec.augment:
            raise ConfigError(f"{field}.augment", "data.transform replaces the built-in augmentation; leave data.augment unset")
    if isinstance(spec.workers, bool) or not isinstance(spec.workers, int) or spec.workers < 0:
        raise ConfigError(f"{field}.workers", f"must be an integer >= 0, got {spec.workers!r}")
    if isinstance(spec.memory_limit_mb, bool) or not isinstance(spec.memory_limit_mb, (int, float)) or spec.memory_limit_mb < 0:
        raise ConfigError(f"{field}.memory_limit_mb", f"must be a number >= 0, got {spec.memory_limit_mb!r}")


def check_data_spec(spec: DataSpec, field: str = "data") -> None:
    """Raise ConfigError naming ``<field>.<key>`` for anything ``load_dataset`` would trip on.

    Checks: a known name or importable factory, fractions in range, options and image size only
    where used, and the files under the root when not downloading.
    """
    _check_fractions(spec, field)
    if spec.image_size is not None:
        if spec.name != "imagefolder":
            raise ConfigError(f"{field}.image_size", f"only used by imagefolder, not {spec.name}")
        if isinstance(spec.image_size, bool) or not isinstance(spec.image_size, int) or spec.image_size < 1:
            raise ConfigError(f"{field}.image_size", f"must be a positive integer, got {spec.image_size!r}")
    _check_loading(spec, field)
    if is_factory_reference(spec.name):
        load_factory(spec.name, f"{field}.name")
        return
    source = SOURCES.get(spec.name)
    if source is None:
        allowed = ", ".join(SOURCES)
        raise ConfigError(f"{field}.name", f"unknown data set {spec.name!r}; allowed: {allowed}, or 'package.module:function'")
    if spec.options:
        raise ConfigError(f"{field}.options", f"only used by 'package.module:function' factories, not {spec.name}")
    if source.files is not None:
        _check_root(spec, source, field)
