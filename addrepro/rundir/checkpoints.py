"""Checkpoints: one file per model, written atomically and loaded without unpickling code.

A checkpoint holds plain tensors and plain containers only (``torch.load(weights_only=True)``):
the task and model config needed to rebuild the model, the resolved run config, the weights in
TransformerLens naming, and — for resuming — the optimiser and data-stream state.
"""

from __future__ import annotations

import io
import pickle
import re
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
from addrepro.task.spec import TaskSpec

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
    except pickle.UnpicklingError as e:
        if "global" not in str(e):  # no class or function named in it: not a pickle of objects at all
            raise CheckpointError(f"checkpoint={path} is not a checkpoint file (not written by torch.save)") from None
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
    try:  # the task a weights file was trained on, as stored: it may have been edited
        TaskSpec(**ckpt["task"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint={path} holds an invalid task ({e})") from None
    if ckpt["step"] < 0:
        raise CheckpointError(f"checkpoint={path} holds step {ckpt['step']} (must be >= 0)")
    problem = header_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint={path} {problem}")
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


MAX_PARAMETERS = 2 * 10**9  # far above these models; a model_config edited past it would exhaust memory
SIZE_KEYS = ("d_vocab", "d_vocab_out", "n_ctx", "d_model", "n_layers", "n_heads", "d_head", "d_mlp")
WANDB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def header_problem(ckpt: dict) -> str | None:
    """What is wrong with a checkpoint's header (architecture sizes, stored config, W&B identity)."""
    mc = ckpt["model_config"]
    sizes = {k: mc.get(k) for k in SIZE_KEYS if k in mc}
    bad = next((k for k, v in sizes.items() if not _subtype(v, int) or v < 1), None)
    if bad:
        return f"has an invalid model_config ({bad}={sizes[bad]!r}, a positive integer expected)"
    d, layers, heads = sizes.get("d_model", 128), sizes.get("n_layers", 1), sizes.get("n_heads", 4)
    per_layer = 4 * d * heads * sizes.get("d_head", 32) + 2 * d * sizes.get("d_mlp", 512)
    count = layers * per_layer + d * (sizes.get("d_vocab", 12) + sizes.get("d_vocab_out", 10) + sizes.get("n_ctx", 18))
    if count > MAX_PARAMETERS:
        return f"has a model_config of {count:.3g} parameters (at most {MAX_PARAMETERS:.0e})"
    if "config" in ckpt and not isinstance(ckpt["config"], dict):
        return f"holds a config of type {type(ckpt['config']).__name__} (a mapping expected)"
    for key in ("wandb_run_id", "wandb_name", "wandb_group"):
        value = ckpt.get(key)
        if value is not None and not isinstance(value, str):
            return f"holds {key}={value!r} (a string expected)"
    run_id = ckpt.get("wandb_run_id")
    if run_id is not None and not WANDB_ID.fullmatch(run_id):
        return f"holds wandb_run_id={run_id[:40]!r} (letters, digits, _ . - expected)"
    return None


def check_resumable(ckpt: dict, path: str | Path) -> None:
    """Fail with one line when a checkpoint cannot continue a run exactly: a weights-only one (e.g.
    ``spike_*.ckpt``), or one whose contents are not what addrepro writes, checked tensor by tensor
    (a wrong moment handed to the fused AdamW kernel would read and write out of bounds)."""
    missing = _missing(ckpt, RESUME_KEYS)
    if not missing:
        missing = _missing(ckpt["optimizer"], {"step_count": int, "moments": dict}, "optimizer.")
    if missing:
        raise CheckpointError(
            f"resume={path} cannot be resumed: missing {', '.join(missing)} "
            "(weights-only checkpoints such as spike_*.ckpt are for analysis; resume from step_N.ckpt or last.ckpt)"
        )
    problem = resume_state_problem(ckpt)
    if problem is not None:
        raise CheckpointError(f"resume={path} cannot be resumed: {problem}")


def resume_state_problem(ckpt: dict) -> str | None:
    """The first thing in a resumable checkpoint that an uninterrupted run would not have written."""
    step, count = ckpt["step"], ckpt["optimizer"]["step_count"]
    if step < 0:
        return f"step is {step} (must be >= 0)"
    if count != step:
        return f"optimizer.step_count is {count} but step is {step} (they count the same updates)"
    weights, moments = ckpt["model"], ckpt["optimizer"]["moments"]
    for name, w in weights.items():
        if w.dtype != torch.float32:
            return f"weights {name} are {w.dtype} (float32 expected)"
        if not bool(w.isfinite().all()):
            return f"weights {name} are not all finite"
    extra = sorted(set(moments) - set(weights))
    if extra:
        return f"optimizer moments for unknown weights {', '.join(extra)}"
    absent = [n for n in weights if n not in moments]
    if absent and step > 0:  # moments exist from the first update on
        return f"missing optimizer moments of {', '.join(absent)} at step {step}"
    for name, m in moments.items():
        if not isinstance(m, dict) or sorted(m) != ["exp_avg", "exp_avg_sq"]:
            return f"optimizer.moments.{name} must hold exactly exp_avg and exp_avg_sq"
        for key, t in m.items():
            w = weights[name]
            if not isinstance(t, torch.Tensor) or t.shape != w.shape or t.dtype != w.dtype:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                return f"optimizer moment {key} of {name} is {got} ({tuple(w.shape)} {w.dtype} expected)"
            if not bool(t.isfinite().all()) or (key == "exp_avg_sq" and bool((t < 0).any())):
                return f"optimizer moment {key} of {name} is not all finite{' and >= 0' if key == 'exp_avg_sq' else ''}"
    return data_state_problem(ckpt["data"])


def data_state_problem(data: dict) -> str | None:
    """A data stream's saved state: a generator state of a CPU or CUDA generator."""
    state, device = data.get("generator"), data.get("device")
    sizes = {"cpu": torch.Generator().get_state().numel(), "cuda": 16}
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        return "data.generator is not a generator state (a 1-D uint8 tensor)"
    device = device or ("cuda" if state.numel() == sizes["cuda"] else "cpu")  # older checkpoints do not say
    if device not in sizes:
        return f"data.device is {device!r} (cpu or cuda expected)"
    if state.numel() != sizes[device]:
        return f"data.generator holds {state.numel()} bytes ({sizes[device]} expected for a {device} generator)"
    draws = data.get("draws", 0)  # a non-uniform sampler's batches so far
    if not isinstance(draws, int) or isinstance(draws, bool) or not 0 <= draws < 2**62:
        return f"data.draws is {draws!r} (a count of batches >= 0 expected)"
    return None


def check_compatible(
    ckpt: dict, task: dict, model_config: dict, path: str | Path = "", names: dict[str, str] | None = None
) -> None:
    """Fail with the differing keys when a checkpoint does not match the configured run. ``names`` maps a
    model-config name to the config key a user sets (``d_model`` -> ``model.width``)."""
    names = names or {}
    order = {k: i for i, k in enumerate(names)}  # the keys a user sets first, in the order given
    diffs = [
        f"{names.get(k, f'{section}.{k}')}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}"
        for section, theirs, ours in (("data", ckpt["task"], task), ("model", ckpt["model_config"], model_config))
        for k in sorted(set(theirs) | set(ours), key=lambda k: (order.get(k, len(order)), k))
        if theirs.get(k) != ours.get(k)
    ]
    if diffs:
        raise CheckpointError(f"checkpoint={path} does not match the config: " + "; ".join(diffs))


def checkpoints_by_step(
    job_dir: str | Path, steps: list[int] | None = None, key: str = "steps"
) -> list[tuple[int, Path]]:
    """``(step, path)`` of a job's checkpoints by their stored step, one per step (``last.ckpt`` only
    where no other file has its step); with ``steps``, those at exactly these steps. A step without a
    checkpoint raises ``ValueError`` naming ``key`` and the steps saved."""
    by_step: dict[int, Path] = {}
    for path in sorted(checkpoint_dir(job_dir).glob("*.ckpt"), key=lambda p: (p.name == LAST, p.name)):
        by_step.setdefault(int(load_checkpoint(path)["step"]), path)
    if steps is None:
        return sorted(by_step.items())
    missing = sorted(set(steps) - set(by_step))
    if missing:
        raise ValueError(
            f"{key}={missing} have no checkpoint in {checkpoint_dir(job_dir)} (saved: "
            f"{', '.join(map(str, sorted(by_step)))}); train with trainer.ckpt_steps=[...] to save them"
        )
    return [(step, by_step[step]) for step in sorted(set(steps))]
