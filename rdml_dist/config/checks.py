"""The checks a schema cannot make: model names or factories exist and accept their options, the divergence is
one, data is where it is said to be.

They import the model and data code, so they do it here, inside the functions, only when a check runs.
"""

from typing import TYPE_CHECKING, Any

from rdml_dist.config.schema import ExperimentConfig
from rdml_dist.errors import ConfigError

if TYPE_CHECKING:
    from rdml_dist.data.spec import DataSpec


def check_resources(config: ExperimentConfig) -> None:
    """Checks that need imports or the file system: model names/factories and the divergence exist, data is where it is said to be.

    Every student and the data are checked, and all their problems reported together.
    """
    from rdml_dist.data.check import check_data_spec

    errors = model_problems([(student.model, student.options) for student in config.students])
    errors += divergence_problems(config.mimicry.divergence)
    try:
        check_data_spec(data_spec(config), field="data")
    except ConfigError as error:
        errors.append(error)
    if errors:
        raise ConfigError.combine(errors)


def model_problems(students: list[tuple[Any, Any]]) -> list[ConfigError]:
    """The problems of each student's model reference and options (checked without building anything)."""
    from rdml_dist.models import check_model_name

    errors = []
    for index, (model, options) in enumerate(students):
        if not isinstance(model, str) or not isinstance(options, dict):
            continue  # a type problem, which validation reports
        try:
            check_model_name(model, field=f"students.{index}.model", options=options)
        except ConfigError as error:
            errors.append(error)
    return errors


def divergence_problems(name: str) -> list[ConfigError]:
    """The problem of ``mimicry.divergence``: not a registered name, or a reference that is no Divergence."""
    from rdml_dist.divergence import resolve_divergence

    try:
        resolve_divergence(name, field="mimicry.divergence")
    except ConfigError as error:
        return [error]
    return []


def data_spec(config: ExperimentConfig) -> "DataSpec":
    """The data layer's plain description of ``config.data``."""
    from rdml_dist.data.spec import DataSpec

    return DataSpec(**config.data.model_dump())
