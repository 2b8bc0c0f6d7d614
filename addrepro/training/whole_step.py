"""The whole training step as one CUDA graph: batch, forward, backward, train metrics and AdamW.

Why: a step of these models is a few hundred tiny kernels, and on a GPU the time goes to launching
them from Python, not to computing. A CUDA graph records the kernels once and replays them with one
launch, so nothing of the step may live on the host or change between calls except device memory:

* the batch is drawn by the members' generators, registered with the graph, which advances their
  offsets at every replay as eager draws would;
* the step counter and the learning rate are device tensors (``StackedAdamW.device_step``);
* the train metrics of every step (per-place loss and accuracy, gradient norms, learning rate) are
  written into one static buffer ``(M, K)``, which a logging step copies to the host after the
  replay: they describe the model before the update, as on the eager path;
* the first step with a non-finite loss is kept on the device, as on the eager path.

Validation, checkpoints and snapshots run eagerly between replays. The first ``WARMUP_STEPS`` steps
run the same code eagerly on a side stream (CUDA's libraries initialise themselves there, which a
capture must not see); the capture records the next step without running it, then every step is a
replay. On a CPU the same step runs eagerly: that is how the tests check it against the eager loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from addrepro.metrics.grad_norms import grad_norms
from addrepro.metrics.place import place_metric_dict, place_stats
from addrepro.model.optim import StackedAdamW
from addrepro.model.transformer import Transformer
from addrepro.task.spec import TaskSpec

WARMUP_STEPS = 3


class WholeStep:
    """One optimiser step of a stack, replayed from a CUDA graph on a GPU.

    ``next_batch`` draws ``(K, B, T)`` with ``generators`` only; ``first_nonfinite`` ``(K,)`` is updated
    in place (the step of the first non-finite loss, -1 while there is none).
    """

    def __init__(
        self,
        model: Transformer,
        spec: TaskSpec,
        opt: StackedAdamW,
        next_batch: Callable[[], torch.Tensor],
        generators: list[torch.Generator],
        first_nonfinite: torch.Tensor,
        grad_keys: dict[str, list[str]],
    ):
        self.model, self.spec, self.opt, self.next_batch = model, spec, opt, next_batch
        self.generators, self.first_nonfinite, self.grad_keys = generators, first_nonfinite, grad_keys
        self.capture = first_nonfinite.device.type == "cuda"
        self.keys: list[str] = []  # the metric of each row of ``buffer``
        self.buffer: torch.Tensor | None = None  # (M, K) the train metrics of the last step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side: torch.cuda.Stream | None = None  # the warm-up steps' stream
        self.eager_steps = 0
        self.replays = 0
        opt.sync_step_tensor()

    def step(self) -> None:
        """Take one optimiser step; ``metrics()`` then holds its train metrics."""
        if not self.capture:
            self.run()
            self.eager_steps += 1
        elif self.graph is None and self.eager_steps < WARMUP_STEPS:
            self.side = self.side or torch.cuda.Stream()
            side = self.side
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.run()
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
        else:
            if self.graph is None:
                self.graph = self.record()
            self.graph.replay()
            self.replays += 1
        self.opt.step_count += 1

    def metrics(self) -> dict[str, torch.Tensor]:
        """The last step's train metrics, ``(K,)`` each: views of the buffer (read before the next step)."""
        return dict(zip(self.keys, self.buffer, strict=True))

    def record(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():  # newer torch registers generators by itself and warns here
            warnings.simplefilter("ignore")
            for generator in self.generators:
                graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.run()
        return graph

    def run(self) -> None:
        """The step itself: what the graph records, and what runs eagerly before it (or on a CPU)."""
        opt, first = self.opt, self.first_nonfinite
        device_type = first.device.type
        # Autocast's weight cache would keep casts made before the capture inside the graph.
        with torch.autocast(device_type, enabled=torch.is_autocast_enabled(device_type), cache_enabled=False):
            opt.zero_grad(set_to_none=True)  # the backward pass allocates the gradients (in the graph's pool)
            stats = place_stats(self.model, self.next_batch(), self.spec)
            stats.loss.sum().backward()
        step = opt.step_tensor.long()  # updates taken so far
        bad = ~stats.loss.detach().isfinite()
        first.copy_(torch.where(bad & (first < 0), step, first))
        metrics = place_metric_dict(stats, "train")
        metrics.update({f"train/{k}": v for k, v in grad_norms(self.model, self.grad_keys).items()})
        metrics["train/lr"] = opt.device_lr()
        values = torch.stack([v.detach().float() for v in metrics.values()])  # (M, K)
        if self.buffer is None:  # the first step runs eagerly: it sizes the buffer
            self.keys, self.buffer = list(metrics), torch.empty_like(values)
        self.buffer.copy_(values)
        opt.device_step()
