"""Shared pieces of the analyses: the subject (exported model + task), eval sets, losses, output files.

Positions: the model reads every token but the last, so the answer digit emitted at emission index
``e`` is predicted at input position ``answer_start - 1 + e``. Everything returned here is
place-indexed (``[..., j]`` is place j: 0 = units, n = carry-out), as in ``addrepro.metrics.place``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from addrepro.model.export import to_transformer_lens
from addrepro.model.transformer import layer_norm
from addrepro.rundir.atomic import atomic_write, atomic_write_text
from addrepro.rundir.checkpoints import load_checkpoint, resolve_checkpoint
from addrepro.task.encoding import carries_in, operands_from_tokens
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec
from addrepro.task.streams import configured_validation_tokens

Hook = tuple[str, Callable]


@dataclass
class Subject:
    """One exported model with its task, the checkpoint it came from and its evaluation sets."""

    bridge: Any
    spec: TaskSpec
    ckpt: dict = field(default_factory=dict)
    path: Path | None = None
    val_tokens: torch.Tensor | None = None
    carry_sets: CarrySets | None = None

    @property
    def step(self) -> int | None:
        return self.ckpt.get("step")

    @property
    def n_layers(self) -> int:
        return self.bridge.cfg.n_layers

    @property
    def n_heads(self) -> int:
        return self.bridge.cfg.n_heads

    @property
    def has_mlp(self) -> bool:
        return not self.bridge.cfg.attn_only

    @property
    def has_ln(self) -> bool:
        return self.bridge.cfg.normalization_type is not None

    def head_names(self) -> list[str]:
        return [f"L{layer}H{h}" for layer in range(self.n_layers) for h in range(self.n_heads)]


def load_subject(
    source: str | Path | dict, val_size: int | None = None, carry_size: int = 128, chain_size: int = 64
) -> Subject:
    """Load a checkpoint, export it and build its validation and carry-conditioned sets.

    ``val_size``: None uses the run's own validation set (same seed and size as in training);
    a number keeps only its first ``val_size`` sequences.
    """
    path = resolve_checkpoint(source) if isinstance(source, (str, Path)) else None
    ckpt = load_checkpoint(path) if path is not None else source
    bridge = to_transformer_lens(ckpt)
    spec = bridge.addrepro_spec
    val = run_validation_tokens(ckpt, spec)
    if val_size is not None:
        val = val[:val_size]
    return Subject(bridge, spec, ckpt, path, val, CarrySets.build(spec, carry_size, chain_size))


def run_validation_tokens(ckpt: dict, spec: TaskSpec) -> torch.Tensor:
    """The held-out set the run validated on, rebuilt from the run config stored in the checkpoint."""
    return configured_validation_tokens(ckpt.get("config", {}), spec)


def answer_positions(spec: TaskSpec) -> list[int]:
    """Input position predicting each place, place-indexed."""
    return [spec.answer_start - 1 + e for e in spec.emission_index]


def answer_targets(tokens: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Correct digit of every place ``(B, n+1)``."""
    return tokens[:, [spec.answer_start + e for e in spec.emission_index]]


def naive_digits(tokens: torch.Tensor, spec: TaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per place ``(B, n+1)``: the naive sum ``(a_j + b_j) mod base`` (0 for the carry-out place) and
    the true carry into the place. The answer is ``(naive + carry) mod base``."""
    a, b = operands_from_tokens(tokens, spec)
    naive = torch.remainder(a + b, spec.base)
    naive = torch.cat([naive, torch.zeros_like(naive[:, :1])], dim=1)
    return naive, carries_in(a, b, spec)


def inputs(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, :-1]


@torch.no_grad()
def answer_logits(bridge: Any, tokens: torch.Tensor, spec: TaskSpec, fwd_hooks: Sequence[Hook] = ()) -> torch.Tensor:
    """Logits at the answer positions ``(B, n+1, base)``, place-indexed, optionally under hooks."""
    if fwd_hooks:
        logits = bridge.run_with_hooks(inputs(tokens), fwd_hooks=list(fwd_hooks))
    else:
        logits = bridge(inputs(tokens))
    return logits[:, answer_positions(spec)].float()


def subject_logits(subject: Subject, tokens: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Answer logits ``(N, n+1, base)`` of the subject's model, in chunks (every pair of 3-digit operands
    is 10^6 sequences)."""
    return torch.cat(
        [answer_logits(subject.bridge, tokens[i : i + chunk], subject.spec) for i in range(0, len(tokens), chunk)]
    )


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every answer digit ``(B, n+1)``."""
    return -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


@torch.no_grad()
def unembed(bridge: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits of final-residual vectors ``(..., d_model)``: the final LayerNorm (if any), then W_U, b_U."""
    state = bridge.state_dict()
    if bridge.cfg.normalization_type is not None:
        resid = layer_norm(resid, state["ln_final.weight"], state["ln_final.bias"], bridge.cfg.eps)
    return resid @ bridge.W_U + bridge.b_U


# -- evaluation on the validation set and the carry-conditioned sets ---------------------------------


@dataclass
class EvalBatch:
    """Validation and carry-set sequences in one tensor, so one forward pass evaluates both."""

    tokens: torch.Tensor
    n_val: int
    slices: dict[str, tuple[int, int, int]]  # carry set name -> (place, start, stop) within tokens

    @classmethod
    def of(cls, subject: Subject) -> EvalBatch:
        sets = subject.carry_sets
        carry_tokens = sets.tokens if sets is not None else subject.val_tokens[:0]
        n_val = len(subject.val_tokens)
        slices = {k: (j, n_val + lo, n_val + hi) for k, (j, lo, hi) in (sets.slices if sets else {}).items()}
        return cls(torch.cat([subject.val_tokens, carry_tokens]), n_val, slices)

    def losses(self, losses: torch.Tensor) -> dict:
        """``{"val": [loss of place j], "carry": {set: loss at its place}}`` from ``(B, n+1)`` losses."""
        return {
            "val": losses[: self.n_val].mean(0).tolist(),
            "carry": {k: losses[lo:hi, j].mean().item() for k, (j, lo, hi) in self.slices.items()},
        }


def loss_delta(after: dict, before: dict) -> dict:
    return {
        "val": [a - b for a, b in zip(after["val"], before["val"], strict=True)],
        "carry": {k: after["carry"][k] - before["carry"][k] for k in before["carry"]},
    }


# -- output files ------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors and arrays become lists, NaN/inf become None."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def subject_info(subject: Subject) -> dict:
    return {
        "checkpoint": str(subject.path) if subject.path else None,
        "step": subject.step,
        "task": asdict(subject.spec),
        "n_val": None if subject.val_tokens is None else len(subject.val_tokens),
    }


def analysis_title(result: dict, what: str) -> str:
    """A figure title naming the analysis, the step, the run and the task."""
    path = Path(result["checkpoint"]) if result.get("checkpoint") else None
    run = ""
    if path is not None:  # <job>/checkpoints/<name>.ckpt names the job; anything else, itself
        run = f" of {path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else f" of {path.name}"
    task = result.get("task") or {}
    if task:
        run += f" — {task['n_digits']}-digit base {task['base']} ({task['order']}, {task['task']})"
    step = f", step {result['step']}" if result.get("step") is not None else ""
    return f"{what}{step}{run}"


def write_outputs(result: dict, figure: Any, stem: Path) -> list[Path]:
    """Write ``<stem>.json`` and (when a figure is given) ``<stem>.png``; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Through temporary files: a kill mid-write never leaves a torn result that looks whole.
    json_path = atomic_write_text(stem.with_suffix(".json"), json.dumps(jsonable(result), indent=1))
    paths = [json_path]
    if figure is not None:
        png = stem.with_suffix(".png")
        atomic_write(png, lambda f: figure.savefig(f, format="png", dpi=100, bbox_inches="tight"))
        plt.close(figure)
        paths.append(png)
    return paths


def new_figure(n_rows: int, n_cols: int, width: float = 4.0, height: float = 3.0) -> tuple[Any, np.ndarray]:
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return fig, axes
