"""Training curves from Lightning's CSV logs, stages joined end to end (a run, then its fine-tune).

    python -m csdlab.lit.curves STAGE1/metrics.csv STAGE2/metrics.csv --out assets/fmnist_vit_deep_training

writes ``<out>.csv`` (every row of every stage, with ``stage`` and a continuous ``epoch``) and
``<out>.png`` (validation top-1 per epoch, training loss per epoch, the learning rate)."""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from csdlab.eval.plots import _figure, _save

__all__ = ["join_stages", "plot_training"]


def join_stages(paths: Sequence[str | Path]) -> list[dict[str, str]]:
    """The rows of each CSV in order, epochs shifted so that each stage continues the last."""
    rows: list[dict[str, str]] = []
    offset = 0
    for stage, path in enumerate(paths, start=1):
        with open(path, newline="") as f:
            stage_rows = list(csv.DictReader(f))
        if not stage_rows or "epoch" not in stage_rows[0]:
            raise ValueError(f"{path} is not a Lightning CSV log (no 'epoch' column)")
        for r in stage_rows:
            rows.append({**r, "stage": str(stage), "epoch": str(int(r["epoch"]) + offset)})
        # the next stage starts after the last trained epoch (a test row after fit carries epoch + 1)
        trained = [int(r["epoch"]) for r in rows if any(v and k.startswith(("train/", "val/")) for k, v in r.items())]
        offset = max(trained, default=offset - 1) + 1
    return rows


def _per_epoch(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    values: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(key):
            values[int(r["epoch"])].append(float(r[key]))
    epochs = sorted(values)
    return [e + 1 for e in epochs], [sum(values[e]) / len(values[e]) for e in epochs]


def plot_training(rows: list[dict[str, str]], out: str | Path) -> tuple[Path, Path]:
    """Write ``<out>.csv`` and ``<out>.png``; return their paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = ["stage"] + [k for k in dict.fromkeys(k for r in rows for k in r) if k != "stage"]
    csv_path = out.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    fig, (ax_acc, ax_loss, ax_lr) = _figure(width=10.0, height=3.2, ncols=3)
    ax_acc.plot(*_per_epoch(rows, "val/top1"), marker="o", markersize=3)
    ax_acc.set(xlabel="epoch", ylabel="validation top-1", title="validation accuracy")
    ax_loss.plot(*_per_epoch(rows, "train/loss"))
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="training loss")
    ax_lr.plot(*_per_epoch(rows, "train/lr"))
    ax_lr.set(xlabel="epoch", ylabel="learning rate (epoch mean)", title="schedule")
    starts = {}
    for r in rows:
        starts.setdefault(r["stage"], int(r["epoch"]))
    for first in list(starts.values())[1:]:  # where each later stage starts (epochs plotted 1-based)
        for ax in (ax_acc, ax_loss, ax_lr):
            ax.axvline(first + 0.5, linestyle="--", linewidth=1, color="gray")
    for ax in (ax_acc, ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    return csv_path, _save(fig, out.with_suffix(".png"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="Lightning CSV logs (metrics.csv), one per stage, in order")
    parser.add_argument("--out", required=True, help="output path without suffix (.csv and .png are written)")
    args = parser.parse_args(argv)
    for p in plot_training(join_stages(args.csv), args.out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
