"""A module of ``rdml_dist`` as it was at an earlier commit, imported under another name, so a benchmark can
measure the old code and the current one side by side in one run."""

import importlib.util
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

REPOSITORY = Path(__file__).resolve().parent.parent


def module_at(commit: str, path: str, name: str) -> ModuleType:
    """``path`` (relative to the repository) at ``commit``, imported as module ``name``; git must be there."""
    source = subprocess.run(["git", "-C", str(REPOSITORY), "show", f"{commit}:{path}"],
                            capture_output=True, text=True, check=True).stdout
    file = Path(tempfile.mkdtemp(prefix=f"{name}-")) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
