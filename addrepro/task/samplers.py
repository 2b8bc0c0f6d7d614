"""Training distributions: which operand pairs a stream of fresh batches draws (``data.sampler``).

* ``uniform`` (the default): independent uniform digits, i.e. uniform operands.
* ``carry_enriched``: Quirke & Barez's generator. A share ``data.enrich_batches`` of batches is
  enriched: in it, a share ``data.enrich_digits`` of all (example, digit) positions, picked without
  replacement, get one operand digit rewritten so that the pair sums to base − 1 (an MS9 pair that
  passes a carry on), the same operand for the whole batch, chosen by a coin. Their library enriches
  40% of batches at 40% of positions (the defaults); their first paper's notebook 20% at 20%.
* ``carry_balanced``: every carry-complexity class S0…Sn equally often, each sum uniform within its
  class (``addrepro.task.complexity``): long carry cascades, rare under uniform operands, are as
  common as no carry at all.
* ``curriculum``: uniform sums restricted to the classes up to S_m, m growing by one every
  ``data.curriculum_steps`` draws from S1 (S0 and S1 at the start) to Sn.

Every sampler draws on the stream's device from the stream's generator alone, with fixed shapes and
no host synchronisation (a CUDA graph records it with the step), so runs, stacked ensembles and
resumes are reproducible from ``data.seed``. Held-out sets and every logged metric stay on the uniform
distribution (the carry-conditioned sets on their own conditions); only training batches change.
"""

from __future__ import annotations

import torch

from addrepro.task.complexity import ClassSampler, class_frequencies
from addrepro.task.encoding import sample_operands
from addrepro.task.spec import SAMPLERS, SamplerSpec, TaskSpec


class OperandSampler:
    """Draws the operands of one batch ``(B, n)`` each, place-indexed, for a ``SamplerSpec``."""

    def __init__(self, spec: TaskSpec, sampler: SamplerSpec, batch_size: int, device: torch.device):
        if sampler.name not in SAMPLERS:
            raise ValueError(f"sampler {sampler.name!r} is not one of {', '.join(SAMPLERS)}")
        self.spec, self.sampler, self.batch_size, self.device = spec, sampler, batch_size, device
        if sampler.name in ("carry_balanced", "curriculum"):
            self.classes = ClassSampler(spec, device)
            freq = torch.tensor(class_frequencies(spec.n_digits, spec.base), dtype=torch.float64)
            self.class_freq = freq.to(device)  # (n+1,)

    def draw(self, g: torch.Generator, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``draws``: how many batches the stream drew before this one (a device scalar)."""
        name, spec = self.sampler.name, self.spec
        if name == "uniform":
            return sample_operands(spec, self.batch_size, g, self.device)
        if name == "carry_enriched":
            return self.enriched(g)
        n = spec.n_digits
        classes = torch.arange(n + 1, device=self.device)
        if name == "carry_balanced":
            weights = torch.ones(n + 1, dtype=torch.float64, device=self.device)
        else:  # curriculum: S0..S_m, m = 1 + draws // curriculum_steps, as often as in uniform sums
            top = (1 + torch.div(draws, self.sampler.curriculum_steps, rounding_mode="floor")).clamp(max=n)
            weights = self.class_freq * (classes <= top)
        cdf = torch.cumsum(weights, 0)
        u = torch.rand(self.batch_size, 1, generator=g, device=self.device, dtype=torch.float64)
        k = (u * cdf[-1] >= cdf).sum(-1).clamp(max=n)  # (B,) inverse CDF
        return self.classes.draw(k, g)

    def enriched(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        spec, size = self.spec, self.batch_size
        n, top = spec.n_digits, spec.base - 1
        a, b = sample_operands(spec, size, g, self.device)
        flags = torch.rand(2, generator=g, device=self.device)  # enrich this batch?, which operand
        keys = torch.rand(size * n, generator=g, device=self.device)
        picked = int(self.sampler.enrich_digits * size * n)
        # Positions without replacement, a fixed count; scattered, as an assignment of True would build
        # a tensor from Python data on every draw (a host-to-device copy a CUDA graph cannot record).
        mask = torch.zeros(size * n, dtype=torch.bool, device=self.device).scatter_(0, keys.argsort()[:picked], True)
        mask = mask.view(size, n) & (flags[0] < self.sampler.enrich_batches)
        first = flags[1] < 0.5
        return torch.where(mask & first, top - b, a), torch.where(mask & ~first, top - a, b)
