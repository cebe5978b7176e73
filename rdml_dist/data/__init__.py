"""Data sets (in memory or streamed from a map-style Dataset), and the batch plan every student derives on its own.

Each student process loads its data itself; identical seeds give identical splits, label
corruption, batch order and augmentation, and ``indices_hash`` lets the coordinator check that.
The other names load on first use: the batch plan and the spec do not load the data sets' libraries
(torchvision, scikit-learn).
"""

from rdml_dist.data.batch_plan import augment_seed, batch_plan, indices_hash  # light, and batch_plan names a module too
from rdml_dist.lazy import lazy_names

_HOMES = {
    "check_data_spec": "rdml_dist.data.check",
    "data_fingerprint": "rdml_dist.data.fingerprint",
    "load_dataset": "rdml_dist.data.loader",
    "SOURCES": "rdml_dist.data.registry",
    "DataSpec": "rdml_dist.data.spec",
    "Dataset": "rdml_dist.data.split",
    "Split": "rdml_dist.data.split",
    "TensorSplit": "rdml_dist.data.split",
    "StreamedSplit": "rdml_dist.data.streamed",
}

__all__ = [
    "SOURCES",
    "DataSpec",
    "Dataset",
    "Split",
    "StreamedSplit",
    "TensorSplit",
    "augment_seed",
    "batch_plan",
    "check_data_spec",
    "data_fingerprint",
    "indices_hash",
    "load_dataset",
]

__getattr__ = lazy_names(__name__, _HOMES, globals())
