"""The training step: batch, forward, backward, train metrics and AdamW, written once.

Every path runs this function. With ``trainer.cuda_graph`` on a CUDA device it is recorded once as a
CUDA graph and replayed; everywhere else it runs as it is. Why a graph: a step of these models is a
few hundred tiny kernels, and on a GPU the time goes to launching them from Python, not to
computing. A graph records the kernels once and replays them with one launch, so nothing of the
step may live on the host or change between calls except device memory:

* the batch is drawn by the members' generators, registered with the graph, which advances their
  offsets at every replay as eager draws would;
* the step counter and the learning rate are device tensors (``StackedAdamW.step``);
* the train metrics (per-place loss and accuracy, gradient norms, learning rate) are written into
  one static buffer ``(M, K)``; they describe the model before the update;
* the first step with a non-finite loss is kept on the device.

Run as it is, the step computes its metrics only at logging steps (what it returns is the same; the
update never depends on them). Captured, it computes them at every step: the graph is fixed.

Capture: the first ``WARMUP_STEPS`` steps run on a side stream of the job's own device (CUDA's
libraries initialise themselves there, which a capture must not see); the capture records the next
step on that stream without running it; every later step is a replay. A capture that fails is
reported in one line naming its first error, the generators are put back where they were, and the
step runs uncaptured from then on. ``release`` frees the graph and its memory pool.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable

import torch

from addrepro.metrics.grad_norms import grad_norms
from addrepro.metrics.place import PlaceStats, place_metric_dict
from addrepro.model.optim import StackedAdamW
from addrepro.model.transformer import Transformer

log = logging.getLogger("addrepro")

WARMUP_STEPS = 3

# Newer torch registers a graph's generators itself and warns when asked to as well; registering
# stays necessary on the older torch this project supports. Only messages that speak of registering
# generators are silenced, and only around the registration (their exact text differs between versions).
REGISTRATION_WARNING = r"(?i).*generator.*regist.*|.*regist.*generator.*"


class TrainStep:
    """One optimiser step of a stack of K models.

    ``stats(tokens)`` is the forward pass (``place_stats``, compiled or not); ``next_batch()`` draws
    ``(K, B, T)`` with ``generators`` only; ``first_nonfinite`` ``(K,)`` is updated in place (the step
    of the first non-finite loss, -1 while there is none).
    """

    def __init__(
        self,
        model: Transformer,
        stats: Callable[[torch.Tensor], PlaceStats],
        opt: StackedAdamW,
        next_batch: Callable[[], torch.Tensor],
        generators: list[torch.Generator],
        first_nonfinite: torch.Tensor,
        grad_keys: dict[str, list[str]],
        capture: bool = False,
    ):
        self.model, self.stats, self.opt, self.next_batch = model, stats, opt, next_batch
        self.generators, self.first_nonfinite, self.grad_keys = generators, first_nonfinite, grad_keys
        self.device = first_nonfinite.device
        self.capture = capture and self.device.type == "cuda"
        self.keys: list[str] = []  # the metric of each row of ``buffer``
        self.buffer: torch.Tensor | None = None  # (M, K) the train metrics of the last step that computed them
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side: torch.cuda.Stream | None = None  # the warm-up and capture stream, on the job's device
        self.eager_steps = 0
        self.replays = 0
        self.capture_error: str | None = None

    def __call__(self, log_metrics: bool) -> dict[str, torch.Tensor] | None:
        """Take one optimiser step; at a logging step return its train metrics, ``(K,)`` each (views of
        a buffer the next step overwrites)."""
        if not self.capture:
            self.run(log_metrics)
            self.eager_steps += 1
        elif self.graph is None and self.eager_steps < WARMUP_STEPS:
            with torch.cuda.device(self.device):
                self.side = self.side or torch.cuda.Stream(self.device)
                self.side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.side):
                    self.run(True)
                torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.eager_steps += 1
        else:
            if self.graph is None:
                self.graph = self.record()
            if self.graph is None:  # the capture failed: uncaptured from now on
                return self(log_metrics)
            with torch.cuda.device(self.device):
                self.graph.replay()
            self.replays += 1
        return self.metrics() if log_metrics else None

    def metrics(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, self.buffer, strict=True))

    def record(self) -> torch.cuda.CUDAGraph | None:
        """Record one step as a CUDA graph on the job's device and side stream; None if that fails."""
        states = [g.get_state() for g in self.generators]
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=REGISTRATION_WARNING)
            for generator in self.generators:
                graph.register_generator_state(generator)
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(self.side):
                    graph.capture_begin()
                    try:
                        self.run(True)
                    except Exception:
                        # Ending a broken capture raises again; the first error is the one to report.
                        with contextlib.suppress(Exception):
                            graph.capture_end()
                        raise
                    graph.capture_end()
            except Exception as e:
                self.capture_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                log.warning("addrepro: CUDA graph capture failed (%s); training on without it", self.capture_error)
                for generator, state in zip(self.generators, states, strict=True):
                    generator.set_state(state)
                self.capture = False
                self.opt.zero_grad(set_to_none=True)
                return None
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        return graph

    def release(self) -> None:
        """Free the graph and the memory pool its tensors live in (the gradients, among them)."""
        if self.graph is None:
            return
        self.graph.reset()
        self.graph = None
        self.opt.zero_grad(set_to_none=True)
        self.buffer = None
        torch.cuda.empty_cache()

    def run(self, log_metrics: bool) -> None:
        """The step itself: what the graph records, and what runs as it is."""
        opt, first = self.opt, self.first_nonfinite
        device_type = first.device.type
        # Autocast's weight cache would keep casts made before a capture inside the graph.
        with torch.autocast(device_type, enabled=torch.is_autocast_enabled(device_type), cache_enabled=False):
            opt.zero_grad(set_to_none=True)  # the backward pass allocates the gradients (in a graph's pool)
            stats = self.stats(self.next_batch())
            # Summing member losses keeps every member's gradient exactly its own mean loss's gradient.
            stats.loss.sum().backward()
        bad = ~stats.loss.detach().isfinite()
        first.copy_(torch.where(bad & (first < 0), opt.step_tensor.long(), first))
        if log_metrics:
            metrics = place_metric_dict(stats, "train")
            metrics.update({f"train/{k}": v for k, v in grad_norms(self.model, self.grad_keys).items()})
            metrics["train/lr"] = opt.current_lr()
            values = torch.stack([v.detach().float() for v in metrics.values()])  # (M, K)
            if self.buffer is None:
                self.keys, self.buffer = list(metrics), torch.empty_like(values)
            self.buffer.copy_(values)
        # With trainer.compile on CUDA the gradients live in the compiled graph's memory: everything
        # that reads them (the grad norms above, the update here) does so before the next forward pass.
        opt.step()
