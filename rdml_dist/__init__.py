"""rdml-dist: Rényi Divergence Deep Mutual Learning for cohorts of students, in one process or on Ray.

The library surface: the divergences and the batched cohort mimicry computation (usable in any
training loop), the config loader, the transport-free coordinator core and student, and
:func:`train_cohort`, which runs an experiment with the local or the Ray engine. No top-level name
shadows a module of the package: ``rdml_dist.divergence`` is the module (its ``divergence()``
function picks a divergence by name).
"""

from rdml_dist.config import ExperimentConfig, load_config, parse_config
from rdml_dist.coordinator import CohortCoordinator
from rdml_dist.divergence import (
    DIVERGENCES,
    TARGET_MODES,
    MimicryResult,
    js_divergence,
    kl_divergence,
    mimicry_gradients,
    mse_logits,
    renyi_divergence,
)
from rdml_dist.engines import train_cohort
from rdml_dist.errors import ConfigError, FrameRejected
from rdml_dist.student import Student

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCES",
    "TARGET_MODES",
    "CohortCoordinator",
    "ConfigError",
    "ExperimentConfig",
    "FrameRejected",
    "MimicryResult",
    "Student",
    "js_divergence",
    "kl_divergence",
    "load_config",
    "mimicry_gradients",
    "mse_logits",
    "parse_config",
    "renyi_divergence",
    "train_cohort",
]
