"""docs/extending.md followed as a newcomer follows it: the recipes carried out for real, and the page's paths and
names checked against the code (no Ray; seconds).

- A divergence of one's own, in a module beside the config, named ``package.module:name``: a local run on the
  embedded ``digits`` data trains with it (its recorded losses are what the divergence computes).
- A per-student Prometheus metric: one from the step records (a :class:`CohortMetrics` addition) and one from an
  event of the coordinator core (a :class:`MeteredCoordinator` hook), read back from a real ``prometheus_client``
  registry through a :class:`CohortBarrier`, as Prometheus reads the coordinator's ``/metrics``.
"""

import asyncio
import csv
import importlib
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import Counter, Gauge, generate_latest

import rdml_dist.coordinator_core.barrier as barrier_module
from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.config import load_config, parse_config
from rdml_dist.divergence import mimicry_gradients
from rdml_dist.engines.local import train_local
from rdml_dist.messages import LogitsFrame, StepRecord
from rdml_dist.coordinator_core.metered_coordinator import MeteredCoordinator
from rdml_dist.metrics import STUDENT_LABELS, CohortMetrics
from rdml_dist.students.student import Student
from rdml_dist.user_modules import make_user_modules_importable
from tests.unit.cohort_barrier import planned_frame, registered_barrier

REPOSITORY = Path(__file__).resolve().parents[2]
PAGE = REPOSITORY / "docs" / "extending.md"

# -- a divergence beside the config ---------------------------------------------------------------------------------

MY_DIVERGENCES = textwrap.dedent(
    '''
    """The experiment's own divergence, beside its config."""
    import torch

    from rdml_dist.divergence import Divergence


    def squared_hellinger(target_logp, input_logp, alpha):
        """Per sample (B×C log-probabilities in, B out): 1 − Σ_c sqrt(p_c q_c), in log space."""
        return 1 - torch.logsumexp((target_logp + input_logp) / 2, dim=-1).exp()


    hellinger = Divergence("hellinger", squared_hellinger)
    '''
)
TEMPERATURE, WEIGHT = 2.0, 0.5


@pytest.fixture
def config_beside_its_divergence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``my_divergences.py`` and ``cohort.yaml`` in one folder, made importable as ``rdml-dist train`` makes it."""
    (tmp_path / "my_divergences.py").write_text(MY_DIVERGENCES)
    config_file = tmp_path / "cohort.yaml"
    config_file.write_text(yaml.safe_dump({
        "name": "own-divergence",
        "seed": 5,
        "students": [{"model": "mlp", "name": name, "options": {"hidden": [16], "dropout": 0.0}} for name in ("a", "b")],
        "training": {"epochs": 1, "batch_size": 256, "optimizer": {"lr": 0.05}},
        "mimicry": {"divergence": "my_divergences:hellinger", "temperature": TEMPERATURE, "weight": WEIGHT},
        "runtime": {"engine": "local", "run_dir": str(tmp_path / "run"), "torch_threads": 1},
        "monitoring": {"enabled": False},
    }))
    monkeypatch.setattr(sys, "path", list(sys.path))  # both are changed by the CLI's own step; undone after the test
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    make_user_modules_importable(str(config_file))  # what every rdml-dist command does before reading its config
    yield config_file
    sys.modules.pop("my_divergences", None)


def test_a_divergence_beside_the_config_is_the_one_a_local_run_trains_with(config_beside_its_divergence: Path) -> None:
    config = load_config(config_beside_its_divergence)  # the checks import the module and refuse a non-Divergence
    run = train_local(config, config.resolved_run_dir(), show_progress=False)
    run.finish()
    with (Path(run.location) / "steps.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["student"] for row in rows} == {"a", "b"} and len(rows) == 2 * 6  # 1,438 training digits, batches of 256

    # What the divergence gives on the students' logits of step 0 (built afresh: same seed, same weights, same batch).
    logits = torch.stack([Student(config, index).forward_step(0).logits for index in range(2)])
    hellinger = importlib.import_module("my_divergences").hellinger
    expected = mimicry_gradients(logits, temperature=TEMPERATURE, divergence=hellinger).losses
    default = mimicry_gradients(logits, temperature=TEMPERATURE, divergence="renyi", alpha=config.mimicry.alpha).losses
    assert not torch.allclose(expected, default, rtol=1e-2)  # the check below tells the two apart
    first = {row["student"]: row for row in rows if row["step"] == "0"}
    for name, value in zip(("a", "b"), expected.tolist()):
        assert 0 < value < 1  # a squared Hellinger distance
        assert float(first[name]["divergence"]) == pytest.approx(value, rel=1e-5)
        assert float(first[name]["mimicry_loss"]) == pytest.approx(WEIGHT * TEMPERATURE**2 * value, rel=1e-5)
    assert all(0 < float(row["divergence"]) < 1 for row in rows)


# -- a per-student metric -------------------------------------------------------------------------------------------


class MoreMetrics(CohortMetrics):
    """What the recipe adds to CohortMetrics: one metric from the step records, one fed by a coordinator hook."""

    def __init__(self, run: str, models: dict[str, str], registry) -> None:
        super().__init__(run, models, registry)
        self.labelled_samples = Counter("rdml_student_labelled_samples", "Training samples with a label processed",
                                        STUDENT_LABELS, registry=registry)
        self.frame_step = Gauge("rdml_student_frame_step", "Step of the student's last accepted frame",
                                STUDENT_LABELS, registry=registry)
        for student in models:  # every series exists from the start, so rates work before the first step
            self.labelled_samples.labels(*self._labels(student))

    def step_computed(self, step: int, epoch: int, records: dict[str, StepRecord], batch: int,
                      samples_per_second: dict[str, float]) -> None:
        super().step_computed(step, epoch, records, batch, samples_per_second)
        for name, record in records.items():
            self._bound(self.labelled_samples, name).inc(record.labelled)

    def frame_accepted(self, student: str, step: int) -> None:
        self._bound(self.frame_step, student).set(step)


class HookedCoordinator(MeteredCoordinator):
    """What the recipe adds to MeteredCoordinator: an event of the core reported to the metrics."""

    def submit(self, frame: LogitsFrame) -> None:
        super().submit(frame)  # a refused frame raises here and is counted as before
        self.metrics.frame_accepted(frame.student, frame.step)


NAMES, NUM_TRAIN, BATCH, CLASSES, STEPS = ("a", "b"), 24, 8, 4, 3


@pytest.fixture
def barrier(monkeypatch: pytest.MonkeyPatch) -> CohortBarrier:
    """A coordinator's barrier whose metrics are the extended ones (the recipe edits the classes themselves)."""
    monkeypatch.setattr(barrier_module, "CohortMetrics", MoreMetrics)
    monkeypatch.setattr(barrier_module, "MeteredCoordinator", HookedCoordinator)
    config = parse_config({"name": "extended", "students": [{"model": "mlp", "name": name} for name in NAMES],
                           "training": {"batch_size": BATCH, "epochs": 2}})
    return registered_barrier(config, NUM_TRAIN, CLASSES, STEPS)


def _frame(name: str, step: int, labelled: int) -> LogitsFrame:
    logits = torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(step * 10 + len(name)))
    return planned_frame(name, step, logits, labelled, NUM_TRAIN, STEPS)


def _scraped(barrier: CohortBarrier, metric: str) -> dict[str, float]:
    """``metric``'s value per student, as Prometheus reads it from the coordinator."""
    text = generate_latest(barrier.registry).decode()
    pattern = rf'^{metric}\{{model="mlp",run="extended",student="(\w+)"\}} (\S+)$'
    return {student: float(value) for student, value in re.findall(pattern, text, re.MULTILINE)}


async def _step_applied() -> None:
    """A step's metric updates are applied in a callback queued when its replies go out: this waits behind it."""
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


def test_a_metric_from_the_step_records_counts_every_students_steps(barrier: CohortBarrier) -> None:
    assert _scraped(barrier, "rdml_student_labelled_samples_total") == {"a": 0.0, "b": 0.0}

    async def two_steps() -> None:
        for step, labelled in ((0, {"a": 5, "b": 8}), (1, {"a": 3, "b": 0})):
            replies = await asyncio.gather(*(barrier.exchange(_frame(name, step, labelled[name])) for name in NAMES))
            assert [reply.step for reply in replies] == [step, step]
            await _step_applied()

    asyncio.run(two_steps())
    assert _scraped(barrier, "rdml_student_labelled_samples_total") == {"a": 8.0, "b": 8.0}
    assert _scraped(barrier, "rdml_student_steps_total") == {"a": 2.0, "b": 2.0}  # the built-in ones still count


def test_a_metric_from_a_coordinator_hook_shows_who_the_step_waits_for(barrier: CohortBarrier) -> None:
    async def scenario() -> None:
        first = asyncio.ensure_future(barrier.exchange(_frame("a", 0, BATCH)))
        await asyncio.sleep(0)  # a's frame is in; the step waits for b
        assert _scraped(barrier, "rdml_student_frame_step") == {"a": 0.0}
        assert not first.done()
        await barrier.exchange(_frame("b", 0, BATCH))
        await first
        second = asyncio.ensure_future(barrier.exchange(_frame("b", 1, BATCH)))
        await asyncio.sleep(0)
        assert _scraped(barrier, "rdml_student_frame_step") == {"a": 0.0, "b": 1.0}  # a is the one behind
        await asyncio.gather(second, barrier.exchange(_frame("a", 1, BATCH)))

    asyncio.run(scenario())
    assert _scraped(barrier, "rdml_student_frame_step") == {"a": 1.0, "b": 1.0}


# -- the page names what exists ---------------------------------------------------------------------------------------

_PATH = re.compile(r"`((?:rdml_dist|tests|docs|deploy|protos|benchmarks)/[\w./-]*)`|\]\(\.\./([\w./-]+)\)")
_DOTTED = re.compile(r"`(rdml_dist(?:\.\w+)+)`")
_TEST = re.compile(r"(?:`|::)(test_\w+)")


def test_every_path_and_python_name_on_the_page_exists() -> None:
    text = PAGE.read_text()
    paths = {next(group for group in match if group) for match in _PATH.findall(text)}
    assert len(paths) > 20, paths
    assert sorted(path for path in paths if not (REPOSITORY / path).exists()) == []
    names = set(_DOTTED.findall(text))
    assert len(names) > 5, names
    unresolved = []
    for name in sorted(names):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                found = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for attribute in parts[split:]:
                    found = getattr(found, attribute)
            except AttributeError:
                unresolved.append(name)
            break
        else:
            unresolved.append(name)
    assert unresolved == []
    tests = set(_TEST.findall(text))
    assert len(tests) > 5, tests
    defined = "\n".join(path.read_text() for path in (REPOSITORY / "tests").rglob("test_*.py"))
    assert sorted(name for name in tests if f"def {name}(" not in defined) == []


def test_the_page_is_in_the_site_and_the_readme() -> None:
    nav = yaml.safe_load((REPOSITORY / "mkdocs.yml").read_text())["nav"]
    assert any("extending.md" in entry.values() for entry in nav)
    documentation = (REPOSITORY / "README.md").read_text().split("## Documentation", 1)[1].split("\n## ", 1)[0]
    assert "](docs/extending.md)" in documentation
