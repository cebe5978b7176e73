"""Generate the Python code of the wire contract from ``protos/`` (run: ``python -m rdml_dist.rpc.codegen``).

The generated modules are committed, so installing the package needs no protobuf compiler; a
test regenerates them with the pinned ``grpcio-tools`` and fails on any difference. protoc
writes absolute imports (``from rdml.v1 import …``); they are rewritten to this package's path
so that the code imports without touching ``sys.path``.
"""

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
GENERATED = Path(__file__).resolve().parent / "generated"
PROTO_FILES = ("rdml/v1/cohort.proto",)
PACKAGE_PREFIX = "rdml_dist.rpc.generated."


def generate(output: Path) -> list[Path]:
    """Compile every proto into ``output`` (``_pb2.py``, ``_pb2.pyi``, ``_pb2_grpc.py``); returns the files written."""
    from grpc_tools import protoc  # a development dependency (the "test" extra), not a runtime one

    include = Path(protoc.__file__).parent / "_proto"
    arguments = [
        "protoc", f"-I{PROTO_ROOT}", f"-I{include}",
        f"--python_out={output}", f"--pyi_out={output}", f"--grpc_python_out={output}", *PROTO_FILES,
    ]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTO_FILES)}")
    written = sorted(path for path in output.rglob("*_pb2*.py*"))
    for path in written:
        path.write_text(_package_imports(path.read_text()))
    return written


def _package_imports(source: str) -> str:
    return "\n".join(
        line.replace("from rdml.", f"from {PACKAGE_PREFIX}rdml.", 1) if line.startswith("from rdml.") else line
        for line in source.splitlines()
    ) + "\n"


def differences(committed: Path = GENERATED) -> list[str]:
    """Generated files that differ from (or are missing in) ``committed``."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        changed = []
        for path in fresh:
            relative = path.relative_to(scratch)
            target = committed / relative
            if not target.exists() or target.read_text() != path.read_text():
                changed.append(str(relative))
        return changed


def main() -> int:
    written = generate(GENERATED)
    print("\n".join(str(path.relative_to(GENERATED.parent)) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
