"""rdml-dist: Rényi Divergence Deep Mutual Learning for cohorts of students, in one process or on Ray.

The library surface: the divergences and the batched cohort mimicry computation (usable in any
training loop), the config loader, the transport-free coordinator core and student, and
:func:`train_cohort`, which runs an experiment with the local or the Ray engine. No top-level name
shadows a module of the package: ``rdml_dist.divergence`` is the module (its ``divergence()``
function picks a divergence by name).

The names load on first use, so that importing one module of the package (``rdml_dist.config``
for the schema, ``rdml_dist.cli`` for ``--help``) does not load torch's model and data code.
"""

from rdml_dist.lazy import lazy_names

__version__ = "0.1.0"

_HOMES = {
    "ExperimentConfig": "rdml_dist.config",
    "load_config": "rdml_dist.config",
    "parse_config": "rdml_dist.config",
    "CohortCoordinator": "rdml_dist.coordinator_core.coordinator",
    "DIVERGENCES": "rdml_dist.divergence",
    "TARGET_MODES": "rdml_dist.divergence",
    "MimicryResult": "rdml_dist.divergence",
    "js_divergence": "rdml_dist.divergence",
    "kl_divergence": "rdml_dist.divergence",
    "mimicry_gradients": "rdml_dist.divergence",
    "mse_logits": "rdml_dist.divergence",
    "renyi_divergence": "rdml_dist.divergence",
    "train_cohort": "rdml_dist.engines",
    "ConfigError": "rdml_dist.errors",
    "FrameRejected": "rdml_dist.errors",
    "Student": "rdml_dist.students.student",
}

__all__ = sorted(_HOMES)


__getattr__ = lazy_names(__name__, _HOMES, globals())
