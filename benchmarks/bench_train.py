"""Training throughput: addrepro's real training path against a plain PyTorch loop, side by side.

    python benchmarks/bench_train.py                 # CPU (and CUDA when available)
    python benchmarks/bench_train.py --steps 300 --device cpu --ensemble 8

For each configuration it measures, in one process and one after the other:
  plain     a plain PyTorch loop written here: the same architecture as a standard nn.Module,
            torch.optim.AdamW, a fresh batch made with torch ops every step, no metrics;
  plain-answers  the same loop with the last layer's queries and MLP computed at the answer
            positions only, as addrepro does (the logits elsewhere are never used): it shows how much
            of addrepro's speed is that saving rather than less overhead;
  addrepro  the real path (LightningModule + Trainer, per-place train metrics every 10 steps to
            CSV, held-out and shelf metrics every 100 steps — the defaults);
  addrepro-lean  the same with held-out/shelf metrics only at the end (per-place train metrics on);
  lean+compile  addrepro-lean with trainer.compile=true (with --compile; compile time not counted);
  ensemble  K stacked models in one addrepro run (model-steps/s = K x steps/s).
Ratios are against the plain loop measured in the same run.

    python benchmarks/bench_train.py --crowded 2     # N jobs at once against one job alone

``--crowded N`` runs the addrepro-lean job of the first config in separate processes: one alone
(torch's default threads), then N at once with the thread share the ``parallel`` launcher gives each
job (cores / N), then N at once with torch's default threads (what jobs started by hand get), and
reports the jobs' total model-steps/s against the job alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from addrepro.task.encoding import encode, sample_operands, split_tokens
from addrepro.task.spec import TaskSpec

CONFIGS = {
    "nanda (w128, b64)": dict(width=128, batch=64),
    "large (w512, b256)": dict(width=512, batch=256),
}


# -- the plain baseline --------------------------------------------------------------------------
class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.fc_in = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, last: int | None = None) -> torch.Tensor:
        b, t, d = x.shape
        if last is None:  # every position, as a plain loop would
            q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # queries and MLP at the answer positions only (what addrepro's training path does)
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            q = F.linear(x[:, -last:], w_q).view(b, last, self.heads, d // self.heads).transpose(1, 2)
            k, v = F.linear(x, w_kv).view(b, t, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[t - last :]
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x[:, -last:]
        x = x + self.o(z.transpose(1, 2).reshape(b, -1, d))
        return x + self.fc_out(F.relu(self.fc_in(x)))


class PlainModel(nn.Module):
    def __init__(self, spec: TaskSpec, d: int, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(spec.d_vocab, d)
        self.pos = nn.Parameter(torch.randn(spec.seq_len - 1, d) / math.sqrt(d))
        self.block = PlainBlock(d, heads)
        self.unembed = nn.Linear(d, spec.base, bias=False)

    def forward(self, tokens: torch.Tensor, last: int | None = None) -> torch.Tensor:
        return self.unembed(self.block(self.embed(tokens) + self.pos[: tokens.shape[1]], last))


def plain_loop(
    spec: TaskSpec, width: int, batch: int, steps: int, warmup: int, device: str, answers_only: bool = False
) -> float:
    """Steps per second of a plain training loop (``answers_only``: last layer at the answer positions)."""
    torch.manual_seed(0)
    model = PlainModel(spec, width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    g = torch.Generator(device=device).manual_seed(0)
    n_answer = spec.n_places
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        inputs, targets = split_tokens(encode(*sample_operands(spec, batch, g, device), spec), spec)
        logits = model(inputs, n_answer if answers_only else None)[:, -n_answer:]
        loss = F.cross_entropy(logits.reshape(-1, spec.base), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps / (time.perf_counter() - start)


# -- addrepro's real path -----------------------------------------------------------------------
def addrepro_run(
    width: int,
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    members: int,
    lean: bool,
    compiled: bool = False,
    extra: tuple[str, ...] = (),
) -> float:
    """Steps per second of ``python -m addrepro.train``'s training path (all members together)."""
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir

    import addrepro.train  # noqa: F401 - registers the ${uid:} resolver
    from addrepro.training.run import JobPlan, quiet_lightning

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.start = self.end = None

        def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
            if self.start is None and trainer.global_step >= warmup:
                _sync(device)
                self.start, self.start_step = time.perf_counter(), trainer.global_step

        def on_train_end(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
            _sync(device)
            self.end, self.end_step = time.perf_counter(), trainer.global_step

    total = warmup + steps
    overrides = [
        f"model.width={width}",
        f"data.batch_size={batch}",
        f"trainer.max_steps={total}",
        "logger=csv",
        "trainer.plots=false",
        "trainer.progress_bar=false",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
    ]
    overrides += list(extra)
    if compiled:
        overrides.append("trainer.compile=true")
    if lean:
        overrides += [f"trainer.val_every_n_steps={total}", f"metrics.every_n_steps={total}"]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfgs = [compose(config_name="train", overrides=[*overrides, f"seed={k}"]) for k in range(members)]
    clock = Clock()
    quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        plans = [JobPlan(c, Path(tmp) / str(k), str(k), "bench", True) for k, c in enumerate(cfgs)]
        for p in plans:
            p.job_dir.mkdir()
        _train_with_callback(plans, clock)
    return (clock.end_step - clock.start_step) / (clock.end - clock.start)


def _train_with_callback(plans, clock) -> None:  # noqa: ANN001
    import pytorch_lightning as pl

    original = pl.Trainer.__init__

    def patched(self, *args, callbacks=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
        original(self, *args, callbacks=[*(callbacks or []), clock], **kwargs)

    pl.Trainer.__init__ = patched
    try:
        from addrepro.train import train

        train(plans)
    finally:
        pl.Trainer.__init__ = original


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def crowded(n_jobs: int, config: str, steps: int, warmup: int) -> None:
    """Total model-steps/s of ``n_jobs`` lean jobs running at once, against one job alone."""
    from addrepro.training.devices import cpu_cores, job_threads  # noqa: PLC0415 - only this mode needs it

    cores = cpu_cores()
    share = job_threads(None, n_jobs, cores) or cores

    def together(count: int, threads: int | None) -> list[float]:
        args = [sys.executable, __file__, "--job", config, "--steps", str(steps), "--warmup", str(warmup)]
        if threads is not None:
            args += ["--threads", str(threads)]
        repo = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)]
        return [json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in procs]

    print(f"{cores} cores, config {config}, lean path, {steps} timed steps per job")
    alone = together(1, None)[0]
    print(f"{'jobs':>4} {'threads/job':>12} {'total model-steps/s':>20} {'vs one alone':>13}")
    print(f"{1:>4} {'default':>12} {alone:20.1f} {1.0:12.2f}x", flush=True)
    for label, threads in ((str(share), share), ("default", None)):
        rates = together(n_jobs, threads)
        print(f"{n_jobs:>4} {label:>12} {sum(rates):20.1f} {sum(rates) / alone:12.2f}x", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--ensemble", type=int, default=None, help="members (default: 8 on CPU, 64 on GPU)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--compile", action="store_true", help="also time trainer.compile=true (compiles first)")
    parser.add_argument("--crowded", type=int, default=None, help="N jobs at once against one alone (CPU)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # a --crowded job: one lean run
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job is not None:
        c = CONFIGS[args.job]
        extra = (f"trainer.threads={args.threads}",) if args.threads else ()
        rate = addrepro_run(c["width"], c["batch"], args.steps, args.warmup, "cpu", 1, True, extra=extra)
        print(json.dumps({"steps_per_s": rate}))
        return 0
    if args.crowded is not None:
        crowded(args.crowded, args.configs[0], args.steps, args.warmup)
        return 0
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    spec = TaskSpec(n_digits=5)
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print(
        f"{'device':36} {'config':20} {'path':16} {'steps/s':>9} {'model-steps/s':>14} {'vs plain':>9} "
        f"{'vs plain-answers':>17}"
    )
    for device in devices:
        k = args.ensemble or (64 if device == "cuda" else 8)
        for name in args.configs:
            c = CONFIGS[name]
            plain = plain_loop(spec, c["width"], c["batch"], args.steps, args.warmup, device)
            single = (c["width"], c["batch"], args.steps, args.warmup, device, 1)
            rows = [("plain", plain, 1)]
            answers = plain_loop(spec, c["width"], c["batch"], args.steps, args.warmup, device, answers_only=True)
            rows.append(("plain-answers", answers, 1))
            rows.append(("addrepro", addrepro_run(*single, False), 1))
            rows.append(("addrepro-lean", addrepro_run(*single, True), 1))
            if args.compile:
                rows.append(("lean+compile", addrepro_run(*single, True, True), 1))
            steps = max(args.steps // k * 4, 20)
            rows.append((f"ensemble x{k}", addrepro_run(c["width"], c["batch"], steps, 10, device, k, True), k))
            for path, rate, members in rows:
                print(
                    f"{machine(device):36} {name:20} {path:16} {rate:9.1f} {rate * members:14.1f} "
                    f"{rate * members / plain:8.2f}x {rate * members / answers:16.2f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
