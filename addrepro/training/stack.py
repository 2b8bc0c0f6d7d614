"""A stack: K models trained as one, with their optimiser, data streams, evaluation sets and step.

The K models of a stack (an ensemble of jobs that differ only in seeds, learning rate and weight
decay; a single run is a stack of one) are one ``Transformer`` with a leading K dimension. Each
member draws its own batches from its own generator; the optimiser keeps a learning rate and weight
decay per member; ``TrainStep`` takes one optimiser step of all of them at once.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from addrepro.metrics.grad_norms import grad_norm_keys
from addrepro.metrics.place import compiled_place_stats, place_stats
from addrepro.model.optim import StackedAdamW
from addrepro.model.transformer import Transformer
from addrepro.task.sets import CarrySets
from addrepro.task.spec import SamplerSpec, TaskSpec
from addrepro.task.streams import FiniteBatches, InfiniteBatches, stacked_batch, validation_tokens
from addrepro.training.config import TrainConfig
from addrepro.training.evaluation import EvaluationSets
from addrepro.training.recorder import Member
from addrepro.training.step import TrainStep

log = logging.getLogger("addrepro")

MOMENTS = ("exp_avg", "exp_avg_sq")


class Stack:
    """The models of ``members`` (``model``, already built with their seeds) and what trains them.

    ``optimizer()`` makes the optimiser; ``build(opt, device)`` the data streams, evaluation sets and
    the step, once the model is on its device.
    """

    def __init__(self, model: Transformer, spec: TaskSpec, config: TrainConfig, members: list[Member]):
        self.model, self.spec, self.config, self.members = model, spec, config, members
        self.grad_keys = grad_norm_keys(model)
        self.opt: StackedAdamW | None = None
        self.streams: list[InfiniteBatches | FiniteBatches] = []
        self.sets: EvaluationSets | None = None
        self.first_nonfinite: torch.Tensor | None = None  # (K,) step of each member's first non-finite loss
        self.step: TrainStep | None = None

    def optimizer(self) -> StackedAdamW:
        o = self.config.optimizer
        return StackedAdamW(
            self.model.parameters(),
            lr=[m.lr for m in self.members],
            weight_decay=[m.weight_decay for m in self.members],
            betas=tuple(o.betas),
            eps=o.eps,
            warmup_steps=o.warmup_steps,
        )

    def build_data(self, device: torch.device) -> None:
        """The members' training streams, the held-out and carry sets, on ``device``."""
        d, mc = self.config.data, self.config.metrics
        self.streams, val_sets = [], []
        for m in self.members:
            train, val = validation_tokens(
                self.spec, d.val_size, d.val_seed, d.train_size, m.data_seed, with_train=True
            )
            if train is None:
                sampler = SamplerSpec.from_config(d)
                self.streams.append(InfiniteBatches(self.spec, d.batch_size, m.data_seed, device, sampler))
            else:
                self.streams.append(FiniteBatches(train.to(device), d.batch_size, m.data_seed, self.spec))
            val_sets.append(val)
        carry_sets = CarrySets.build(self.spec, mc.carry_set_size, mc.chain_set_size, class_size=mc.class_set_size).to(
            device
        )
        self.sets = EvaluationSets(torch.stack(val_sets).to(device), carry_sets)  # (K, V, T)
        self.first_nonfinite = torch.full((len(self.members),), -1, dtype=torch.long, device=device)

    def build(self, opt: StackedAdamW, device: torch.device, states: list[dict] | None = None) -> None:
        """Data, evaluation sets and the step; ``states`` (resumable checkpoints, one per member) first."""
        self.opt = opt
        self.build_data(device)
        if states:
            self.load_states(states)
        if self.config.trainer.compile:
            # Compiled code is cached per code object, and every fit compiles the same function for
            # a new model: without a reset, a process that trains more stacks than dynamo's recompile
            # limit (the ensemble launcher, a reused worker, a benchmark) would fail. One process
            # trains one stack at a time, so nothing compiled for an earlier stack is needed again.
            torch._dynamo.reset()
            stats = compiled_place_stats(self.model, self.spec)
        else:
            stats = partial(place_stats, self.model, spec=self.spec)
        self.step = TrainStep(
            self.model,
            stats,
            opt,
            self.next_batch,
            [s.generator for s in self.streams],
            self.first_nonfinite,
            self.grad_keys,
            capture=self.config.trainer.cuda_graph,
        )

    def next_batch(self) -> torch.Tensor:
        return stacked_batch(self.streams)  # (K, B, T)

    def release(self) -> None:
        """Free the step's CUDA graph and its memory pool (if it has one)."""
        if self.step is not None:
            self.step.release()

    # -- state in and out ----------------------------------------------------------------------
    @torch.no_grad()
    def load_states(self, states: list[dict]) -> None:
        """Continue exactly where the checkpoints stopped: weights, optimiser moments and data streams."""
        for name, p in self.model.named_parameters():
            p.copy_(torch.stack([st["model"][name] for st in states]).to(p.device))
            moments = [st["optimizer"]["moments"].get(name) for st in states]
            if all(m is not None for m in moments):
                self.opt.state[p] = {key: torch.stack([m[key] for m in moments]).to(p.device) for key in MOMENTS}
        self.opt.step_count = states[0]["optimizer"]["step_count"]  # the device counter
        for stream, st in zip(self.streams, states, strict=True):
            notice = stream.load_state_dict(st["data"], st["step"])
            if notice is not None:
                log.warning("resuming: %s", notice)

    def weights(self) -> dict[str, torch.Tensor]:
        """A copy of every stacked tensor ``(K, ...)`` (members are sliced only when one is saved)."""
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    def first_nonfinite_tensor(self) -> list[str | None]:
        """Per member, the first weight or optimiser moment that is not all finite (None: all are);
        one host sync."""
        params = dict(self.model.named_parameters())
        checked = [(f"weights in {n}", p) for n, p in params.items()]
        checked += [
            (f"optimizer state {key} of {n}", self.opt.state[p][key])
            for n, p in params.items()
            if p in self.opt.state
            for key in MOMENTS
        ]
        finite = torch.stack([t.detach().isfinite().flatten(1).all(1) for _, t in checked]).cpu()  # (tensors, K)
        return [
            None if bool(finite[:, k].all()) else checked[int((~finite[:, k]).nonzero()[0])][0]
            for k in range(len(self.members))
        ]

    def member_states(self, step: int, members: list[int]) -> dict[int, dict]:
        """What each of ``members`` needs to continue exactly at ``step``: weights, moments, data stream.

        One device-to-host copy per stacked tensor; members are sliced (and cloned) on the host.
        """
        weights = {name: t.detach().cpu() for name, t in self.model.state_dict().items()}
        moments = {
            name: {key: self.opt.state[p][key].detach().cpu() for key in MOMENTS}
            for name, p in self.model.named_parameters()
            if p in self.opt.state
        }
        return {
            k: {
                "model": member_weights(weights, k),
                "optimizer": {"step_count": step, "moments": {n: member_weights(m, k) for n, m in moments.items()}},
                "data": self.streams[k].state_dict(),
            }
            for k in members
        }


def member_weights(stacked: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Member k of stacked weights, as a single model's state dict."""
    return {name: t[k].clone() for name, t in stacked.items()}  # a clone: a saved view would store all K
