"""A divergence of the user's own, in a module beside the config, trains a cohort on both engines."""

import csv
import textwrap
from pathlib import Path

from tests.integration.cli_process import run_cli, write_config

USER_DIVERGENCE = textwrap.dedent(
    '''
    """Twice the KL divergence: a divergence the package does not have, defined outside it."""
    from rdml_dist.divergence import Divergence


    def _twice_kl(target_logp, input_logp, alpha):
        return 2 * (target_logp.exp() * (target_logp - input_logp)).sum(-1)


    twice_kl = Divergence("twice_kl", _twice_kl)
    '''
)


def train(config: Path, run_dir: Path, engine: str, divergence: str, cwd: Path) -> dict[tuple[str, str], dict[str, str]]:
    """Train through the CLI, from a directory other than the config's and without PYTHONPATH; the step rows by (step, student)."""
    result = run_cli(
        ["train", str(config), "--no-progress", "--engine", engine, "--run-dir", str(run_dir),
         "--set", f"mimicry.divergence={divergence}"],
        cwd=cwd, timeout_s=300, PYTHONPATH="",
    )
    assert result.returncode == 0, result.stderr
    with (run_dir / "steps.csv").open(newline="") as handle:
        return {(row["step"], row["student"]): row for row in csv.DictReader(handle)}


def test_a_divergence_beside_the_config_trains_a_cohort_on_both_engines(tmp_path: Path) -> None:
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "my_divergences.py").write_text(USER_DIVERGENCE)
    config = write_config(experiment / "cohort.yaml", tmp_path / "unused", training={"batch_size": 512})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kl = train(config, tmp_path / "kl", "local", "kl", elsewhere)
    local = train(config, tmp_path / "local", "local", "my_divergences:twice_kl", elsewhere)
    on_ray = train(config, tmp_path / "ray", "ray", "my_divergences:twice_kl", elsewhere)
    assert local.keys() == on_ray.keys() == kl.keys() and len(local) >= 4
    for (step, student), row in local.items():
        if step == "0":  # same initialisation and batch: the logits agree, so the divergence is twice KL's
            assert abs(float(row["divergence"]) - 2 * float(kl[step, student]["divergence"])) <= 1e-5 * float(row["divergence"])
        for column in ("ce_loss", "mimicry_loss", "divergence"):
            assert abs(float(on_ray[step, student][column]) - float(row[column])) <= 1e-4, (step, student, column)
