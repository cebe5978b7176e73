"""Draws docs/architecture.png, the picture of the system that README.md and docs/index.md show.

    python docs/architecture.py [OUTPUT.png]

Matplotlib only (the test extra installs it), so the committed image can be redrawn anywhere.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUTPUT = Path(__file__).with_name("architecture.png")
COLOURS = {
    "driver": "#dbe7f5", "coordinator": "#fde2c4", "student": "#d9f0d3", "external": "#eadcf5",
    "storage": "#eeeeee", "monitoring": "#fbd5d5", "cluster": "#f7f7f7",
}
TRANSPORTS = {"lane": "#1f77b4", "actor": "#555555", "grpc": "#8e44ad", "files": "#7f7f7f", "scrape": "#c0392b"}


def box(axes, x: float, y: float, width: float, height: float, title: str, body: str, kind: str) -> None:
    axes.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.02,rounding_size=0.12",
                                  facecolor=COLOURS[kind], edgecolor="#333333", linewidth=1.2, zorder=2))
    axes.text(x + width / 2, y + height - 0.22, title, ha="center", va="top", fontsize=10.5, weight="bold", zorder=3)
    axes.text(x + width / 2, y + height - 0.58, body, ha="center", va="top", fontsize=8.2, linespacing=1.35, zorder=3)


def arrow(axes, start: tuple[float, float], end: tuple[float, float], colour: str, label: str = "",
          both: bool = False, dashed: bool = False, label_at: tuple[float, float] | None = None,
          bend: float = 0.0) -> None:
    axes.add_patch(FancyArrowPatch(start, end, arrowstyle="<|-|>" if both else "-|>", mutation_scale=13,
                                   color=colour, linewidth=1.8, linestyle="--" if dashed else "-",
                                   connectionstyle=f"arc3,rad={bend}", zorder=4))
    if label:
        x, y = label_at or ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        axes.text(x, y, label, ha="center", va="center", fontsize=7.8, color=colour, zorder=5,
                  bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.2})


def draw(output: Path) -> None:
    figure, axes = plt.subplots(figsize=(13, 8.2), dpi=110)
    axes.set_xlim(0, 13)
    axes.set_ylim(0, 8.2)
    axes.axis("off")

    axes.add_patch(FancyBboxPatch((0.25, 1.75), 9.0, 6.2, boxstyle="round,pad=0.02,rounding_size=0.2",
                                  facecolor=COLOURS["cluster"], edgecolor="#999999", linestyle="--", zorder=1))
    axes.text(0.45, 7.8, "Ray cluster (one placement group: a bundle per student and per coordinator shard)",
              fontsize=9, color="#555555", va="top")

    box(axes, 0.55, 5.55, 2.7, 1.9, "driver", "rdml-dist train\nconfig, placement group,\nepoch loop, failure policy,\nrun directory", "driver")
    box(axes, 4.4, 5.2, 4.5, 2.25, "coordinator shards 0 … S−1",
        "step barrier: frames of every live student\nbatched Rényi gradients, rows split by shard\n"
        "shard 0: records, scores, /metrics,\ngRPC cohort service", "coordinator")
    for index, (name, model) in enumerate([("student 1", "ResNet-32"), ("student 2", "WRN-28-2"), ("student K", "MobileNetV2")]):
        box(axes, 0.55 + index * 2.95, 2.0, 2.6, 1.45, name, f"Ray actor ({model})\nits own data and GPU,\nforward + backward", "student")
    axes.text(6.28, 2.7, "…", fontsize=18, ha="center", va="center")

    box(axes, 10.0, 6.45, 2.75, 1.3, "external student", "rdml-dist student: another\nprocess, machine or language", "external")
    box(axes, 10.0, 4.75, 2.75, 1.3, "rdml-dist status", "members, step, losses\n(gRPC GetStatus)", "external")
    box(axes, 10.0, 2.35, 2.75, 1.5, "Prometheus + Grafana", "scrapes /metrics (and Ray's\nown metrics), dashboard", "monitoring")
    box(axes, 2.5, 0.1, 5.6, 1.25, "storage (runtime.storage)",
        "local path, shared file system or s3:// / gs://\nconfig.yaml · results.json · steps.csv · checkpoints/", "storage")

    for index in range(3):
        x = 1.85 + index * 2.95
        arrow(axes, (x + 0.25, 3.45), (4.9 + index * 1.5, 5.2), TRANSPORTS["lane"], both=True)
        arrow(axes, (x - 0.3, 3.45), (4.6 + index * 1.5, 5.2), TRANSPORTS["actor"], both=True, dashed=True)
    axes.text(4.6, 4.45, "per step: logits in, gradient out\nframe lane (tcp, default) ——\nor Ray actor calls - - -",
              fontsize=8, ha="center", va="center", color=TRANSPORTS["lane"], zorder=5,
              bbox={"facecolor": "white", "edgecolor": "#cccccc", "pad": 2.5})
    arrow(axes, (3.25, 6.5), (4.4, 6.5), TRANSPORTS["actor"], "actor calls:\nchunks of steps,\nrestore", both=True,
          label_at=(3.82, 7.05))
    arrow(axes, (1.9, 5.55), (1.9, 3.45), TRANSPORTS["actor"], "actor calls:\ncheckpoint,\nevaluate", label_at=(1.15, 4.55))
    arrow(axes, (10.0, 7.1), (8.9, 7.1), TRANSPORTS["grpc"], "gRPC Exchange\nstream", both=True, label_at=(9.45, 7.55))
    arrow(axes, (10.0, 5.4), (8.9, 5.4), TRANSPORTS["grpc"], "gRPC", both=True, label_at=(9.45, 5.7))
    arrow(axes, (10.6, 3.85), (8.75, 5.2), TRANSPORTS["scrape"], "scrape\n/metrics", label_at=(9.75, 4.25))
    for index in range(3):
        arrow(axes, (1.85 + index * 2.95, 2.0), (3.3 + index * 1.9, 1.35), TRANSPORTS["files"], dashed=True)
    arrow(axes, (0.55, 5.9), (2.5, 0.45), TRANSPORTS["files"], dashed=True, bend=0.42)
    axes.text(8.3, 0.75, "students write their own\ncheckpoints; the driver\nwrites the results", fontsize=7.8,
              color=TRANSPORTS["files"], va="center")

    figure.tight_layout(pad=0.2)
    figure.savefig(output)
    plt.close(figure)


if __name__ == "__main__":
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)
