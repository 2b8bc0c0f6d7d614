"""The local learning coefficient (LLC) of a model at its weights, estimated by SGLD sampling.

Singular learning theory's learning coefficient λ measures how many effective directions the loss
has around a minimum: near w*, the volume of {w : L(w) − L(w*) < ε} scales as ε^λ, so a regular
quadratic direction counts 1/2, a direction where the loss rises as w⁴ counts 1/4 and a flat one 0.
The estimator (Lau et al., "Quantifying degeneracy in singular models via the learning coefficient",
as in the ``devinterp`` library) samples the tempered, localised posterior

    p(w) ∝ exp(−nβ L(w) − γ/2 ‖w − w*‖²),   nβ = n / log n,

with stochastic-gradient Langevin dynamics and reports λ̂ = nβ (E_p[L(w)] − L(w*)).

Each SGLD step, on a fresh batch B_t:

    w ← w − ε/2 (nβ ∇L_B(w) + γ (w − w*)) + N(0, ε)

and its draw is L_B(w_t) − L_B(w*): the loss difference on the same batch, which removes the batch's
own noise from the difference (one more forward pass at w* per draw). Draws start after ``burn_in``
steps of each chain; the chains' estimates and their spread are reported with diagnostics that say
when the settings are off: chains whose loss difference is still rising in their second half (ε too
large or γ too small, the chains drifting away; judged over the independent chains), a negative
estimate (the chain found lower loss: w* is not a local minimum at this temperature), a non-finite loss.

``masks`` restrict the sampling to part of the weights (one head, the MLP): the rest stay at w*, and
λ̂ is then the learning coefficient of the loss as a function of that part alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

# One-sided 99.5% points of Student's t by degrees of freedom (beyond: about 2.6).
T_995 = {1: 63.66, 2: 9.925, 3: 5.841, 4: 4.604, 5: 4.032, 6: 3.707, 7: 3.499, 8: 3.355, 9: 3.250, 10: 3.169,
         15: 2.947, 20: 2.845, 30: 2.750}  # fmt: skip
T_995.update({df: T_995[max(k for k in T_995 if k <= df)] for df in range(11, 31) if df not in T_995})


@dataclass(frozen=True)
class SGLDSettings:
    n: int = 1000  # the nominal sample size: nβ = n / log n
    eps: float = 3e-4  # SGLD step size ε
    gamma: float = 100.0  # localisation strength γ
    chains: int = 4
    draws: int = 200  # steps per chain that are counted
    burn_in: int = 100  # steps per chain before counting
    seed: int = 0

    @property
    def n_beta(self) -> float:
        return self.n / math.log(self.n)

    def as_dict(self) -> dict:
        return {**asdict(self), "n_beta": self.n_beta}


def estimate_llc(
    params: list[torch.nn.Parameter],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    next_batch: Callable[[], torch.Tensor],
    settings: SGLDSettings,
    masks: list[torch.Tensor | None] | None = None,
) -> dict:
    """λ̂ at the current values of ``params`` (restored afterwards): ``loss_of(batch)`` is the mean loss
    on a batch, ``next_batch()`` draws one. ``masks[i]`` (same shape as ``params[i]``, 0/1; None: all)
    selects the weights that move. Returns the estimate, its standard error over chains, each chain's
    estimate and loss-difference trace, and the diagnostics."""
    s = settings
    if s.chains < 1 or s.draws < 1 or s.burn_in < 0:
        raise ValueError(
            f"SGLD needs chains >= 1, draws >= 1 and burn_in >= 0 (got {s.chains}, {s.draws}, {s.burn_in})"
        )
    masks = masks or [None] * len(params)
    centre = [p.detach().clone() for p in params]
    gen = torch.Generator(device=centre[0].device).manual_seed(s.seed)
    chains, traces = [], []
    try:
        for _ in range(s.chains):
            with torch.no_grad():
                for p, w in zip(params, centre, strict=True):
                    p.copy_(w)
            trace = []
            for t in range(s.burn_in + s.draws):
                batch = next_batch()
                for p in params:
                    p.grad = None
                loss = loss_of(batch)
                if not torch.isfinite(loss):
                    trace.append(math.nan)
                    break
                loss.backward()
                if t >= s.burn_in:
                    trace.append(float(loss.detach()) - centre_loss(params, centre, loss_of, batch))
                with torch.no_grad():
                    for p, w, m in zip(params, centre, masks, strict=True):
                        grad = p.grad if p.grad is not None else torch.zeros_like(p)
                        drift = s.n_beta * grad + s.gamma * (p - w)
                        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
                        step = -0.5 * s.eps * drift + math.sqrt(s.eps) * noise
                        # where, not a product: a non-finite step times 0 would still move a held weight
                        p.add_(step if m is None else torch.where(m.bool(), step, torch.zeros_like(step)))
            traces.append(trace)
            chains.append(
                s.n_beta * (sum(trace) / len(trace)) if trace and all(map(math.isfinite, trace)) else math.nan
            )
    finally:
        with torch.no_grad():
            for p, w in zip(params, centre, strict=True):
                p.copy_(w)
                p.grad = None
    finite = [c for c in chains if math.isfinite(c)]
    mean = sum(finite) / len(finite) if finite else math.nan
    spread = math.sqrt(sum((c - mean) ** 2 for c in finite) / (len(finite) - 1)) if len(finite) > 1 else math.nan
    return {
        "llc": mean,
        "llc_se": spread / math.sqrt(len(finite)) if len(finite) > 1 else math.nan,
        "chains": chains,
        "traces": traces,
        "diagnostics": diagnostics(chains, traces, s),
        "settings": s.as_dict(),
    }


@torch.no_grad()
def centre_loss(params: list, centre: list, loss_of: Callable, batch: torch.Tensor) -> float:
    """``loss_of(batch)`` at w*, leaving ``params`` where they were."""
    here = [p.detach().clone() for p in params]
    for p, w in zip(params, centre, strict=True):
        p.copy_(w)
    value = float(loss_of(batch))
    for p, h in zip(params, here, strict=True):
        p.copy_(h)
    return value


def diagnostics(chains: list[float], traces: list[list[float]], s: SGLDSettings) -> list[str]:
    """Plain-language warnings about a sampling run (empty: nothing looked wrong)."""
    out = []
    if any(not math.isfinite(c) for c in chains):
        out.append("a chain reached a non-finite loss: lower llc.eps or raise llc.gamma")
    # A stationary chain's two halves agree to within their noise; drifting chains keep climbing. The
    # chains are independent, so the rise from the first half to the second is judged by its spread
    # over chains (the draws within a chain are correlated), against the one-sided 99.5% point of
    # Student's t for that many chains.
    whole = [t for t in traces if len(t) >= 4 and all(map(math.isfinite, t))]
    if len(whole) < 2:
        out.append("drift not checked: that needs 2 or more finite chains of 4 or more draws")
    else:
        halves = [
            (sum(t[: len(t) // 2]) / (len(t) // 2), sum(t[len(t) // 2 :]) / (len(t) - len(t) // 2)) for t in whole
        ]
        rises = [b - a for a, b in halves]
        mean = sum(rises) / len(rises)
        se = (sum((r - mean) ** 2 for r in rises) / (len(rises) - 1)) ** 0.5 / math.sqrt(len(rises))
        level = abs(sum(a for a, _ in halves) / len(halves))
        # Either the mean rise is clear of its spread, or every one of six or more chains rose (a chance of
        # 1 in 64 or less for stationary chains).
        clear = mean > T_995.get(len(rises) - 1, 2.6) * se or (len(rises) >= 6 and all(r > 0 for r in rises))
        if clear and mean > 0.1 * level:
            out.append(
                f"the chains' loss difference still rises from their first half to their second (by {mean:.3g}, "
                f"{mean / se if se > 0 else math.inf:.1f} standard errors): raise llc.burn_in, lower llc.eps or "
                "raise llc.gamma"
            )
    if any(math.isfinite(c) and c < 0 for c in chains):
        out.append("a chain's estimate is negative: it found lower loss than w* (not a local minimum at this nβ)")
    return out
