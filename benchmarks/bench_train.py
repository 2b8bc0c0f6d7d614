"""Training throughput: addrepro's real training path against a plain PyTorch loop, side by side.

    python benchmarks/bench_train.py                 # CPU (and CUDA when available)
    python benchmarks/bench_train.py --steps 300 --device cpu --ensemble 8
    python benchmarks/bench_train.py --device cuda --compile --configs "nanda (w128, b64)"

For each configuration it measures, in one process and one after the other:
  plain     a plain PyTorch loop written here: the same architecture as a standard nn.Module,
            torch.optim.AdamW, a fresh batch made with torch ops every step, no metrics;
  plain-answers  the same loop with the last layer's queries and MLP computed at the answer
            positions only, as addrepro does (the logits elsewhere are never used): it shows how much
            of addrepro's speed is that saving rather than less overhead;
  addrepro  the real path (LightningModule + Trainer, per-place train metrics every 10 steps to
            CSV, held-out and shelf metrics every 100 steps — the defaults);
  addrepro-lean  the same with held-out/shelf metrics only at the end (per-place train metrics on);
  plain+compile  the plain loop through torch.compile (with --compile; compile time not counted);
  plain+graph  (CUDA) the plain loop's whole step, batch to AdamW(capturable=True), replayed from one
            CUDA graph: what the hardware allows for this model;
  lean+compile  addrepro-lean with trainer.compile=true (with --compile; compile time not counted);
  lean+graph  addrepro-lean with trainer.cuda_graph=true (CUDA; on a CPU with --whole-step, uncaptured);
  ensemble xK  K stacked models in one addrepro run (model-steps/s = K x steps/s), K <= 64;
  graph xK P   the same with trainer.cuda_graph=true, in float32 (fp32), with TF32 matrix products
            (tf32, trainer.matmul_precision=high) and under bfloat16 autocast (bf16); CUDA: K = 8, 64, 256.
Ratios are against the plain loop measured in the same run.

    python benchmarks/bench_train.py --sweep 16 --device cuda

``--sweep N`` times ``python -m addrepro.train -m seed=0,..,N-1`` (the default config: W&B offline, plots)
from the command to its exit: with the ensemble launcher (on CUDA also with trainer.cuda_graph=true) and
with the ``parallel`` launcher running all N jobs at once. ``--sweep-args`` adds overrides to every job.

    python benchmarks/bench_train.py --crowded 2     # N jobs at once against one job alone

``--crowded N`` runs the addrepro-lean job of the first config in separate processes: one alone
(torch's default threads), then N at once with the thread share the ``parallel`` launcher gives each
job (cores / N), then N at once with torch's default threads (what jobs started by hand get), and
reports the jobs' total model-steps/s against the job alone.

    python benchmarks/bench_train.py --beside-busy   # thread settings, quiet and beside a busy process

``--beside-busy`` times the addrepro-lean job of the first config with ``trainer.threads`` auto (the
default), 1, 2 and 2 with a passive OpenMP wait policy, first on a quiet machine, then beside one busy
process, each against the best setting in the same conditions.
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
    spec: TaskSpec,
    width: int,
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    answers_only: bool = False,
    compiled: bool = False,
) -> float:
    """Steps per second of a plain training loop (``answers_only``: last layer at the answer positions;
    ``compiled``: the model through ``torch.compile``, compiled during the warm-up steps)."""
    torch.manual_seed(0)
    model = PlainModel(spec, width).to(device)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    g = torch.Generator(device=device).manual_seed(0)
    n_answer = spec.n_places
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        inputs, targets = split_tokens(encode(*sample_operands(spec, batch, g, device), spec), spec)
        logits = forward(inputs, n_answer if answers_only else None)[:, -n_answer:]
        loss = F.cross_entropy(logits.reshape(-1, spec.base), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps / (time.perf_counter() - start)


def plain_graph_loop(spec: TaskSpec, width: int, batch: int, steps: int, warmup: int) -> float:
    """Steps per second of the plain loop with its whole step (batch, forward, backward, AdamW with
    ``capturable=True``) captured in one CUDA graph and replayed: what the hardware allows."""
    device = "cuda"
    torch.manual_seed(0)
    model = PlainModel(spec, width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), capturable=True)
    g = torch.Generator(device=device).manual_seed(0)
    n_answer = spec.n_places

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        inputs, targets = split_tokens(encode(*sample_operands(spec, batch, g, device), spec), spec)
        logits = model(inputs)[:, -n_answer:]
        F.cross_entropy(logits.reshape(-1, spec.base), targets.reshape(-1)).backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(g)
    with torch.cuda.graph(graph):
        step()
    for _ in range(warmup):
        graph.replay()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
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

        # trainer.global_step counts optimiser steps on every path (a host integer: no sync).
        def on_train_batch_end(self, trainer, module, *args) -> None:  # noqa: ANN001, ANN002
            if self.start is None and trainer.global_step >= warmup:
                _sync(device)
                self.start, self.start_step = time.perf_counter(), trainer.global_step

        def on_train_end(self, trainer, module) -> None:  # noqa: ANN001
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
    if clock.start is None or clock.end_step == clock.start_step:
        return math.nan  # too few steps to time: the clock reads between calls of trainer.steps_per_call
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

    def together(count: int, threads: int | str | None) -> list[float]:
        args = [sys.executable, __file__, "--job", config, "--steps", str(steps), "--warmup", str(warmup)]
        if threads is not None:
            args += ["--threads", str(threads)]
        repo = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)]
        return [json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in procs]

    print(f"{cores} cores, config {config}, lean path, {steps} timed steps per job")
    alone = together(1, "null")[0]
    print(f"{'jobs':>4} {'threads/job':>12} {'total model-steps/s':>20} {'vs one alone':>13}")
    print(f"{1:>4} {'default':>12} {alone:20.1f} {1.0:12.2f}x", flush=True)
    for label, threads in ((str(share), share), ("default", "null")):
        rates = together(n_jobs, threads)
        print(f"{n_jobs:>4} {label:>12} {sum(rates):20.1f} {sum(rates) / alone:12.2f}x", flush=True)


def beside_busy(config: str, steps: int, warmup: int) -> None:
    """Steps/s of one lean job per thread setting, on a quiet machine and beside a busy process (one
    Python loop that never sleeps, as on a shared workstation), each against the best setting there."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    settings = [("auto (default)", "auto", {}), ("1", "1", {}), ("2", "2", {})]
    settings.append(("2, OMP_WAIT_POLICY=PASSIVE", "2", {"OMP_WAIT_POLICY": "PASSIVE"}))
    print(f"{cpu_name()}, config {config}, lean path, {steps} timed steps")
    print(f"{'neighbour':10} {'trainer.threads':28} {'steps/s':>9} {'vs best here':>13}")
    for busy in (False, True):
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            rates = []
            for _, threads, extra in settings:
                args = [sys.executable, __file__, "--job", config, "--steps", str(steps), "--warmup", str(warmup)]
                cmd = [*args, "--threads", threads]
                out = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True)
                rates.append(json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"])
        finally:
            if neighbour is not None:
                neighbour.kill()
        for (label, _, _), rate in zip(settings, rates, strict=True):
            where = "busy" if busy else "quiet"
            print(f"{where:10} {label:28} {rate:9.1f} {rate / max(rates):12.2f}x", flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def sweep_wall(n_jobs: int, launcher: str, device: str, extra: list[str]) -> float:
    """Wall seconds of ``python -m addrepro.train -m seed=0,..,n-1`` with ``launcher``, start-up included."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "addrepro.train", "-m", "seed=" + ",".join(map(str, range(n_jobs)))]
        args += [f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp}/sweep", "trainer.progress_bar=false"]
        args += [f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", *extra]
        if launcher == "parallel":
            args.append(f"hydra.launcher.n_jobs={n_jobs}")
        start = time.perf_counter()
        proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the {launcher} sweep failed:\n{proc.stderr[-3000:]}")
    return wall


PRECISIONS = {  # the ensembles' arithmetic: full float32, TF32 matrix products, bfloat16 autocast
    "fp32": ("trainer.matmul_precision=highest",),
    "tf32": ("trainer.matmul_precision=high",),
    "bf16": ("trainer.precision=bf16-mixed",),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument(
        "--ensemble", type=int, nargs="*", default=None, help="members (default: 8 on CPU; 8 64 256 on GPU)"
    )
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile paths (compiles first)")
    parser.add_argument(
        "--whole-step", action="store_true", help="also time trainer.cuda_graph=true on a CPU (uncaptured)"
    )
    parser.add_argument("--sweep", type=int, default=None, help="N: wall time of an N-job seed sweep, per launcher")
    parser.add_argument("--sweep-args", nargs="*", default=[], help="overrides for --sweep's jobs")
    parser.add_argument("--crowded", type=int, default=None, help="N jobs at once against one alone (CPU)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # a --crowded job: one lean run
    parser.add_argument("--threads", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--beside-busy", action="store_true", help="thread settings on a quiet machine and beside a busy process"
    )
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
    if args.beside_busy:
        beside_busy(args.configs[0], args.steps, args.warmup)
        return 0
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    spec = TaskSpec(n_digits=5)
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if args.sweep is not None:
        for device in devices:
            runs = [("ensemble", []), ("parallel", [])]
            if device == "cuda":
                runs.insert(0, ("ensemble", ["trainer.cuda_graph=true"]))
            for launcher, extra in runs:
                wall = sweep_wall(args.sweep, launcher, device, [*extra, *args.sweep_args])
                what = f"{args.sweep}-job seed sweep, {launcher} launcher{' + cuda_graph' if extra else ''}"
                print(f"{machine(device):36} {what:56} {wall:7.1f} s wall", flush=True)
        return 0
    head = f"{'device':36} {'config':20} {'path':20} {'steps/s':>9} {'model-steps/s':>14}"
    print(f"{head} {'vs plain':>9} {'vs answers':>11}")
    for device in devices:
        for name in args.configs:
            measure_config(spec, name, device, args)
    return 0


def measure_config(spec: TaskSpec, name: str, device: str, args: argparse.Namespace) -> None:
    """Every path of one config on one device, printed as each is measured."""
    w, b = CONFIGS[name]["width"], CONFIGS[name]["batch"]
    plain = plain_loop(spec, w, b, args.steps, args.warmup, device)
    answers = plain_loop(spec, w, b, args.steps, args.warmup, device, answers_only=True)

    def report(path: str, rate: float, members: int = 1) -> None:
        print(
            f"{machine(device):36} {name:20} {path:20} {rate:9.1f} {rate * members:14.1f} "
            f"{rate * members / plain:8.2f}x {rate * members / answers:10.2f}x",
            flush=True,
        )

    report("plain", plain)
    report("plain-answers", answers)
    if args.compile:
        report("plain+compile", plain_loop(spec, w, b, args.steps, args.warmup, device, compiled=True))
    if device == "cuda":
        report("plain+graph", plain_graph_loop(spec, w, b, args.steps, args.warmup))
    single = (w, b, args.steps, args.warmup, device, 1)
    report("addrepro", addrepro_run(*single, False))
    report("addrepro-lean", addrepro_run(*single, True))
    if args.compile:
        report("lean+compile", addrepro_run(*single, True, True))
    whole = device == "cuda" or args.whole_step
    if whole:
        report("lean+graph", addrepro_run(*single, True, extra=("trainer.cuda_graph=true",)))
    steps = max(args.steps // 4, 40)
    for k in args.ensemble or ([8, 64, 256] if device == "cuda" else [8]):
        if k <= 64:
            report(f"ensemble x{k}", addrepro_run(w, b, steps, 10, device, k, True), k)
        for label, extra in PRECISIONS.items() if whole else ():
            if device == "cpu" and label != "fp32":
                continue  # TF32 is an NVIDIA matrix format; bf16 on a CPU is another question
            run = ("trainer.cuda_graph=true", *extra)
            report(f"graph x{k} {label}", addrepro_run(w, b, steps, 10, device, k, True, extra=run), k)


if __name__ == "__main__":
    sys.exit(main())
