"""Engines run a validated experiment and fill a run directory: ``local`` (one process) and ``ray``."""
