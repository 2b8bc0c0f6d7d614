"""Training replayed from a resumable checkpoint, every step recorded: the dense view of a stretch the
run itself logged only every ``trainer.log_every_n_steps`` (a loss spike, a shelf exit).

A resumable checkpoint holds everything a step depends on (weights, Adam's moments and step count,
the data stream), so the replay takes the run's own steps: at a step the run logged, its train
metrics are the logged ones (to the last bit when the replay runs the run's kernels; a run trained in
a stack may differ in the last digits, which the caller can measure). A run whose data were drawn on
a GPU cannot be replayed here: its generator's stream does not exist on the CPU.

Each row ``step`` holds what the run would log at that step — per-place train loss and accuracy,
gradient norms per parameter group, learning rate; the model after ``step`` updates, on that step's
batch — and what the update that follows did, per parameter group (the groups of the gradient norms):

* ``adam/<group>``: the RMS over the group's weights of Adam's bias-corrected second moment's root,
  sqrt(v̂) — the gradient scale the update divides by, after that step's gradient entered it;
* ``update/<group>``: the update-to-weight ratio ‖ΔW‖ / ‖W‖ of that update (decay included).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from addrepro.model.transformer import Transformer
from addrepro.training.config import architecture, task_spec, typed
from addrepro.training.recorder import Member
from addrepro.training.stack import Stack

MAX_REPLAY_STEPS = 100_000  # a window of a run, not the run: the checkpoint before it is at most this far


def replay(config: dict, until: int, record_from: int = 0, state: dict | None = None) -> list[dict]:
    """Train the run of ``config`` (a checkpoint's resolved run config) on from ``state`` (a loaded
    resumable checkpoint of it; None: from its initialisation at step 0) to step ``until``, on the CPU;
    one row per step from ``record_from`` to ``until - 1``."""
    start = int(state["step"]) if state is not None else 0
    if state is not None and ("optimizer" not in state or "data" not in state):
        raise ValueError(f"the checkpoint at step {start} holds weights only: a replay needs a resumable one")
    if state is not None and state["data"].get("device", "cpu") != "cpu":
        # A CUDA generator's stream cannot be drawn on the CPU: the replay would train on other batches.
        raise ValueError(
            f"the run drew its data on {state['data']['device']}: a replay on the CPU would train on other batches"
        )
    if not start < until <= start + MAX_REPLAY_STEPS:
        raise ValueError(
            f"a replay from step {start} runs to a later step, at most {MAX_REPLAY_STEPS} on (not {until})"
        )
    typed_config = typed(OmegaConf.create(config))
    typed_config.trainer.compile = False  # eager on the CPU: a compiled step's kernels round alike
    spec = task_spec(typed_config.data)
    member = Member(
        seed=typed_config.run.seed,
        data_seed=typed_config.data.seed,
        lr=typed_config.optimizer.lr,
        weight_decay=typed_config.optimizer.weight_decay,
        job_dir=Path("."),
    )
    model = Transformer(architecture(typed_config.model, spec), seeds=[member.seed])
    stack = Stack(model, spec, typed_config, [member])
    opt = stack.optimizer()
    try:
        stack.build(opt, torch.device("cpu"), [state] if state is not None else None)
    except (RuntimeError, ValueError, KeyError) as e:  # a data stream saved on another device, say
        raise ValueError(f"the checkpoint at step {start} cannot be continued here ({e})") from None
    groups = {key.split("/", 1)[1]: names for key, names in stack.grad_keys.items()}
    params = dict(model.named_parameters())
    beta2 = typed_config.optimizer.betas[1]
    rows = []
    for step in range(start, until):
        record = step >= record_from
        before = {n: p.detach().clone() for n, p in params.items()} if record else {}
        metrics = stack.step(record)
        if not record:
            continue
        row = {"step": step, **{key: float(value[0]) for key, value in metrics.items()}}
        bias = 1.0 - beta2 ** (step + 1)  # the update just taken is the (step + 1)-th
        for group, names in groups.items():
            v_sum = sum(float(opt.state[params[n]]["exp_avg_sq"][0].double().sum()) for n in names)
            size = sum(params[n][0].numel() for n in names)
            change = sum(float((params[n][0].detach().double() - before[n][0].double()).square().sum()) for n in names)
            weight = sum(float(before[n][0].double().square().sum()) for n in names)
            row[f"adam/{group}"] = math.sqrt(v_sum / size / bias)
            row[f"update/{group}"] = math.sqrt(change / weight) if weight > 0 else math.inf
        rows.append(row)
    return rows
