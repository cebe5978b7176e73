"""The observers every run has, whatever starts it (``rdml-dist train``, ``--resume``, a Ray Tune trial):
TensorBoard events under ``{run_dir}/tensorboard/`` and the plots under ``{run_dir}/plots/``."""

from collections.abc import Iterator
from contextlib import contextmanager

from rdml_dist.engines.loop import RunObserver
from rdml_dist.engines.session import RunSession
from rdml_dist.run_records.plots import FinalPlots
from rdml_dist.run_records.tensorboard_events import TensorBoardObserver


@contextmanager
def standard_observers(session: RunSession) -> Iterator[list[RunObserver]]:
    """TensorBoard and the final plots for ``session``'s run; the event file is closed (and uploaded) afterwards."""
    tensorboard = TensorBoardObserver(session.storage, list(session.run.epochs))  # a copy: the run appends to its own
    try:
        yield [tensorboard, FinalPlots(session.storage, session.config.training.epochs)]
    finally:
        tensorboard.close()
