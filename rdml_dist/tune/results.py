"""What a person reads after a sweep: the trials ranked by the metric (CSV and Markdown) and ``best.yaml``."""

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rdml_dist.errors import ConfigError
from rdml_dist.tune.sweep import SweepConfig, experiment_raw, trial_experiment

TABLE = "sweep_results"
BEST = "best.yaml"


@dataclass
class TrialOutcome:
    """One trial as the table shows it; ``curve`` is the metric per epoch."""

    trial_id: str
    params: dict[str, Any]
    status: str  # completed, stopped early, failed
    epochs: int
    final: float
    best: float
    error: str = ""
    curve: list[float] = field(default_factory=list)


def _first_line_of_error(base: dict[str, Any], params: dict[str, Any], error: BaseException) -> str:
    """A config error as its one line (``field: problem``); any other error as its last line."""
    try:
        trial_experiment(base, params)
    except ConfigError as invalid:
        field_name, problem = invalid.problems[0]
        return f"{field_name}: {problem}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def outcomes(results: Any, sweep: SweepConfig, base: dict[str, Any]) -> list[TrialOutcome]:
    """Tune's ResultGrid as outcomes, best first by the final metric (failed trials last)."""
    rows = []
    for result in results:
        params = {path: result.config.get(path) for path in sweep.space}
        frame = result.metrics_dataframe
        curve = [float(v) for v in frame[sweep.metric]] if frame is not None and sweep.metric in frame else []
        finite = [value for value in curve if not math.isnan(value)]
        best = (max if sweep.mode == "max" else min)(finite) if finite else math.nan
        if result.error is not None:
            status, error = "failed", _first_line_of_error(base, params, result.error)
        else:
            planned = trial_experiment(base, params).training.epochs
            status, error = ("completed" if len(curve) >= planned else "stopped early"), ""
        rows.append(TrialOutcome(Path(result.path).name, params, status, len(curve), curve[-1] if curve else math.nan,
                                 best, error, curve))
    sign = -1 if sweep.mode == "max" else 1
    return sorted(rows, key=lambda row: (row.status == "failed", math.isnan(row.final), sign * (row.final if not math.isnan(row.final) else 0)))


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _table_rows(rows: list[TrialOutcome], sweep: SweepConfig) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "trial", *sweep.space, "status", "epochs", f"final {sweep.metric}", f"best {sweep.metric}", "error"]
    body = [[str(rank), row.trial_id, *(_shown(row.params[path]) for path in sweep.space), row.status, str(row.epochs),
             _shown(row.final), _shown(row.best), row.error] for rank, row in enumerate(rows, 1)]
    return header, body


def write_table(rows: list[TrialOutcome], sweep: SweepConfig, directory: Path) -> tuple[Path, Path]:
    """``sweep_results.csv`` and ``sweep_results.md``, ranked by the final metric."""
    header, body = _table_rows(rows, sweep)
    lines = io.StringIO()
    writer = csv.writer(lines)
    writer.writerow(header)
    writer.writerows(body)
    csv_path = directory / f"{TABLE}.csv"
    csv_path.write_text(lines.getvalue())
    markdown = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
                *(f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in body)]
    md_path = directory / f"{TABLE}.md"
    md_path.write_text("\n".join(markdown) + "\n")
    return csv_path, md_path


def write_best(rows: list[TrialOutcome], sweep: SweepConfig, base: dict[str, Any], directory: Path) -> Path | None:
    """``best.yaml``: the complete experiment of the best trial that reported the metric, for ``rdml-dist train``."""
    ranked = [row for row in rows if row.status != "failed" and not math.isnan(row.final)]
    if not ranked:
        return None
    raw = experiment_raw(base, ranked[0].params)
    raw["name"] = f"{sweep.name}-best"
    config = trial_experiment(raw, {})
    path = directory / BEST
    header = (f"# The best trial ({ranked[0].trial_id}) of sweep {sweep.name}: final {sweep.metric} = "
              f"{ranked[0].final:.4f}.\n# Train it again with: rdml-dist train {path}\n")
    path.write_text(header + yaml.safe_dump(config.without_credentials(), sort_keys=False))  # never a token in clear
    return path
