"""The training step (``training.step.TrainStep``): one function, run as it is or replayed as a CUDA graph.

``ADDREPRO_TEST_DEVICE=cuda`` runs these tests on a GPU (``benchmarks/gpu_check.sh``), where
``trainer.cuda_graph=true`` captures the step once and replays it, against the same step run as it
is. On a CPU there is nothing to capture: the comparisons are skipped, and what holds everywhere
(no host read in any step, a resumed run continues exactly, a diverging member stops alone) is tested.
"""

import os
import shutil

import pytest
import torch
from test_ensemble import config, final_weights
from test_hot_loop import HostSyncs

from addrepro.rundir.metrics_file import load_rows
from addrepro.train import JobPlan, train
from addrepro.training import step as train_step
from addrepro.training.config import ConfigError, validate

DEVICE = os.environ.get("ADDREPRO_TEST_DEVICE", "cpu")
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
# On CUDA a short horizon: the comparisons are at float tolerance, which chaotic training would outgrow.
STEPS = 30 if DEVICE == "cuda" else 40

CASES = {
    "single, warmup": [["seed=3", "optimizer.warmup_steps=7"]],
    "lsb answers": [["seed=4", "data.order=lsb"]],
    "finite data": [["seed=5", "data.train_size=300", "data.batch_size=32"]],
    "finite data, full batch": [["seed=6", "data.train_size=120", "data.batch_size=null", "data.val_size=32"]],
    "bf16-mixed": [["seed=7", "trainer.precision=bf16-mixed"]],
    # The training distributions draw inside the step: recorded in the graph with it.
    "carry_enriched": [["seed=8", "data.sampler=carry_enriched"]],
    "carry_balanced": [["seed=9", "data.sampler=carry_balanced"]],
    "curriculum": [["seed=10", "data.sampler=curriculum", "data.curriculum_steps=4"]],
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
        for key in e:  # the same kernels, replayed, with deterministic algorithms and one attention backend
            tolerance = {"abs": 1 / 32} if "/acc" in key else {"rel": 1e-5, "abs": 1e-7}  # one example of 32
            assert g[key] == pytest.approx(e[key], **tolerance), (e["step"], key)


def assert_same_weights(graph: dict, eager: dict) -> None:
    assert graph.keys() == eager.keys()
    for key, w in eager.items():
        if DEVICE == "cpu":
            assert torch.equal(graph[key], w), key
        else:
            torch.testing.assert_close(graph[key], w, rtol=1e-5, atol=1e-7, msg=key)


@pytest.fixture(autouse=True)
def deterministic_cuda():
    """On CUDA: deterministic algorithms (no atomic-add reductions) and the math attention backend, so
    that the captured and uncaptured steps run the same kernels in the same order."""
    if DEVICE != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415 - CUDA runs only

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.use_deterministic_algorithms(False)


ON_CUDA = pytest.mark.skipif(DEVICE != "cuda", reason="a CUDA graph needs ADDREPRO_TEST_DEVICE=cuda and a GPU")


@ON_CUDA
@pytest.mark.parametrize("case", list(CASES))
def test_the_captured_step_logs_and_saves_what_the_step_run_as_it_is_does(tmp_path, one_thread, monkeypatch, case):
    built = []
    monkeypatch.setattr(train_step.TrainStep, "__init__", recorded(train_step.TrainStep.__init__, built))
    graph = run(tmp_path, "graph", CASES[case], "trainer.cuda_graph=true")
    eager = run(tmp_path, "eager", CASES[case])
    ws = built[0]  # the captured step really ran, for all members at once
    assert ws.capture_error is None
    assert ws.eager_steps == train_step.WARMUP_STEPS and ws.replays == STEPS - train_step.WARMUP_STEPS
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


def test_a_resumed_run_of_the_step_continues_exactly(tmp_path, one_thread):
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


@ON_CUDA
def test_a_diverging_member_is_stopped_as_when_the_step_runs_as_it_is(tmp_path, one_thread):
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


@pytest.mark.parametrize("sampler", ["uniform", "carry_enriched", "carry_balanced", "curriculum"])
def test_the_step_never_reads_the_host_not_even_at_logging_steps(tmp_path, one_thread, monkeypatch, sampler):
    """What a CUDA graph cannot capture, seen on any device: no value read on the host, no tensor
    built from Python data, no copy between devices, in any step after the first (which, logging,
    sizes the metrics buffer). The step is run as a capture runs it: computing its metrics."""
    flagged, steps = [], []
    original = train_step.TrainStep.run

    def checked(self, log_metrics):  # noqa: ANN001, ANN202
        if self.buffer is None:
            return original(self, True)
        with HostSyncs() as check:
            original(self, True)
        steps.append(int(self.opt.step_count))
        flagged.extend(check.seen)

    monkeypatch.setattr(train_step.TrainStep, "run", checked)
    monkeypatch.setattr(train_step.TrainStep, "__init__", cpu_only(train_step.TrainStep.__init__))
    extra = ["data.curriculum_steps=3"] if sampler == "curriculum" else []  # its stage moves during the run
    run(tmp_path, "m", CASES["stack of 8"][:2], "trainer.cuda_graph=true", f"data.sampler={sampler}", *extra, steps=12)
    assert steps == list(range(2, 13))  # counted after each update; logging steps (5, 10) included
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


@ON_CUDA
def test_the_graph_and_its_memory_are_released_when_a_fit_ends(tmp_path, one_thread):
    run(tmp_path, "first", CASES["single, warmup"], "trainer.cuda_graph=true", steps=10)  # CUDA's libraries load
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    run(tmp_path, "second", CASES["stack of 8"], "trainer.cuda_graph=true", steps=10)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@ON_CUDA
def test_a_failed_capture_falls_back_to_the_uncaptured_step_naming_the_first_error(
    tmp_path, one_thread, monkeypatch, caplog
):
    built, original = [], train_step.TrainStep.run

    def run_with_a_host_read(self, log_metrics):  # noqa: ANN001, ANN202
        if torch.cuda.is_current_stream_capturing():
            self.opt.step_tensor.item()  # a host read: not capturable
        return original(self, log_metrics)

    monkeypatch.setattr(train_step.TrainStep, "run", run_with_a_host_read)
    monkeypatch.setattr(train_step.TrainStep, "__init__", recorded(train_step.TrainStep.__init__, built))
    graph = run(tmp_path, "graph", CASES["single, warmup"], "trainer.cuda_graph=true", steps=12)
    eager = run(tmp_path, "eager", CASES["single, warmup"], steps=12)
    step = built[0]
    assert step.capture_error is not None and step.graph is None and step.replays == 0
    assert [r.message for r in caplog.records if "capture failed" in r.message] == [
        f"addrepro: CUDA graph capture failed ({step.capture_error}); training on without it"
    ]
    # the generators were put back: the run goes on exactly as one that never tried to capture
    assert_same(load_rows(graph[0].job_dir), load_rows(eager[0].job_dir))
