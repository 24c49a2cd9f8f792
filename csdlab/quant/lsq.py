"""Activation quantizers for conversion-oriented QAT (docs/methods.md §1.2).

Both quantizers compute ``s * clip(floor(x / s + 1/2), 0, L)`` and expose the same interface
(``levels``, ``step``, ``threshold``) so that conversion treats them alike:

* :class:`LSQQuantizer` learns the step ``s`` (LSQ: statistical init + gradient scaling);
* :class:`QCFSQuantizer` learns the clip ``lam = s * L`` (QCFS, Bu et al. 2022).

Speed: in a training step (training mode, gradients on) the LSQ quantizer runs as one
``torch.compile``-d loop forward and one backward (:mod:`csdlab.compiling`), falling back to eager
ops where compiling is impossible. Switch it per model with :func:`set_compile` or for the
process with the environment variable ``CSDLAB_COMPILE=0``; eval mode always runs eagerly, so
evaluation never waits for a compiler. Both paths give the same values (bit for bit forward, the
same analytic gradients up to summation order).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from csdlab.compiling import COMPILE_ENV, CompiledKernel
from csdlab.quant.ste import round_half_up_ste

__all__ = ["ActQuantizer", "LSQQuantizer", "QCFSQuantizer", "make_activation", "ACTIVATIONS", "set_compile",
           "compile_enabled", "COMPILE_ENV"]


def _check_levels(levels: int) -> int:
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"quantization levels L must be an integer >= 1, got {levels!r}")
    return levels


class ActQuantizer(nn.Module):
    """Common interface of the activation quantizers: ``step`` s, ``levels`` L, ``threshold`` s*L."""

    levels: int

    @property
    def step(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def threshold(self) -> Tensor:
        """Clip value s*L; becomes the firing threshold of the neuron that replaces this quantizer."""
        return self.step * self.levels

    def extra_repr(self) -> str:
        return f"levels={self.levels}, step={float(self.step.detach()):.4g}"


def _lsq_forward(x: Tensor, step: Tensor, levels: int) -> Tensor:
    """``s * clip(floor(x/s + 1/2), 0, L)``, the op order of :class:`_LSQFunction`'s eager forward
    (so the compiled kernel rounds exactly like it: no FMA contraction, no reciprocal)."""
    v = x / step
    return (v + 0.5).floor().clamp(0, levels) * step


def _lsq_backward(grad: Tensor, x: Tensor, step: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """``(dL/dx, sum of dL/dy * dy/ds)`` from the input alone (Esser et al. 2020, eq. 3-5, before g)."""
    v = x / step
    inside = (v >= 0) & (v <= levels)
    q = (v + 0.5).floor().clamp(0, levels)
    # d y / d x = 1 inside [0, L s] (straight-through), 0 outside; a product, not a select, so a
    # NaN gradient stays NaN as in the eager path
    grad_x = grad * inside
    # d y / d s = round(v) - v inside, L above, 0 below (= q there)
    grad_s = (grad * torch.where(inside, q - v, q)).sum()
    return grad_x, grad_s


# one loop each instead of five / six eager passes (csdlab.compiling: eager fallback, CSDLAB_COMPILE)
_FORWARD = CompiledKernel(_lsq_forward)
_BACKWARD = CompiledKernel(_lsq_backward)


def compile_enabled() -> bool:
    """Whether training steps may use the compiled LSQ kernels now: not when the environment
    variable ``CSDLAB_COMPILE`` is ``0``, nor after compiling them failed in this process."""
    return _FORWARD.usable and _BACKWARD.usable


class _LSQFunction(torch.autograd.Function):
    """Fused LSQ forward/backward with the gradients of Esser et al. 2020 (eq. 3-5).

    Autograd through clamp/floor/STE helpers costs about six elementwise passes more per call; QAT
    runs this after every layer, so it is worth the hand-written backward. With ``fused`` the
    forward and backward are one compiled loop each (``_FORWARD`` / ``_BACKWARD``) and only the
    input is saved (the kernels take it flattened: one graph serves every quantizer); otherwise
    eager ops, saving ``x/s`` and the level.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, levels: int, g: float, fused: bool) -> Tensor:
        ctx.levels, ctx.g, ctx.fused = levels, g, fused
        if fused:
            ctx.save_for_backward(x, step)
            return _FORWARD(x.reshape(-1), step, levels).view(x.shape)
        v = x / step
        q = (v + 0.5).floor_().clamp_(0, levels)  # round half up, then clip to [0, L]
        ctx.save_for_backward(v, q)
        return q * step

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        if ctx.fused:
            x, step = ctx.saved_tensors
            grad_x, grad_s = _BACKWARD(grad.reshape(-1), x.reshape(-1), step, ctx.levels)
            return grad_x.view(x.shape), (grad_s * ctx.g).reshape(()).to(grad.dtype), None, None, None
        v, q = ctx.saved_tensors
        # d y / d x = 1 inside [0, L s] (straight-through), 0 outside
        grad_x = grad * ((v >= 0) & (v <= ctx.levels))
        # d y / d s = round(v) - v inside, L above, 0 below  ==  q - v * inside;
        # summed against grad as two dot products (one pass each)
        grad_s = (torch.dot(grad.flatten(), q.flatten()) - torch.dot(grad_x.flatten(), v.flatten())) * ctx.g
        return grad_x, grad_s.reshape(()).to(grad.dtype), None, None, None


class LSQQuantizer(ActQuantizer):
    """y = s * clamp(floor(x/s + 1/2), 0, L) with a learned step s (LSQ, Esser et al. 2020, eq. 1-3).

    Args:
        levels: number of non-zero levels L (= time steps T after conversion).
        compile_kernels: run training steps through the compiled kernels (:func:`set_compile`); the
            values are the same either way.
    """

    def __init__(self, levels: int = 4, compile_kernels: bool = True) -> None:
        super().__init__()
        self.levels = _check_levels(levels)
        self.compile_kernels = bool(compile_kernels)  # a speed switch, not state: never saved
        self.step_size = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def step(self) -> Tensor:
        return self.step_size

    @torch.no_grad()
    def _init_step(self, x: Tensor) -> None:
        # s0 = 2 mean|x| / sqrt(L); averaged over ranks so every DDP replica starts identical.
        s0 = 2 * x.abs().mean() / math.sqrt(self.levels)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(s0)
            s0 /= dist.get_world_size()
        self.step_size.copy_(s0.clamp_min(1e-8))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.initialized):
            self._init_step(x)
        # compiled kernels in training steps only (where the passes add up, forward and backward);
        # evaluation stays eager and never waits for a compiler
        fused = self.compile_kernels and self.training and torch.is_grad_enabled() and compile_enabled()
        # gradient scale g = 1 / sqrt(numel per sample * L)
        return _LSQFunction.apply(x, self.step_size, self.levels, 1.0 / math.sqrt(x[0].numel() * self.levels),
                                  fused)


class QCFSQuantizer(ActQuantizer):
    """y = lam * clamp(floor(x L / lam + 1/2) / L, 0, 1) with a learned clip lam (QCFS, Bu et al. 2022).

    Equals :class:`LSQQuantizer` with ``s = lam / L`` (no gradient scaling, fixed init).

    Args:
        levels: number of non-zero levels L.
        init_clip: initial lam (QCFS uses 8).
    """

    def __init__(self, levels: int = 4, init_clip: float = 8.0) -> None:
        super().__init__()
        self.levels = _check_levels(levels)
        if not init_clip > 0:
            raise ValueError(f"init_clip must be > 0, got {init_clip}")
        self.clip = nn.Parameter(torch.tensor(float(init_clip)))

    @property
    def step(self) -> Tensor:
        return self.clip / self.levels

    def forward(self, x: Tensor) -> Tensor:
        lam = self.clip
        return round_half_up_ste(torch.clamp(x * self.levels / lam, 0, self.levels)) * lam / self.levels


def set_compile(model: nn.Module, enabled: bool) -> int:
    """Turn the compiled training kernels of every :class:`LSQQuantizer` in ``model`` on or off.

    Returns the number of quantizers switched (the environment variable ``CSDLAB_COMPILE=0`` still
    overrides ``enabled=True``).
    """
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    for q in quantizers:
        q.compile_kernels = bool(enabled)
    return len(quantizers)


ACTIVATIONS = ("relu", "lsq", "qcfs")


def make_activation(kind: str, levels: int = 4) -> nn.Module:
    """Build the activation that sits before every linear layer: ``relu``, ``lsq`` or ``qcfs``."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "lsq":
        return LSQQuantizer(levels)
    if kind == "qcfs":
        return QCFSQuantizer(levels)
    raise ValueError(f"unknown activation {kind!r}; choose one of {ACTIVATIONS}")
