"""Checkpoints: one file per model, written atomically and loaded without unpickling code.

A checkpoint holds plain tensors and plain containers only (``torch.load(weights_only=True)``):
the task and model config needed to rebuild the model, the resolved run config, the weights in
TransformerLens naming, and — for resuming — the optimiser and data-stream state.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch

from addrepro.model.transformer import ModelConfig, Transformer, model_from_checkpoint  # noqa: F401 - part of the checkpoint API
from addrepro.rundir.atomic import atomic_write
from addrepro.rundir.checkpoint_paths import (  # noqa: F401 - part of the checkpoint API
    LAST,
    CheckpointError,
    checkpoint_dir,
    checkpoint_steps,
    find_resume_checkpoint,
    log_spaced_steps,
    resolve_checkpoint,
    resumable_checkpoint,
)

FORMAT = "addrepro-checkpoint/1"


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": FORMAT, **payload}
    # Serialised in memory first: torch's writer reports a full disk as a RuntimeError without the
    # file's name, a plain write as an OSError that atomic_write turns into one line naming the path.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path) -> dict:
    """Load and sanity-check a checkpoint (a file, or a job folder's ``checkpoints/last.ckpt``);
    every failure names the file and what is wrong."""
    path = resolve_checkpoint(path)
    try:
        with warnings.catch_warnings():  # torch warns before refusing pickled code: the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint={path} cannot be read: it holds pickled Python objects, which addrepro never loads "
            "(only tensors and plain containers)"
        ) from None
    except Exception as e:  # truncated or foreign files raise many different errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint={path} cannot be read ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint={path} is not an addrepro checkpoint (format {FORMAT} expected)")
    check_model_structure(ckpt, path)
    return ckpt


def _missing(node: object, keys: dict[str, type], prefix: str = "") -> list[str]:
    """The keys of ``keys`` that ``node`` lacks or holds with another type, as ``prefix.key``."""
    if not isinstance(node, dict):
        return [prefix.rstrip(".") or "the whole checkpoint"]
    return [prefix + k for k, kind in keys.items() if type(node.get(k)) is not kind and not _subtype(node.get(k), kind)]


def _subtype(value: object, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


MODEL_KEYS = {"step": int, "task": dict, "model_config": dict, "model": dict}
RESUME_KEYS = {"config": dict, "optimizer": dict, "data": dict}


def check_model_structure(ckpt: dict, path: str | Path) -> None:
    """Fail with one line naming what is missing when a checkpoint cannot rebuild its model.

    Besides the keys, the weights must be the tensors (names and shapes) of the stored architecture.
    """
    missing = _missing(ckpt, MODEL_KEYS)
    if missing:
        raise CheckpointError(f"checkpoint={path} is incomplete: missing or invalid {', '.join(missing)}")
    try:
        expected = Transformer(ModelConfig(**ckpt["model_config"]), seeds=[0]).member_state_dict(0)
    except Exception as e:  # unknown or impossible architecture keys
        raise CheckpointError(f"checkpoint={path} has an invalid model_config ({type(e).__name__}: {e})") from None
    weights = ckpt["model"]
    absent = [n for n in expected if not isinstance(weights.get(n), torch.Tensor)]
    wrong = [
        f"{n} {tuple(weights[n].shape)} (expected {tuple(t.shape)})"
        for n, t in expected.items()
        if n not in absent and weights[n].shape != t.shape
    ]
    extra = sorted(set(weights) - set(expected))
    if absent or wrong or extra:
        parts = [f"missing weights {', '.join(absent)}"] if absent else []
        parts += [f"wrong shapes {', '.join(wrong)}"] if wrong else []
        parts += [f"unexpected weights {', '.join(extra)}"] if extra else []
        raise CheckpointError(f"checkpoint={path} does not match its model_config: " + "; ".join(parts))


def check_resumable(ckpt: dict, path: str | Path) -> None:
    """Fail with one line when a checkpoint cannot continue a run (e.g. a weights-only ``spike_*.ckpt``)."""
    missing = _missing(ckpt, RESUME_KEYS)
    if not missing:
        missing = _missing(ckpt["optimizer"], {"step_count": int, "moments": dict}, "optimizer.")
    if missing:
        raise CheckpointError(
            f"resume={path} cannot be resumed: missing {', '.join(missing)} "
            "(weights-only checkpoints such as spike_*.ckpt are for analysis; resume from step_N.ckpt or last.ckpt)"
        )


def check_compatible(ckpt: dict, task: dict, model_config: dict, path: str | Path = "") -> None:
    """Fail with the differing keys when a checkpoint does not match the configured run."""
    diffs = [
        f"{section}.{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}"
        for section, theirs, ours in (("data", ckpt["task"], task), ("model", ckpt["model_config"], model_config))
        for k in sorted(set(theirs) | set(ours))
        if theirs.get(k) != ours.get(k)
    ]
    if diffs:
        raise CheckpointError(f"checkpoint={path} does not match the config: " + "; ".join(diffs))
