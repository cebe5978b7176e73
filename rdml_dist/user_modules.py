"""Make a user's own modules importable: those beside the config file and in the working directory.

Factories such as ``my_models:build`` usually live next to the experiment's YAML file. The console
script puts neither that directory nor the working directory on ``sys.path``, and the students of a
local Ray inherit ``PYTHONPATH`` from the driver: both are extended here, before the config is checked.
"""

import os
import sys
from pathlib import Path


def make_user_modules_importable(config_path: str | None) -> list[str]:
    """Put the config file's directory and the working directory first on the import path; returns them."""
    directories = [str(Path(config_path).resolve().parent)] if config_path else []
    directories.append(os.getcwd())
    directories = list(dict.fromkeys(directories))
    for directory in reversed(directories):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*directories, *inherited]))
    return directories
