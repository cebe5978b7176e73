"""Sweeps on Ray Tune: every trial is one whole cohort, trained by the same loop as ``rdml-dist train``.

``sweep`` reads and checks a sweep file without Ray Tune; ``runner`` (which needs the ``tune``
extra) runs it and ``results`` turns Tune's results into a table, ``best.yaml`` and plots.
"""

TUNE_MISSING = 'tune needs Ray Tune, which is not installed: pip install "rdml-dist[tune]" (or "ray[tune]==2.60.*")'


def tune_available() -> bool:
    """Whether ``ray.tune`` imports (its pandas/pyarrow/tensorboardX come with the ``tune`` extra)."""
    try:
        import ray.tune  # noqa: F401
    except ImportError:
        return False
    return True
