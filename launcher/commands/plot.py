"""`launcher plot RUN_DIR [RUN_DIR ...] [-o out.png]`: loss, evaluation, lr and throughput against step.

Several runs are overlaid, one colour each. The PNG's metadata names its panels ("Description").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.errors import EXIT_OK, LaunchError

PANELS = ("loss", "evaluation", "learning rate", "throughput")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LaunchError(str(run_dir), "has no metrics.jsonl; pass a run directory (e.g. runs/quickstart)")
    from launcher.observe.metrics import read_metrics

    rows = read_metrics(path)[0]  # a row torn by a crash mid-write is skipped
    if not rows:
        raise LaunchError(
            str(run_dir),
            "metrics.jsonl has no rows yet: nothing to plot (rows are written every log.every_n_steps steps)",
        )
    return rows


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
    ax_acc = None  # accuracy on its own scale, right: on val_loss's axis its changes look flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    for (_, rows), name, color in zip(runs, names, colors[: len(runs)], strict=True):
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if any(k.startswith("val_") for k in r)]
        full, short = split_short_rows(train)
        ax_loss.plot([r["step"] for r in full], [r["loss"] for r in full], color=color, label=f"{name} train")
        if short:  # an epoch's last row averages over few samples: noisy, shown as points off the line
            ax_loss.plot(
                [r["step"] for r in short],
                [r["loss"] for r in short],
                ".",
                ms=4,
                alpha=0.5,
                color=color,
                label=f"{name} train (short rows)",
            )
        if evals and "val_loss" in evals[0]:
            ax_loss.plot(
                [r["step"] for r in evals], [r["val_loss"] for r in evals], "--", color=color, label=f"{name} val"
            )
            ax_eval.plot(
                [r["step"] for r in evals],
                [r["val_loss"] for r in evals],
                ":o",
                ms=3,
                color=color,
                label=f"{name} val_loss",
            )
        if evals and "val_accuracy" in evals[0]:
            if ax_acc is None:
                ax_acc = ax_eval.twinx()
            ax_acc.plot(
                [r["step"] for r in evals],
                [r["val_accuracy"] for r in evals],
                "-s",
                ms=3,
                color=color,
                label=f"{name} val_accuracy",
            )
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color=color, label=name)
        key = "tokens_per_s" if train and "tokens_per_s" in train[0] else "samples_per_s"
        ax_tput.plot([r["step"] for r in train], [r.get(key) for r in train], color=color, label=f"{name} ({key})")
    for ax, title in zip(axes.flat, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax_loss.set_yscale("log")
    ax_eval.set_ylabel("val_loss")
    if ax_acc is not None:
        ax_acc.set_ylabel("val_accuracy")
        handles = [h for ax in (ax_eval, ax_acc) for h in ax.get_legend_handles_labels()[0]]
        ax_eval.legend(handles, [h.get_label() for h in handles], fontsize=8)
    fig.suptitle(", ".join(names))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Title": "launcher plot", "Description": "panels: " + ", ".join(PANELS)})
    plt.close(fig)
    return list(PANELS)


def split_short_rows(train: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training rows over a full log window, and rows over less than half of the usual one (an
    epoch's end, a resumed run's first row, the last row)."""
    sizes = sorted(r["samples"] for r in train if isinstance(r.get("samples"), (int, float)))
    if not sizes:
        return train, []
    usual = sizes[len(sizes) // 2]
    short = [r for r in train if r.get("samples", usual) < usual / 2]
    return [r for r in train if r not in short], short


def add_parser(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser(
        "plot",
        help="plot loss, evaluation, lr and throughput of one or more runs",
        description="Write a PNG of loss, evaluation metrics, lr and throughput against step; "
        "several run directories are overlaid.",
    )
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument(
        "-o", "--output", help="the PNG to write (default: RUN_DIR/metrics.png, or ./runs.png for several runs)"
    )


def main(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.output) if args.output else (dirs[0] / "metrics.png" if len(dirs) == 1 else Path("runs.png"))
    plot(dirs, out)
    print(out)
    return EXIT_OK
