"""`launcher plot RUN_DIR [RUN_DIR ...] [-o out.png]`: loss, evaluation, lr and throughput against step.

Several runs are overlaid, one colour each. The PNG's metadata names its panels ("Description").
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import LaunchError

PANELS = ("loss", "evaluation", "learning rate", "throughput")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LaunchError(str(run_dir), "has no metrics.jsonl; pass a run directory (e.g. runs/quickstart)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dirs: list[Path], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise LaunchError("plot", "needs matplotlib: pip install 'launcher[plot]'") from None
    runs = [(d, read_rows(d)) for d in run_dirs]
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), constrained_layout=True)
    ax_loss, ax_eval, ax_lr, ax_tput = axes.flat
    for (run_dir, rows), name, color in zip(runs, names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if any(k.startswith("val_") for k in r)]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=f"{name} train")
        if evals and "val_loss" in evals[0]:
            ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "--", color=color, label=f"{name} val")
        for key, style in (("val_accuracy", "-o"), ("val_loss", ":")):
            if evals and key in evals[0]:
                ax_eval.plot([r["step"] for r in evals], [r[key] for r in evals], style, ms=3, color=color, label=f"{name} {key}")
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color=color, label=name)
        key = "tokens_per_s" if train and "tokens_per_s" in train[0] else "samples_per_s"
        ax_tput.plot([r["step"] for r in train], [r.get(key) for r in train], color=color, label=f"{name} ({key})")
    for ax, title in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax_loss.set_yscale("log")
    fig.suptitle(", ".join(names))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Title": "launcher plot", "Description": "panels: " + ", ".join(PANELS)})
    plt.close(fig)
    return list(PANELS)
