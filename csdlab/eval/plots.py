"""JSON, markdown tables and plots for the conversion reports (:mod:`csdlab.eval.report`).

Plots use matplotlib's Agg backend (no display; safe in DDP workers and CI). Every writer
creates its parent folder and returns the path it wrote.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_json", "plot_curves", "plot_bars", "format_table", "jsonable", "check_writable"]

log = logging.getLogger(__name__)


def check_writable(directory: str | Path, what: str) -> None:
    """Create ``directory`` and write a probe file into it, or raise ``ValueError`` naming the folder.

    Called before a run computes anything (W&B would even fall back to the system temporary folder
    when its ``save_dir`` is not writable, so the run would "succeed" and its files vanish)."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ValueError(f"{what} {d} is not writable ({e.strerror or e}); make it writable or point "
                         f"the run elsewhere (--trainer.default_root_dir, the logger's save_dir, "
                         f"--checkpoint.dirpath, --report.out_dir)") from e


def jsonable(value: Any) -> Any:
    """Tensors, numpy scalars, paths and tuples -> plain JSON types (NaN/inf -> None)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch / numpy
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")
    log.info("wrote %s", path)
    return path


def _figure(width: float = 5.0, height: float = 3.5, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), constrained_layout=True)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
                xlabel: str, ylabel: str, title: str = "",
                hlines: Mapping[str, float] | None = None) -> Path:
    """Line plot of named ``(x, y)`` curves (accuracy vs delay D, vs time step t, ...).

    Args:
        curves: label -> (x values, y values).
        path: output image (``.png``).
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: figure title.
        hlines: label -> y of a horizontal reference line (e.g. the QANN's accuracy).
    """
    fig, ax = _figure()
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if all(float(x).is_integer() for xs, _ in curves.values() for x in xs):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # delays and time steps are integers
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(values: Mapping[str, float], path: str | Path, *, ylabel: str, title: str = "") -> Path:
    """Bar chart of one value per name (e.g. firing rate per layer), names on a rotated axis."""
    fig, ax = _figure(width=max(5.0, 0.25 * len(values) + 2), height=4.0)
    ax.bar(range(len(values)), list(values.values()))
    ax.set_xticks(range(len(values)), list(values.keys()), rotation=90, fontsize=6)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub-markdown table (pastes into the README as it is)."""
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
