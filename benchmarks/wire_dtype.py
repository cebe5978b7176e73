"""What float16/bfloat16 frames (``runtime.exchange.dtype``) do to the mimicry gradients a student receives.

For K×B×C logits (random, and confident: +15 on one class shared by the students), the gradient
of every student is computed as the coordinator does it from float32 logits, and again from the
logits rounded to the wire dtype with the gradient rounded back to it (what travels both ways).
Reported: relative error of the gradients (Frobenius norm over the cohort), largest relative error
of a student's mimicry loss, the share of students whose gradient points elsewhere (cosine < 0.99),
and the bytes per frame. Rényi α = 2, τ = 1 (α = 5 for confident logits).

Writes benchmarks/results/wire_dtype.{json,md}. Run (seconds):
    .venv/bin/python benchmarks/wire_dtype.py
"""

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from rdml_dist.divergence import mimicry_gradients

RESULTS = Path(__file__).parent / "results"
CELLS = [(8, 128, 10), (8, 128, 100), (8, 128, 1000), (32, 256, 100)]
WIRE_DTYPES = (torch.float16, torch.bfloat16)


def cohort_logits(kind: str, k: int, b: int, c: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(k * 1000 + c)
    logits = torch.randn(k, b, c, generator=generator) * 2
    if kind == "confident":
        logits[:, torch.arange(b), torch.randint(c, (b,), generator=generator)] += 15.0
    return logits


def effect(kind: str, k: int, b: int, c: int, dtype: torch.dtype) -> dict[str, Any]:
    alpha = 5.0 if kind == "confident" else 2.0
    logits = cohort_logits(kind, k, b, c)
    exact = mimicry_gradients(logits, alpha=alpha, with_targets=False)
    sent = logits.to(dtype)
    rounded = mimicry_gradients(sent.float(), alpha=alpha, with_targets=False)
    received = rounded.grads.to(dtype).float()
    cosine = torch.nn.functional.cosine_similarity(received.flatten(1), exact.grads.flatten(1), dim=1)
    return {
        "logits": kind, "k": k, "b": b, "c": c, "dtype": str(dtype).removeprefix("torch."), "alpha": alpha,
        "grad_relative_error": float((received - exact.grads).norm() / exact.grads.norm()),
        "max_loss_relative_error": float(((rounded.losses - exact.losses) / exact.losses).abs().max()),
        "min_cosine": float(cosine.min()),
        "students_off_direction": int((cosine < 0.99).sum()),
        "frame_bytes": b * c * dtype.itemsize,
        "float32_frame_bytes": b * c * 4,
    }


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Half-precision frames (benchmarks/wire_dtype.py)",
        "",
        f"Machine: {report['machine']}. Command: `.venv/bin/python benchmarks/wire_dtype.py`. Logits rounded to the "
        "wire dtype, the coordinator computing in float32, the gradient rounded back to the wire dtype, against the "
        "float32 path; Rényi α = 2 on random logits, α = 5 on confident ones.",
        "",
        "| K | B×C | logits | dtype | frame KiB (float32) | gradient rel. error | max loss rel. error | min cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['k']} | {row['b']}×{row['c']} | {row['logits']} | {row['dtype']} | {row['frame_bytes'] / 1024:.0f} "
            f"({row['float32_frame_bytes'] / 1024:.0f}) | {row['grad_relative_error']:.2e} | "
            f"{row['max_loss_relative_error']:.2e} | {row['min_cosine']:.5f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    torch.set_num_threads(1)
    rows = [effect(kind, k, b, c, dtype) for k, b, c in CELLS for kind in ("random", "confident") for dtype in WIRE_DTYPES]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "wire_dtype.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    (RESULTS / "wire_dtype.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
