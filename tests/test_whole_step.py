"""``trainer.cuda_graph=true``: the whole step as one CUDA graph logs and saves what the eager loop does.

On a CPU the whole step runs uncaptured, and must equal the eager loop bit for bit: the same batches,
metrics before the update, learning rates and weights. ``ADDREPRO_TEST_DEVICE=cuda`` runs the same
tests on a GPU, where the step is captured once and replayed (``benchmarks/gpu_check.sh``); there
the two paths agree to float tolerance.
"""

import os
import shutil

import pytest
import torch
from test_ensemble import config, final_weights
from test_hot_loop import HostSyncs

from addrepro.rundir.metrics_file import load_rows
from addrepro.train import JobPlan, train
from addrepro.training import whole_step
from addrepro.training.config import ConfigError, validate

DEVICE = os.environ.get("ADDREPRO_TEST_DEVICE", "cpu")
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
STEPS = 300 if DEVICE == "cuda" else 40  # a few hundred steps where they are cheap

CASES = {
    "single, warmup": [["seed=3", "optimizer.warmup_steps=7"]],
    "lsb answers": [["seed=4", "data.order=lsb"]],
    "finite data": [["seed=5", "data.train_size=300", "data.batch_size=32"]],
    "finite data, full batch": [["seed=6", "data.train_size=120", "data.batch_size=null", "data.val_size=32"]],
    "bf16-mixed": [["seed=7", "trainer.precision=bf16-mixed"]],
    # Eight members in four (lr, weight decay) settings: members sharing one share a kernel call.
    "stack of 8": [
        [f"seed={k}", f"optimizer.lr={(1e-3, 3e-3)[k // 4]}", f"optimizer.weight_decay={k % 2}"] for k in range(8)
    ],
}


def run(tmp_path, name: str, members: list[list[str]], *overrides: str, steps: int = STEPS) -> list[JobPlan]:
    common = [f"trainer.accelerator={ACCELERATOR}", f"trainer.max_steps={steps}", "trainer.steps_per_call=7"]
    cfgs = [config(*m, *common, *overrides) for m in members]
    plans = [JobPlan(c, tmp_path / f"{name}{k}", f"{name}{k}", "g", len(cfgs) > 1) for k, c in enumerate(cfgs)]
    for p in plans:
        p.job_dir.mkdir()
    train(plans)
    return plans


def assert_same(graph_rows: list[dict], eager_rows: list[dict]) -> None:
    if DEVICE == "cpu":
        assert graph_rows == eager_rows
        return
    assert [r.keys() for r in graph_rows] == [r.keys() for r in eager_rows]
    for g, e in zip(graph_rows, eager_rows, strict=True):
        for key in e:  # the same kernels, replayed; CUDA's atomic adds (embedding gradients) vary the sums' order
            # an accuracy moves in steps of one example: allow three of the smallest batch here (32)
            tolerance = {"abs": 3 / 32} if "/acc" in key else {"rel": 1e-3, "abs": 1e-5}
            assert g[key] == pytest.approx(e[key], **tolerance), (e["step"], key)


def assert_same_weights(graph: dict, eager: dict) -> None:
    assert graph.keys() == eager.keys()
    for key, w in eager.items():
        if DEVICE == "cpu":
            assert torch.equal(graph[key], w), key
        else:
            torch.testing.assert_close(graph[key], w, rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_the_whole_step_logs_and_saves_what_the_eager_loop_does(tmp_path, one_thread, monkeypatch, case):
    built = []
    monkeypatch.setattr(whole_step.WholeStep, "__init__", recorded(whole_step.WholeStep.__init__, built))
    graph = run(tmp_path, "graph", CASES[case], "trainer.cuda_graph=true")
    eager = run(tmp_path, "eager", CASES[case])
    (ws,) = built  # the whole-step path really ran, for all members at once
    assert ws.eager_steps + ws.replays == STEPS
    if DEVICE == "cuda":
        assert ws.eager_steps == whole_step.WARMUP_STEPS and ws.replays == STEPS - whole_step.WARMUP_STEPS
    for g, e in zip(graph, eager, strict=True):
        rows = load_rows(e.job_dir)
        assert {"train/loss/place_3", "train/grad_norm/global", "train/lr", "val/loss"} <= {k for r in rows for k in r}
        assert_same(load_rows(g.job_dir), rows)
        assert_same_weights(final_weights(g.job_dir), final_weights(e.job_dir))
    if len(eager) > 1:
        losses = {[r["val/loss"] for r in load_rows(e.job_dir) if "val/loss" in r][-1] for e in eager}
        assert len(losses) == len(eager)  # the members really differ


def recorded(init, built: list):  # noqa: ANN001, ANN201
    def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        init(self, *args, **kwargs)
        built.append(self)

    return wrapped


def test_a_resumed_whole_step_run_continues_exactly(tmp_path, one_thread):
    every = f"trainer.ckpt_every_n_steps={STEPS // 2}"
    (full,) = run(tmp_path, "full", CASES["single, warmup"], "trainer.cuda_graph=true", every)
    shutil.copytree(full.job_dir, tmp_path / "resumed")
    middle = tmp_path / "resumed" / "checkpoints" / f"step_{STEPS // 2}.ckpt"
    cfg = config(*CASES["single, warmup"][0], f"trainer.accelerator={ACCELERATOR}", f"trainer.max_steps={STEPS}")
    cfg.trainer.cuda_graph, cfg.trainer.steps_per_call, cfg.resume = True, 7, str(middle)
    cfg.trainer.ckpt_every_n_steps = STEPS // 2
    train([JobPlan(cfg, tmp_path / "resumed", "resumed", "g", False, resume_from=middle)])
    assert_same(load_rows(tmp_path / "resumed"), load_rows(full.job_dir))
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(full.job_dir))


def test_a_diverging_member_is_stopped_as_on_the_eager_path(tmp_path, one_thread):
    members = [["seed=0", "optimizer.lr=1e-3"], ["seed=1", "optimizer.lr=1e30"]]  # member 1 turns NaN
    finals = {}
    for name, extra in (("graph", ["trainer.cuda_graph=true"]), ("eager", [])):
        cfgs = [config(*m, f"trainer.accelerator={ACCELERATOR}", "trainer.steps_per_call=7", *extra) for m in members]
        plans = [JobPlan(c, tmp_path / f"{name}{k}", f"job{k}", "g", True) for k, c in enumerate(cfgs)]
        for p in plans:
            p.job_dir.mkdir()
        finals[name] = train(plans)
        finals[name + " rows"] = load_rows(plans[0].job_dir)
    message = finals["graph"][1]["diverged"]
    assert "non-finite" in message and "first non-finite loss at step" in message, message
    assert message.replace("graph1", "eager1") == finals["eager"][1]["diverged"]
    assert_same(finals["graph rows"], finals["eager rows"])  # the other member trained on, unchanged


def test_the_whole_step_never_reads_the_host_not_even_at_logging_steps(tmp_path, one_thread, monkeypatch):
    """What a CUDA graph cannot capture, seen on any device: no value read on the host, no tensor
    built from Python data, no copy between devices, in any step after the first."""
    flagged, steps = [], []
    original = whole_step.WholeStep.run

    def checked(self):  # noqa: ANN001, ANN202
        if self.buffer is None:
            return original(self)  # the first step sizes the metrics buffer
        with HostSyncs() as check:
            original(self)
        steps.append(int(self.opt.step_count))
        flagged.extend(check.seen)

    monkeypatch.setattr(whole_step.WholeStep, "run", checked)
    monkeypatch.setattr(whole_step.WholeStep, "__init__", cpu_only(whole_step.WholeStep.__init__))
    run(tmp_path, "m", CASES["stack of 8"][:2], "trainer.cuda_graph=true", steps=12)
    assert steps == list(range(1, 12))  # logging steps (5, 10) included
    assert flagged == []


def cpu_only(init):  # noqa: ANN001, ANN201
    """Run the step uncaptured even on a GPU, so that every step goes through ``run``."""

    def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        init(self, *args, **kwargs)
        self.capture = False

    return wrapped


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["trainer.compile=true"],
            "trainer.cuda_graph=True is invalid: cannot be combined with trainer.compile=true (choose one)",
        ),
        (
            ["trainer.accelerator=cpu"],
            "trainer.cuda_graph=True is invalid: needs a CUDA GPU, not trainer.accelerator=cpu",
        ),
    ],
)
def test_cuda_graph_is_refused_where_it_cannot_run(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(config("trainer.cuda_graph=true", *overrides))
    assert str(info.value) == message
