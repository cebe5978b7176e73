"""What one fused native call per step would give the coordinator: a probe, not the coordinator's code.

The coordinator's step (``batched``) costs 2.4–5× its floor at C = 10 because it makes 17–23 torch
calls of 7–16 µs each where the floor makes 5 (docs/benchmarks.md). This times, in the same
interleaved rounds as benchmarks/coordinator_cost.py and against the same floor, the whole step as
one C call (``benchmarks/fused_kernel_probe.c``, the direct form: K·K·C exps per sample, compiled
here with the system's C compiler and called through ctypes) after the same stack into a buffer,
and checks its gradients and losses against the float64 per-pair loop. One torch thread. Writes
benchmarks/results/fused_kernel_probe.{json,md}. Run (1 min):
    .venv/bin/python benchmarks/fused_kernel_probe.py
"""

import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from coordinator_cost import ALPHA, RESULTS, CoordinatorCall, FactoredFloor, cohort_logits, interleaved_rounds, median_ratio, per_pair_loop

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-shared", "-fPIC"]
GRID = [(k, 128, c) for k in (2, 4, 8, 16) for c in (10, 100, 1000)]


def compile_kernel(directory: Path) -> ctypes.CDLL:
    """The probe's kernel, compiled with ``cc`` into ``directory``."""
    library = directory / "fused_kernel_probe.so"
    subprocess.run(["cc", *FLAGS, str(SOURCE), "-o", str(library), "-lm"], check=True)
    kernel = ctypes.CDLL(str(library))
    pointer, integer, single = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    kernel.renyi_direct.argtypes = [pointer, integer, integer, integer, single, single, single, pointer, pointer, pointer]
    return kernel


class OneNativeCall:
    """The step as the probe runs it: the K frames stacked by sample into a buffer, then one C call."""

    def __init__(self, kernel: ctypes.CDLL, logits: torch.Tensor, alpha: float) -> None:
        k, batch, classes = logits.shape
        self.kernel, self.alpha, self.shape = kernel, alpha, (batch, k, classes)
        self.frames = list(logits.unbind(0))
        self.stacked, self.grads = torch.empty(batch, k, classes), torch.empty(batch, k, classes)
        self.loss_sums, self.work = torch.empty(k, dtype=torch.float64), torch.empty(2 * k * classes + classes)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, k, classes = self.shape
        torch.stack(self.frames, dim=1, out=self.stacked)
        self.kernel.renyi_direct(self.stacked.data_ptr(), batch, k, classes, self.alpha, 1.0, 1.0 / batch,
                                 self.grads.data_ptr(), self.loss_sums.data_ptr(), self.work.data_ptr())
        return self.grads.transpose(0, 1), self.loss_sums / ((k - 1) * (self.alpha - 1) * batch)


def measure(kernel: ctypes.CDLL, k: int, b: int, c: int, kind: str) -> dict[str, Any]:
    alpha = ALPHA[kind]
    logits = cohort_logits(kind, k, b, c)
    native = OneNativeCall(kernel, logits, alpha)
    grads, losses = native()
    _, reference_grads, reference_losses = per_pair_loop(logits.double(), alpha)
    times = interleaved_rounds({"native": native, "batched": CoordinatorCall(logits, alpha), "floor": FactoredFloor(logits)}, 2.0)
    return {
        "k": k, "b": b, "c": c, "logits": kind,
        **{f"{name}_s": statistics.median(measured["cpu"]) for name, measured in times.items()},
        "native_over_floor": median_ratio(times["native"]["cpu"], times["floor"]["cpu"]),
        "batched_over_floor": median_ratio(times["batched"]["cpu"], times["floor"]["cpu"]),
        "grad_relative_error": float((grads.double() - reference_grads).norm() / reference_grads.norm()),
        "loss_relative_error": float(((losses - reference_losses) / reference_losses.abs()).abs().max()),
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        "# One native call per step: a probe (benchmarks/fused_kernel_probe.py)", "",
        f"Machine: {report['machine']}; one torch thread; `cc {' '.join(FLAGS)}`. Command: `{report['command']}`. "
        "CPU ms per step, median over interleaved rounds, ratios the median of per-round ratios. `native`: the stack "
        "into a buffer, then `benchmarks/fused_kernel_probe.c` (direct form, K·K·C exps per sample) in one ctypes call; "
        "`batched`: the coordinator's step; `floor`: as in coordinator_cost.md. Errors: against the float64 per-pair loop.",
        "", "| K | B | C | logits | native | batched | floor | native / floor | batched / floor | grad error | loss error |",
        "|---" * 11 + "|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['k']} | {row['b']} | {row['c']} | {row['logits']} | {1000 * row['native_s']:.3f} | "
                     f"{1000 * row['batched_s']:.3f} | {1000 * row['floor_s']:.3f} | {row['native_over_floor']:.2f}× | "
                     f"{row['batched_over_floor']:.2f}× | {row['grad_relative_error']:.1e} | {row['loss_relative_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rdml-probe-") as directory:
        kernel = compile_kernel(Path(directory))
        rows = [measure(kernel, k, b, c, kind) for k, b, c in GRID for kind in ("random", "confident")]
    report = {
        "command": ".venv/bin/python benchmarks/fused_kernel_probe.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}",
        "wall_seconds": time.perf_counter() - started, "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fused_kernel_probe.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render(report)
    (RESULTS / "fused_kernel_probe.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
