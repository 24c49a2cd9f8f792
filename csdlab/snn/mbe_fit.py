"""Offline fitting of MBE neurons, once per primitive (docs/methods.md §4.2).

Each primitive of :data:`csdlab.snn.mbe.PRIMITIVES` is fitted on ``M = 10,000`` seeded uniform
points of its domain: initialised at the halving code (``k = ln 2``) with per-basis start values,
output weights and constant by least squares, then gradient descent (Adam, lr 0.01) through the
Heaviside with SpikingJelly's sigmoid surrogate (on ``v / theta_n(t)``, so its width follows each
threshold), keeping the parameters of the lowest exact (Heaviside) MSE; a final least-squares solve
of ``(w, c)`` on the exact spike counts ends it. Everything is float64 on one CPU thread and seeded, so
a refit is deterministic on one machine; across CPUs (vector width, summation order) the rounding and
so Adam's path differ slightly: a refit reproduces the shipped fits' quality (grid MSE within a
fraction of a percent, the same network accuracy), not their bytes.

:func:`fit_all` writes ``mbe_T{T}_N{N}.json`` (all primitives for one ``(T, N)``), the files shipped in
``csdlab/snn/mbe_tables``; ``python convert.py mbe-fit`` calls it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from spikingjelly.activation_based import surrogate
from torch import Tensor

from csdlab.snn.mbe import PRIMITIVES, MBECode, decay, load_codes, run_steps, table_path

__all__ = ["fit_primitive", "fit_all", "initial_code", "mse_on_grid", "FitConfig", "SIGN_MODES", "CODE_VARIANTS",
           "variant_codes", "check_code_variant"]

log = logging.getLogger(__name__)

SIGN_MODES = ("signed", "shift", "banks", "positive")
# the codes a converter can run (docs/mbe.md, "Beyond the paper"): the shipped fits, and one
# departure from the paper's neuron taken back at a time
CODE_VARIANTS = ("fitted", "truncating", "unsigned", "no_offsets")


class FitConfig:
    """Hyper-parameters of one fit.

    Args:
        points: ``M`` fitting points (seeded uniform on the domain).
        steps: Adam steps (full batch).
        lr: Adam learning rate.
        alpha: sharpness of the sigmoid surrogate (on ``v / theta``).
        seed: seed of the fitting points.
        check_every: exact-MSE evaluation period (the best parameters are kept).
    """

    def __init__(self, points: int = 10_000, steps: int = 200, lr: float = 0.01, alpha: float = 4.0,
                 seed: int = 0, check_every: int = 25) -> None:
        self.points, self.steps, self.lr, self.alpha = points, steps, lr, alpha
        self.seed, self.check_every = seed, check_every

    def as_dict(self) -> dict[str, Any]:
        return dict(points=self.points, steps=self.steps, lr=self.lr, alpha=self.alpha, seed=self.seed,
                    check_every=self.check_every)


@contextmanager
def _one_thread() -> Iterator[None]:
    # reductions split over threads change the rounding; one thread makes the fit reproducible
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _geometric(hi: float, lo: float, k: int) -> list[float]:
    if k == 1:
        return [hi]
    return [hi * (lo / hi) ** (j / (k - 1)) for j in range(k)]


def initial_code(primitive: str, T: int, N: int, mode: str | None = None, offsets: bool = True) -> MBECode:
    """Halving-code initialisation with per-basis start values (knots where each basis saturates).

    Args:
        primitive: key of :data:`PRIMITIVES`.
        T: time steps.
        N: bases.
        mode: negative-input handling for GELU / identity (:data:`SIGN_MODES`); default
            ``signed`` for signed primitives, ``shift`` otherwise. ``banks`` uses ``2N`` bases
            (``N`` per sign); ``positive`` codes ``x >= 0`` only (the paper as written).
    """
    prim = PRIMITIVES[primitive]
    mode = mode or ("signed" if prim.signed else "shift")
    if mode not in SIGN_MODES:
        raise ValueError(f"unknown sign mode {mode!r}; choose one of {SIGN_MODES}")
    if mode in ("signed", "banks") and N < 2:
        raise ValueError(f"signed MBE codes need N >= 2 bases, got {N}")
    full = 1.0 / (1.0 - 2.0 ** -T)  # the T-step binary code of [0, 2a) reaches 2a (1 - 2^-T)
    ln2 = math.log(2.0)
    if primitive == "identity" and mode in ("signed", "banks"):
        code = MBECode.halving(T, 2 * N if mode == "banks" else N, 0.0, prim.hi * full, "identity",
                               signed=True, dither=offsets)
        return code
    if mode in ("signed", "banks"):
        k_pos = N if mode == "banks" else N - N // 2
        k_neg = N if mode == "banks" else N // 2
        # knots on each side: positive side up to hi, negative side where f still varies (GELU: ~4)
        neg_span = min(-prim.lo, 4.0) if primitive == "gelu" else -prim.lo
        knots = _geometric(prim.hi * full, prim.hi / 16, k_pos) + _geometric(neg_span, neg_span / 8, k_neg)
        sign = [1.0] * k_pos + [-1.0] * k_neg
        x0 = 0.0
    elif mode == "positive":
        knots, sign, x0 = _geometric(prim.hi * full, prim.hi / 16, N), [1.0] * N, 0.0
    else:  # shift: z = x - lo >= 0, knots spread over the part of the domain where f varies
        span = prim.hi - prim.lo
        if primitive == "gelu":  # knots between x = -6 and x = hi
            knots = [span * full] + [120.0 + v for v in torch.linspace(6.0, -6.0, N)[1:].tolist()]
        else:
            knots = [span * full * (N - j) / N for j in range(N)]
        sign, x0 = [1.0] * N, prim.lo
    n = len(knots)
    start = torch.tensor(knots, dtype=torch.float64) / 2
    lam = torch.full((n,), ln2, dtype=torch.float64)
    code = MBECode(primitive, start, lam, lam, lam, torch.zeros(n), torch.zeros(n), sign, x0, 0.0, T)
    return code


def _points(primitive: str, M: int, seed: int, domain: tuple[float, float] | None = None) -> Tensor:
    lo, hi = domain or (PRIMITIVES[primitive].lo, PRIMITIVES[primitive].hi)
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(M, generator=g, dtype=torch.float64)


def _basis_outputs(code: MBECode, z: Tensor) -> Tensor:
    """Exact per-basis outputs ``o_n(z)`` ``[M, N]`` (weights not applied)."""
    theta, reset, intensity, _, delta, sign, _ = code.constants(torch.float64, "cpu")
    cols = []
    for n in range(code.N):
        one = torch.ones(1, dtype=torch.float64)
        v, _ = run_steps(z, theta[n:n + 1], reset[n:n + 1], intensity[n:n + 1], one, delta[n:n + 1],
                         sign[n:n + 1], torch.zeros((), dtype=torch.float64))
        cols.append(v)
    return torch.stack(cols, 1)


def _least_squares(code: MBECode, x: Tensor, y: Tensor) -> MBECode:
    """Best ``(w, c)`` for the code's spike patterns (the output is linear in them)."""
    feats = _basis_outputs(code, x - code.x0)
    with_bias = code.primitive != "identity"  # identity: c = 0, so its products are pure ANDs
    if with_bias:
        feats = torch.cat([feats, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    # minimum-norm solution (bases that never fire get w = 0)
    sol = torch.linalg.lstsq(feats, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    d = code.to_dict()
    d["weight"], d["bias"] = sol[:code.N].tolist(), float(sol[-1]) if with_bias else 0.0
    return MBECode.from_dict(d)


def _code_from_raw(raw: dict[str, Tensor], base: MBECode) -> MBECode:
    return MBECode(base.primitive, raw["log_start"].exp(), raw["k_th"], raw["k_r"], raw["k_d"], raw["weight"],
                   raw["delta"], base.sign, base.x0, float(raw["bias"]), base.T)


def _exact_mse(code: MBECode, x: Tensor, y: Tensor) -> float:
    return float(((code(x - code.x0, exact_table=False)[0] - y) ** 2).mean())


def fit_primitive(primitive: str, T: int, N: int, config: FitConfig | None = None,
                  mode: str | None = None, offsets: bool = True,
                  domain: tuple[float, float] | None = None) -> tuple[MBECode, dict[str, float]]:
    """Fit one primitive at ``(T, N)``; returns the code and ``{"mse_init", "mse_fit"}`` on the
    fitting points (exact Heaviside). ``mode``: :func:`initial_code`'s sign handling;
    ``offsets=False`` keeps every initial membrane offset ``delta_n`` at 0 (the paper's neuron has
    none). ``domain``: fitting points on this interval instead of the primitive's domain."""
    cfg = config or FitConfig()
    prim = PRIMITIVES[primitive]
    # gradients on, whatever the caller's mode (a converter refits inside Lightning's test loop)
    with _one_thread(), torch.inference_mode(False), torch.enable_grad():
        x = _points(primitive, cfg.points, cfg.seed, domain)
        y = prim.fn(x)
        code = _least_squares(initial_code(primitive, T, N, mode, offsets), x, y)
        mse_init = _exact_mse(code, x, y)
        best, best_mse = code, mse_init
        raw = {"log_start": code.start.log(), "k_th": code.k_th.clone(), "k_r": code.k_r.clone(),
               "k_d": code.k_d.clone(), "weight": code.weight.clone(), "delta": code.delta.clone(),
               "bias": torch.tensor(code.bias, dtype=torch.float64)}
        for v in raw.values():
            v.requires_grad_(True)
        if primitive == "identity":
            raw["bias"].requires_grad_(False)
        if not offsets:
            raw["delta"].requires_grad_(False)
        opt = torch.optim.Adam([v for v in raw.values() if v.requires_grad], lr=cfg.lr)
        sg = surrogate.Sigmoid(alpha=cfg.alpha)
        sign = code.sign
        z = x - code.x0
        for step in range(1, cfg.steps + 1):
            a = raw["log_start"].exp()
            theta, reset, intensity = (decay(a, raw[k], T) for k in ("k_th", "k_r", "k_d"))
            norm = theta.detach()

            # surrogate on v / theta_n(t): the same relative width at every threshold
            def spike_fn(v: Tensor, i: int) -> Tensor:
                return sg(v / norm[:, i].view((-1,) + (1,) * (v.dim() - 1)))

            pred, _ = run_steps(z, theta, reset, intensity, raw["weight"], raw["delta"], sign, raw["bias"],
                                spike_fn=spike_fn)
            loss = ((pred - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % cfg.check_every == 0 or step == cfg.steps:
                with torch.no_grad():
                    cand = _least_squares(_code_from_raw({k: v.detach() for k, v in raw.items()}, code), x, y)
                    mse = _exact_mse(cand, x, y)
                if mse < best_mse:
                    best, best_mse = cand, mse
    return best, {"mse_init": mse_init, "mse_fit": best_mse}


def mse_on_grid(code: MBECode, points: int = 100_001, lo: float | None = None, hi: float | None = None,
                dtype: torch.dtype = torch.float64) -> float:
    """MSE of the code (exact table) against its primitive on a uniform grid of its domain."""
    prim = PRIMITIVES[code.primitive]
    x = torch.linspace(prim.lo if lo is None else lo, prim.hi if hi is None else hi, points, dtype=dtype)
    if hi is None and code.primitive == "exp2":
        x = x[:-1]  # [0, 1): 2^x on a half-open domain
    return float(((code(x - code.x0)[0] - prim.fn(x)) ** 2).mean())


def fit_all(out_dir: Path | str | None = None, Ts: Sequence[int] = (2, 3, 4, 8, 10, 12, 16), Ns: Sequence[int] = (4, 8),
            primitives: Iterable[str] | None = None, config: FitConfig | None = None) -> dict[str, Any]:
    """Fit every primitive for every ``(T, N)`` and write ``mbe_T{T}_N{N}.json`` files.

    Args:
        out_dir: where to write; ``None`` writes the package's shipped folder.
        Ts: time steps.
        Ns: bases.
        primitives: default all of :data:`PRIMITIVES`.
        config: fitting hyper-parameters.

    Returns:
        ``{"T{T}_N{N}": {primitive: {"mse_fit", "mse_grid"}}}`` and the written paths under ``"files"``.
    """
    cfg = config or FitConfig()
    names = list(primitives or PRIMITIVES)
    summary: dict[str, Any] = {"files": []}
    for T in Ts:
        for N in Ns:
            codes, stats = {}, {}
            for name in names:
                code, info = fit_primitive(name, T, N, cfg)
                codes[name] = code.to_dict()
                stats[name] = {"mse_fit": info["mse_fit"], "mse_grid": mse_on_grid(code)}
                log.info("MBE fit T=%d N=%d %s: mse %.3g (init %.3g), grid %.3g", T, N, name, info["mse_fit"],
                         info["mse_init"], stats[name]["mse_grid"])
            path = (table_path(T, N) if out_dir is None else Path(out_dir) / f"mbe_T{T}_N{N}.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"T": T, "N": N, "fit": cfg.as_dict(), "codes": codes}
            path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
            summary[f"T{T}_N{N}"] = stats
            summary["files"].append(str(path))
    return summary


@functools.lru_cache(maxsize=64)
def _refit(primitive: str, T: int, N: int, mode: str | None, offsets: bool) -> MBECode:
    # the default FitConfig, as the shipped tables; cached per process (a refit takes seconds to a minute)
    code, info = fit_primitive(primitive, T, N, mode=mode, offsets=offsets)
    log.info("MBE refit T=%d N=%d %s (mode %s, offsets %s): mse %.3g", T, N, primitive, mode, offsets,
             info["mse_fit"])
    return code


def check_code_variant(variant: str) -> str:
    """``variant`` if it is one of :data:`CODE_VARIANTS`; else a ValueError naming the choices."""
    if variant not in CODE_VARIANTS:
        raise ValueError(f"unknown MBE code variant {variant!r}: choose one of {CODE_VARIANTS}")
    return variant


def variant_codes(T: int, N: int, variant: str = "fitted", table_dir: Path | str | None = None) -> dict[str, MBECode]:
    """The codes of every primitive at ``(T, N)`` for one of :data:`CODE_VARIANTS`.

    * ``fitted``: the shipped (or ``table_dir``) fits.
    * ``truncating``: identity neurons run the plain ``T``-bit truncating binary code (halving,
      equal bases, no offsets: the paper's neuron for ``x``); the other primitives as fitted.
    * ``unsigned``: identity and GELU refitted with positive bases only: the identity with its
      inputs shifted by the domain's lower end (:func:`initial_code` mode ``shift``, the way
      ``2^x``, ``1/x``, ``1/sqrt(x)`` are coded), GELU coding ``x >= 0`` only (mode ``positive``,
      the paper as written and the better unsigned GELU: docs/mbe.md, "Negative inputs").
    * ``no_offsets``: every primitive refitted with its initial membrane offsets fixed at 0.

    Refits use the default :class:`FitConfig` (as the shipped tables) and are cached per process.
    """
    check_code_variant(variant)
    codes = dict(load_codes(T, N, table_dir))
    if variant == "truncating":
        codes["identity"] = initial_code("identity", T, N, offsets=False)
    elif variant == "unsigned":
        codes["identity"] = _refit("identity", T, N, "shift", True)
        codes["gelu"] = _refit("gelu", T, N, "positive", True)
    elif variant == "no_offsets":
        codes.update({p: _refit(p, T, N, None, False) for p in codes})
    return codes
