"""The run's records, beside the engines: what a run leaves in its directory and how it is written.

``run_directory`` (results, progress, the run's one writer), ``step_log`` (the per-step log in parts),
``epoch_totals`` and ``run_summary`` (what an epoch and a run add up to), ``checkpoints`` (complete-or-absent
cohort checkpoints), ``run_lease`` (one writer per run), ``storage`` (local paths and object stores through
fsspec), ``plots`` and ``tensorboard_events`` (what people look at). No record imports an engine, a transport or
the coordinator's core (``tests/unit/test_import_structure.py``).
"""
