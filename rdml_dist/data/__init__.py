"""Data sets (in memory or streamed from a map-style Dataset), and the batch plan every student derives on its own.

Each student process loads its data itself; identical seeds give identical splits, label
corruption, batch order and augmentation, and ``indices_hash`` lets the coordinator check that.
"""

from rdml_dist.data.batch_plan import augment_seed, batch_plan, indices_hash
from rdml_dist.data.check import check_data_spec
from rdml_dist.data.fingerprint import data_fingerprint
from rdml_dist.data.loader import load_dataset
from rdml_dist.data.registry import SOURCES
from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, Split, TensorSplit
from rdml_dist.data.streamed import StreamedSplit

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
