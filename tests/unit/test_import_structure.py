"""The package's import structure: rooms that import only downward, no cycles, and the light modules stay light (no
torchvision, scikit-learn or torch)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import rdml_dist

PACKAGE = Path(rdml_dist.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py") if "generated" not in path.parts}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every package module ``path`` imports, anywhere in the file (module level, functions, TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return [*path[path.index(imported):], imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_type_checking_blocks() -> None:
    graph = import_graph()
    assert "rdml_dist.engines.failure_policy" in graph["rdml_dist.cli"]  # inside a command function
    assert "rdml_dist.coordinator_core.barrier" in graph["rdml_dist.rpc.status"]  # under TYPE_CHECKING
    assert "rdml_dist.messages.reasons" in graph["rdml_dist.errors"]


def test_no_import_cycle_in_the_package() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# The house read top-down as the data flows: each room imports itself and the rooms below it, never one above;
# the run's records stand beside the rooms (any room may write them, they import no room), and the shared
# vocabulary lies under everything. Names are the first part of a module's name below ``rdml_dist``.
ROOMS = [
    ("entry points", {"cli", "tune"}),
    ("engines", {"engines", "external_student"}),
    ("transports", {"lane", "rpc"}),
    ("coordinator core", {"coordinator_core", "metrics"}),
    ("students", {"students", "models", "data"}),
    ("math", {"divergence", "kernels", "schedules"}),
]
RECORDS = {"run_records"}
VOCABULARY = {"", "config", "configs", "messages", "errors", "logs", "lazy", "finite", "devices", "factory", "user_modules"}
# Imports across the rule, each for a reason: config validation looks the names it is given up in the registries
# (inside the check functions, only when a check runs).
ALLOWED_ACROSS = {("rdml_dist.config.checks", "data"), ("rdml_dist.config.checks", "models"),
                  ("rdml_dist.config.checks", "divergence")}


def _room(module: str) -> str:
    return module.removeprefix("rdml_dist").removeprefix(".").split(".")[0]


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` that goes up a room, from the vocabulary into a room, or from a record into a room."""
    rank = {room: index for index, (_, members) in enumerate(ROOMS) for room in members}
    found = []
    for module, imported in sorted(graph.items()):
        mine = _room(module)
        for target in sorted(imported):
            theirs = _room(target)
            if theirs in VOCABULARY or theirs == mine or (module, theirs) in ALLOWED_ACROSS:
                continue
            if theirs in RECORDS:
                ok = mine not in VOCABULARY
            else:
                ok = mine in rank and rank[mine] <= rank[theirs]
            if not ok:
                found.append(f"{module} imports {target}")
    return found


def test_every_module_has_a_room() -> None:
    named = set().union(*(members for _, members in ROOMS), RECORDS, VOCABULARY)
    assert {_room(module) for module in import_graph()} <= named


def test_the_layering_check_finds_an_import_up_a_room() -> None:
    assert layering_violations({"rdml_dist.coordinator_core.barrier": {"rdml_dist.engines.controller"}}) == [
        "rdml_dist.coordinator_core.barrier imports rdml_dist.engines.controller"]
    assert layering_violations({"rdml_dist.run_records.step_log": {"rdml_dist.coordinator_core.coordinator"}}) == [
        "rdml_dist.run_records.step_log imports rdml_dist.coordinator_core.coordinator"]
    assert layering_violations({"rdml_dist.errors": {"rdml_dist.run_records.run_directory"}}) == [
        "rdml_dist.errors imports rdml_dist.run_records.run_directory"]
    assert layering_violations({"rdml_dist.engines.local": {"rdml_dist.coordinator_core.coordinator",
                                                            "rdml_dist.run_records.run_directory"}}) == []


def test_no_module_imports_a_room_above_its_own() -> None:
    violations = layering_violations(import_graph())
    assert not violations, "\n".join(violations)


def _loaded_after(code: str) -> list[str]:
    """The top-level names in ``sys.modules`` after a fresh interpreter runs ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_config_core_metrics_barrier_and_rpc_load_neither_torchvision_nor_sklearn() -> None:
    loaded = _loaded_after(
        "import rdml_dist.config, rdml_dist.coordinator_core.coordinator, rdml_dist.metrics, rdml_dist.coordinator_core.barrier, rdml_dist.rpc.server, "
        "rdml_dist.rpc.service, rdml_dist.lane.server, rdml_dist.messages"
    )
    assert "torch" in loaded  # the core computes with torch: the check below is not vacuous
    assert "torchvision" not in loaded and "sklearn" not in loaded


def test_the_actors_and_a_default_student_load_neither_torchvision_nor_sklearn() -> None:
    """Every actor process imports the actors' module; a student of the default cohort also loads the digits and
    builds its models (each library costs a process about a second to import)."""
    loaded = _loaded_after(
        "import rdml_dist.engines.ray_actors\n"
        "from rdml_dist.config import data_spec, load_config\n"
        "from rdml_dist.data import load_dataset\n"
        "from rdml_dist.models import build_model\n"
        "config = load_config(None, [])\n"
        "data = load_dataset(data_spec(config), config.seed)\n"
        "assert len(data.train.labels) + len(data.val.labels) == 1797\n"
        "models = [build_model(student.model, num_classes=10, input_shape=(1, 8, 8)) for student in config.students]"
    )
    assert "ray" in loaded and "torch" in loaded
    assert "torchvision" not in loaded and "sklearn" not in loaded


def test_the_status_command_and_help_load_neither_torch_nor_pydantic() -> None:
    """``rdml-dist status`` runs for real (against a closed port: it reports the refusal) and loads neither torch nor
    pydantic."""
    loaded = _loaded_after(
        "import contextlib, io, socket\nfrom rdml_dist.cli import main\n"
        "for command in ('status', 'validate', 'train', 'student'):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main([command, '--help'])\n"
        "with socket.socket() as free:\n"
        "    free.bind(('127.0.0.1', 0))\n"
        "    port = free.getsockname()[1]\n"
        "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
        "    assert main(['status', '--coordinator', f'127.0.0.1:{port}']) == 1\n"
        "assert 'cannot read the cohort' in err.getvalue(), err.getvalue()"
    )
    assert "grpc" in loaded  # it did talk to the port
    assert "torch" not in loaded and "pydantic" not in loaded


# A string equal to a reason code that means something else: allowed, with the reason.
OTHER_MEANINGS = {("rdml_dist/engines/failures.py", "timeout"): "a failure kind, not a refusal"}


def test_message_shapes_and_reason_codes_are_defined_once_in_the_vocabulary() -> None:
    """Outside rdml_dist.messages (and generated code) no module redefines a message type or spells a reason code."""
    import rdml_dist.messages as messages

    found = []
    for name, path in _modules().items():
        if name.startswith("rdml_dist.messages"):
            continue
        where = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(ast.parse(path.read_text(), where)):
            if isinstance(node, ast.ClassDef) and node.name in messages.__all__:
                found.append(f"{where}:{node.lineno} defines {node.name}")
            if (isinstance(node, ast.Constant) and node.value in messages.REASONS
                    and (where, node.value) not in OTHER_MEANINGS):
                found.append(f"{where}:{node.lineno} spells the reason code {node.value!r}")
    assert not found, "\n".join(found)


def _name_lists(text: str, names: list[str]) -> list[str]:
    """Runs of three or more of ``names`` written one after another (``a, b or c``, with or without quotes)."""
    name = "|".join(re.escape(item) for item in sorted(names, key=len, reverse=True))
    item = rf"(?<![\w./-])[`'\"]?(?:{name})[`'\"]?(?![\w./-])"
    return [match.group(0) for match in re.finditer(rf"{item}(?:\s*(?:,|,?\s+or|,?\s+and)\s+{item}){{2,}}", text)]


def test_no_registry_or_enum_name_list_is_spelled_out_by_hand() -> None:
    """Registered divergences, models, data sources and failure policies are listed from their source (errors, the
    generated configuration reference), so registering one leaves no description or doc behind. (Tests choose
    their own models and pin the registry's content on purpose: they are not read here.)"""
    from rdml_dist.config.schema import OnStudentFailure
    from rdml_dist.data.registry import SOURCES
    from rdml_dist.divergence import DIVERGENCES
    from rdml_dist.models import MODEL_NAMES

    registries = {"divergences": list(DIVERGENCES), "models": list(MODEL_NAMES), "data sources": list(SOURCES),
                  "failure policies": [policy.value for policy in OnStudentFailure]}
    root = PACKAGE.parent
    generated = {root / "docs" / "configuration.md"}
    files = [*PACKAGE.rglob("*.py"), *(root / "docs").glob("*.md"), root / "README.md"]
    found = {}
    for path in sorted(set(files) - generated):
        text = path.read_text()
        for registry, names in registries.items():
            for spelled in _name_lists(text, names):
                found.setdefault(f"{path.relative_to(root)} ({registry})", []).append(spelled)
    assert not found, found
