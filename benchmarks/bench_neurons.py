"""Speed of neuron-level analysis of a 2-layer width-64 model on 5-digit addition (512 MLP neurons).

    python benchmarks/bench_neurons.py

Times ``analysis=neurons`` with its default options (activation maps over every place's operand
grid, clustering, group ablation of every cluster and attribution patching of all neurons on 1024
validation sequences, with its check against real mean-ablation), with one torch thread. The model has
random weights: the cost does not depend on what it learned. Run it on a quiet machine.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict

import torch

from addrepro.interp import neurons
from addrepro.interp.common import load_subject
from addrepro.model.transformer import ModelConfig, Transformer
from addrepro.task.spec import TaskSpec


def subject():  # noqa: ANN201
    spec = TaskSpec(n_digits=5)
    cfg = ModelConfig(
        d_vocab=spec.d_vocab,
        d_vocab_out=spec.base,
        n_ctx=spec.seq_len - 1,
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_head=16,
        d_mlp=256,
        normalization="LN",
    )
    ckpt = {
        "task": asdict(spec),
        "model_config": cfg.to_dict(),
        "model": Transformer(cfg, seeds=0).member_state_dict(0),
        "config": {"data": {"val_size": 2048}},
    }
    return load_subject(ckpt)


def main() -> None:
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}")
    s = subject()
    start = time.perf_counter()
    result = neurons.run(s)
    total = time.perf_counter() - start
    start = time.perf_counter()
    neurons.attribution(
        s,
        s.val_tokens,
        neurons.position_means(s.bridge, s.val_tokens, {f"blocks.{layer}.mlp.hook_post" for layer in range(2)}),
    )
    grad = time.perf_counter() - start
    print(f"neurons analysis, 2 layers x 256 neurons: {total:.1f} s")
    print(f"  of which attribution patching of all 512 neurons: {grad:.2f} s")
    worst = max(abs(c["estimate"] - c["actual"]) for c in result["check"])
    print(f"  attribution vs real mean-ablation, top {len(result['check'])}: max |error| {worst:.2e} nats")


if __name__ == "__main__":
    main()
