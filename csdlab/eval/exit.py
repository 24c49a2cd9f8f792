"""Per-image early exit (docs/early_exit.md): an image stops at the first readout step whose
readout passes an exit rule, instead of every image running all ``T`` steps.

Each rule gives every (readout step, image) a *score*; a setting is a threshold on it, and an image
exits at the first readout whose score reaches the threshold (at the last readout if none does):

* ``stable``: the run length of the readout's argmax (1 when it differs from the previous
  readout's, k when the last k readouts agree); threshold k = "stable for k steps".
* ``margin``: top-1 minus top-2 logit of the readout.
* ``confidence``: the largest softmax probability of the readout.

The readout after step t never depends on later steps (every per-step readout of this contract is
causal), so exiting after simulating all ``T`` steps gives the figures a truly stopped image would.

:class:`EarlyExit` fixes the exit setting on labelled held-out training images (never the test
set): the grid of thresholds per rule, then the least-mean-steps setting whose accuracy is within
``tolerance`` of the reference network's on those images. :class:`csdlab.eval.metrics.ConversionMetrics`
scores every setting of the grid on the test images (the curve) and the chosen one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["EXIT_RULES", "exit_scores", "exit_indices", "ExitGrid", "EarlyExit"]

log = logging.getLogger(__name__)

#: the exit rules, in the order their settings are laid out in an :class:`ExitGrid`
EXIT_RULES = ("stable", "margin", "confidence")


def exit_scores(readout: Tensor, rule: str) -> Tensor:
    """The exit score of every readout row and image (``[R, B]``) from a readout ``[R, B, K]``.

    Args:
        readout: the logits after each readout step, ``[R, B, K]``.
        rule: ``stable`` (run length of the argmax), ``margin`` (top-1 minus top-2 logit) or
            ``confidence`` (largest softmax probability).
    """
    if rule not in EXIT_RULES:
        raise ValueError(f"exit rule must be one of {EXIT_RULES}, got {rule!r}")
    if readout.dim() != 3:
        raise ValueError(f"a readout is [readout steps, images, classes], got shape {tuple(readout.shape)}")
    if rule == "stable":
        top = readout.argmax(-1)  # [R, B]
        run = torch.ones_like(top, dtype=readout.dtype)
        for r in range(1, len(top)):  # R is small (the readout steps): a loop over rows is cheap
            run[r] = torch.where(top[r] == top[r - 1], run[r - 1] + 1, 1)
        return run
    if rule == "margin":
        if readout.shape[-1] < 2:
            raise ValueError("the margin rule needs >= 2 classes; use the stable rule")
        top2 = readout.topk(2, dim=-1).values  # [R, B, 2]
        return top2[..., 0] - top2[..., 1]
    return readout.float().softmax(-1).amax(-1).to(readout.dtype)


def exit_indices(scores: Tensor, thresholds: Tensor, min_row: int = 0) -> Tensor:
    """The readout row each image exits at, for every threshold: the first row from ``min_row`` on
    whose score is ``>= threshold``, else the last row.

    Args:
        scores: ``[R, B]`` (:func:`exit_scores`).
        thresholds: ``[S]``.
        min_row: no image exits before this row (0: any row).

    Returns:
        ``[S, B]`` row indices (long).
    """
    hit = scores.unsqueeze(0) >= thresholds.to(scores).view(-1, 1, 1)  # [S, R, B]
    hit[:, :min_row] = False
    hit[:, -1] = True  # an image that never passes runs to the end
    return hit.to(torch.uint8).argmax(1)  # argmax returns the first maximal index: the first hit


@dataclass
class ExitGrid:
    """The exit settings of one spiking variant: thresholds per rule and the chosen setting.

    ``rules[i]``, ``thresholds[i]`` and ``min_rows[i]`` (no exit before that readout row)
    describe setting ``i``; settings of one rule are contiguous, in :data:`EXIT_RULES` order,
    thresholds ascending (more steps as i grows).
    """

    rules: list[str]
    thresholds: list[float]
    chosen: int
    min_rows: list[int] = field(default_factory=list)  # empty: 0 for every setting
    #: the calibration figures of every setting (fractions / steps), for the report
    calibration: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.min_rows:
            self.min_rows = [0] * len(self.rules)
        if not self.rules or not len(self.rules) == len(self.thresholds) == len(self.min_rows):
            raise ValueError(f"an exit grid needs one rule, threshold and min row per setting, got {len(self.rules)}, "
                             f"{len(self.thresholds)} and {len(self.min_rows)}")
        if not 0 <= self.chosen < len(self.rules):
            raise ValueError(f"chosen setting {self.chosen} is outside the grid's {len(self.rules)} settings")

    def settings(self, rule: str) -> list[int]:
        """The setting indices of one rule."""
        return [i for i, r in enumerate(self.rules) if r == rule]

    def indices(self, readout: Tensor) -> Tensor:
        """The exit row of every image under every setting, ``[S, B]``."""
        out = torch.empty(len(self.rules), readout.shape[1], dtype=torch.long, device=readout.device)
        for rule in EXIT_RULES:
            if not self.settings(rule):
                continue
            scores = exit_scores(readout, rule).double()
            for m in sorted({self.min_rows[i] for i in self.settings(rule)}):
                idx = [i for i in self.settings(rule) if self.min_rows[i] == m]
                th = torch.tensor([self.thresholds[i] for i in idx], dtype=torch.float64)
                out[idx] = exit_indices(scores, th, m)
        return out

    def to_json(self) -> dict[str, Any]:
        c = self.chosen
        return {"rules": self.rules, "thresholds": self.thresholds, "min_rows": self.min_rows, "chosen": c,
                "chosen_rule": self.rules[c], "chosen_threshold": self.thresholds[c],
                "chosen_min_row": self.min_rows[c], "calibration": self.calibration}


class EarlyExit:
    """Calibrates per-image early exit on labelled held-out training images.

    Args:
        rule: which rule the calibration may choose: ``stable``, ``margin``, ``confidence``, or
            ``auto`` (the least-steps setting of any rule). Every rule's curve is reported anyway.
        tolerance: the largest accuracy loss (a fraction: 0.003 = 0.3 points) against the
            reference network, on the calibration images, that the chosen setting may have.
        grid: thresholds per rule for ``margin`` and ``confidence`` (quantiles of the calibration
            scores); ``stable`` takes every k = 1..R.
    """

    def __init__(self, rule: str = "auto", tolerance: float = 0.001, grid: int = 40) -> None:
        if rule not in EXIT_RULES + ("auto",):
            raise ValueError(f"early_exit must be one of {EXIT_RULES + ('auto',)} (or None: no early exit), "
                             f"got {rule!r}")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"exit tolerance is an accuracy fraction in [0, 1) (0.003 = 0.3 points), "
                             f"got {tolerance!r}")
        if grid < 2:
            raise ValueError(f"exit grid must be >= 2 thresholds per rule, got {grid!r}")
        self.rule, self.tolerance, self.grid = rule, float(tolerance), int(grid)

    def _thresholds(self, scores: Tensor) -> list[float]:
        """Quantiles of the calibration scores, and one above every score (every image runs to the end)."""
        s = scores.double().flatten()
        q = torch.quantile(s, torch.linspace(0, 1, self.grid - 1, dtype=torch.float64, device=s.device))
        return sorted(set(q.tolist())) + [float(s.max()) + 1.0]

    @torch.no_grad()
    def calibrate(self, readouts: Sequence[Tensor], references: Sequence[Tensor], labels: Sequence[Tensor],
                  steps: Sequence[int], gather: Callable[[Tensor], Tensor] = lambda x: x) -> ExitGrid:
        """Fix the grid and choose the setting from the readouts of calibration batches.

        ``stable`` gets every k = 1..R. ``margin`` and ``confidence`` get ``grid`` thresholds (quantiles
        of their calibration scores) at one first allowed exit row, the row (searched over all) whose
        admissible setting takes the fewest steps: the first readouts of a rate-coded SNN can be
        confidently wrong (ECMT's t = 1), and a threshold alone cannot tell that apart.

        Args:
            readouts: per batch, the SNN's readout ``[R, B, K]``.
            references: per batch, the reference network's logits ``[B, K]``.
            labels: per batch, the true classes ``[B]``.
            steps: the step t of each readout row (the model's ``readout_steps``).
            gather: concatenates a tensor's first dimension over processes (identity in one
                process): every process then chooses from all the calibration images, so N
                processes choose what one would.
        """
        if not readouts:
            raise ValueError("early-exit calibration got no batches: give calibration images "
                             "(--data.exit_images > 0)")
        readout = gather(torch.cat(list(readouts), 1).transpose(0, 1)).transpose(0, 1)  # [R, N, K]
        ref = gather(torch.cat(list(references))).to(readout.device)
        y = gather(torch.cat(list(labels)).to(readout.device))
        rows = len(readout)
        t = torch.tensor(list(steps), dtype=torch.float64, device=readout.device)
        ref_top1 = float((ref.argmax(-1).to(y) == y).double().mean())
        top = readout.argmax(-1)  # [R, N]

        def figures(grid: ExitGrid) -> dict[str, list[float]]:
            idx = grid.indices(readout)  # [S, N]
            pred = top.gather(0, idx)  # the class of each image's exit readout
            return {"top1": (pred == y).double().mean(1).tolist(),
                    "agreement": (pred == ref.argmax(-1).to(pred)).double().mean(1).tolist(),
                    "mean_steps": t[idx].mean(1).tolist()}

        def admissible(fig: dict[str, list[float]], candidates: list[int]) -> int:
            """The least-steps setting within tolerance, else the most accurate."""
            ok = [i for i in candidates if ref_top1 - fig["top1"][i] <= self.tolerance + 1e-12]
            if ok:
                return min(ok, key=lambda i: (fig["mean_steps"][i], -fig["top1"][i]))
            return max(candidates, key=lambda i: (fig["top1"][i], -fig["mean_steps"][i]))

        rules, thresholds, min_rows = ["stable"] * rows, [float(k) for k in range(1, rows + 1)], [0] * rows
        for rule in EXIT_RULES[1:]:
            th = self._thresholds(exit_scores(readout, rule))
            search = ExitGrid([rule] * (rows * len(th)), th * rows, 0, [m for m in range(rows) for _ in th])
            fig = figures(search)
            best = admissible(fig, list(range(len(search.rules))))
            rules += [rule] * len(th)
            thresholds += th
            min_rows += [search.min_rows[best]] * len(th)
        grid = ExitGrid(rules, thresholds, 0, min_rows)
        fig = figures(grid)
        allowed = [i for i, r in enumerate(rules) if self.rule in ("auto", r)]
        chosen = grid.chosen = admissible(fig, allowed)
        if ref_top1 - fig["top1"][chosen] > self.tolerance + 1e-12:
            log.warning("early exit: no setting is within %.2f points of the reference on the %d calibration "
                        "images (best %.2f vs %.2f %%); the most accurate one is used", 100 * self.tolerance,
                        len(y), 100 * fig["top1"][chosen], 100 * ref_top1)
        grid.calibration = {"images": [float(len(y))], "ref_top1": [ref_top1], **fig}
        mean_steps, top1 = fig["mean_steps"], fig["top1"]
        n = len(y)
        log.info("early exit: %s >= %.4g from step %d, %.2f steps per image on average, %.2f %% (reference "
                 "%.2f %%) on %d calibration images", rules[chosen], thresholds[chosen], int(t[min_rows[chosen]]),
                 mean_steps[chosen], 100 * top1[chosen], 100 * ref_top1, n)
        return grid

