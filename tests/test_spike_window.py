"""Every step around a spike, replayed: the replay is the run (its logged rows, from a checkpoint or from
the initialisation), Adam's first update has its closed form, and rises are found where they were planted."""

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import FAST, run_cli
from omegaconf import OmegaConf

from addrepro.model.transformer import Transformer, parameter_group
from addrepro.reports import spike_window
from addrepro.reports.job import load_spikes
from addrepro.reports.spike_report import adam_scale
from addrepro.reports.spike_window import rise_step
from addrepro.rundir.checkpoints import load_checkpoint, save_checkpoint
from addrepro.rundir.metrics_file import load_rows
from addrepro.training.config import architecture, task_spec, typed
from addrepro.training.replay import replay

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, EVERY = 60, 20
RUN = [
    "data.n_digits=3",
    "model.width=32",
    f"trainer.max_steps={STEPS}",
    f"trainer.ckpt_every_n_steps={EVERY}",
    "trainer.plots=false",
    "logger.wandb.enabled=false",
    *FAST,
    # A hair-trigger spike detector: a noisy train loss rises above its trend many times.
    "metrics.spike_factor=1.001",
    "metrics.spike_min_excess=0",
]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("spike_window")
    proc = run_cli("addrepro.train", [*RUN, "hydra.run.dir=job"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "job"


def test_the_replay_takes_the_runs_own_steps_from_a_checkpoint_or_from_the_initialisation(job):
    logged = {r["step"]: r for r in load_rows(job) if "train/loss" in r}
    state = load_checkpoint(job / "checkpoints" / f"step_{EVERY}.ckpt")
    from_checkpoint = replay(state["config"], 2 * EVERY + 5, state=state)
    from_start = replay(state["config"], 2 * EVERY + 5, record_from=EVERY)
    assert [r["step"] for r in from_checkpoint] == [r["step"] for r in from_start] == list(range(EVERY, 2 * EVERY + 5))
    compared = 0
    for a, b in zip(from_checkpoint, from_start, strict=True):
        # The same computations in the same order, whichever way the state at step EVERY was reached.
        assert a == b, a["step"]
        if a["step"] in logged:
            compared += 1
            for key in ("train/loss", "train/loss/place_0", "train/grad_norm/global", "train/lr"):
                assert a[key] == logged[a["step"]][key], (a["step"], key)
    assert compared == 5  # logged every 5 steps: 20, 25, ..., 40


def test_adams_first_update_has_its_closed_form(job):
    """From zero moments, v̂ = g² after the first update (so the group's RMS of sqrt(v̂) times its size
    gives back the gradient norm), and with no warmup and no decay every weight moves by lr·g/(|g| + eps):
    the unembedding (whose gradient has no zero element) moves by lr·sqrt(its size)."""
    config = copy.deepcopy(load_checkpoint(job)["config"])
    config["optimizer"].update(warmup_steps=0, weight_decay=0.0)
    (row,) = replay(config, 1)
    cfg = typed(OmegaConf.create(config))
    spec = task_spec(cfg.data)
    model = Transformer(architecture(cfg.model, spec), seeds=[cfg.run.seed])  # the replay's initialisation
    sizes, norms = {}, {}
    for name, p in model.named_parameters():
        for group in ("global", parameter_group(name)):
            sizes[group] = sizes.get(group, 0) + p[0].numel()
            norms[group] = norms.get(group, 0.0) + float(p[0].detach().double().square().sum())
    for group, size in sizes.items():
        grad = row[f"train/grad_norm/{group}"]
        assert math.isclose(row[f"adam/{group}"] ** 2 * size, grad**2, rel_tol=1e-4), group
    lr = config["optimizer"]["lr"]
    moved = row["update/unembed"] * math.sqrt(norms["unembed"])
    assert math.isclose(moved, lr * math.sqrt(sizes["unembed"]), rel_tol=1e-3)

    # With the configured warmup the first step's learning rate is 0: nothing moves.
    (row,) = replay(load_checkpoint(job)["config"], 1)
    assert all(row[f"update/{g}"] == 0 for g in sizes)


def test_the_spike_snapshots_hold_adams_second_moments_as_the_replay_sees_them(job):
    """A spike's snapshots keep each weight's exp_avg_sq once that log step's update had taken it in: the
    report's sqrt(v̂) per group is the replay's at the same steps, to the last bit."""
    spike = load_spikes(job)[0]
    first = spike.get("first_step", spike["step"])
    points = {p: load_checkpoint(job / "checkpoints" / f"spike_{first}_{p}.ckpt") for p in ("before", "at")}
    start = max(s for s in (0, EVERY, 2 * EVERY) if s <= points["before"]["step"])
    state = load_checkpoint(job / "checkpoints" / f"step_{start}.ckpt") if start else None
    config = points["at"]["config"]
    rows = {r["step"]: r for r in replay(config, points["at"]["step"] + 1, record_from=start, state=state)}
    for ckpt in points.values():
        scales = adam_scale(ckpt)
        assert scales is not None and set(scales) >= {"global", "attn", "mlp", "embed", "unembed"}
        for group, value in scales.items():
            assert value == rows[ckpt["step"]][f"adam/{group}"], (ckpt["step"], group)


def test_a_run_whose_data_were_drawn_on_a_gpu_is_not_replayed_on_the_cpu(job, tmp_path):
    copy = tmp_path / "gpu_run"
    shutil.copytree(job, copy)
    for path in (copy / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, weights_only=True)
        if "data" in ckpt:
            ckpt["data"] = {"generator": torch.zeros(16, dtype=torch.uint8), "device": "cuda"}
            save_checkpoint(path, ckpt)
    for at in ([EVERY + 5], [3]):  # from a checkpoint, and from the initialisation
        with pytest.raises(ValueError, match="drew its data on cuda: a replay on the CPU would train on other batches"):
            spike_window.run(copy, at=at, before=2, after=2)


def test_rises_are_found_where_they_were_planted():
    rows = [{"step": s, "x": 1.0 + 0.1 * (s % 3)} for s in range(100, 160)]
    rows[10]["x"] = 5.0  # one step above twice the median: noise, not a rise
    for r in rows[40:]:
        r["x"] = 3.0  # from step 140 on: risen
    assert rise_step(rows, "x", centre=130, rise=2.0) == 140
    assert rise_step(rows, "x", centre=130, rise=4.0) is None
    opens_above = [{"step": s, "x": 5.0 if s < 105 else 1.0} for s in range(100, 160)]
    assert rise_step(opens_above, "x", centre=130, rise=2.0) is None


def test_analyze_spikes_writes_the_windows_and_refuses_bad_options_in_one_line(job, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "addrepro.analyze",
        [
            f"checkpoint={job}",
            "analysis=spikes",
            "spikes.at=[27]",
            "spikes.before=5",
            "spikes.after=8",
            f"out_dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "spike_windows.json").read_text())
    (window,) = result["windows"]
    assert window["from_step"] == EVERY and [r["step"] for r in window["rows"]] == list(range(22, 35))
    assert window["logged_steps_compared"] == 2 and window["largest_logged_difference"] == 0
    assert "## Step 27" in (out / "spike_windows.md").read_text()
    assert (out / "spike_windows.png").stat().st_size > 10_000
    for args, said in (
        (["spikes.rise=1"], "spikes.rise=1 is invalid: must be a number > 1"),
        (["spikes.at=[-3]"], "spikes.at=[-3] is invalid"),
        (["spikes.before=0", "spikes.after=0"], "leave no step to replay"),
        ([f"checkpoint={job / 'checkpoints' / 'last.ckpt'}"], "is one file: spikes reads a whole job"),
    ):
        given = [f"checkpoint={job}", "analysis=spikes", f"out_dir={out}/bad", *args]
        proc = run_cli("addrepro.analyze", given, tmp_path)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "bad").exists()
    calm = tmp_path / "calm"
    shutil.copytree(job, calm)
    (calm / "spikes.json").write_text("[]")
    proc = run_cli("addrepro.analyze", [f"checkpoint={calm}", "analysis=spikes"], tmp_path)
    assert proc.returncode == 2 and "spikes.json lists no spike: give spikes.at=[...]" in proc.stderr
