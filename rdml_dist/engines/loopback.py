"""Keep a locally started Ray on 127.0.0.1.

On Linux Ray replaces 127.0.0.1 with the machine's external address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set, and it reads that variable once, when ``ray``
is first imported. So this must run before anything imports ray; it only sets variables the
user has not set.
"""

import os


def keep_local_ray_on_loopback() -> None:
    """Make a Ray started by this process bind to loopback and send no usage statistics."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
