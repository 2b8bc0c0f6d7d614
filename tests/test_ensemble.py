"""Stacked ensembles: every member trains exactly like a single run with its settings."""

import json

import numpy as np
import torch
from conftest import FAST, REPO
from hydra import compose, initialize_config_dir

from addrepro.rundir.job import job_dirs
from addrepro.rundir.metrics_file import load_rows
from addrepro.train import JobPlan, train
from addrepro.training.ensemble import pack, packing_key
from addrepro.wandb_offline import read_run

SMALL = [
    "data.n_digits=3",
    "model.width=32",
    "trainer.max_steps=40",
    "logger=csv",
    "trainer.plots=false",
    "trainer.log_every_n_steps=5",
    "trainer.val_every_n_steps=20",
    "metrics.every_n_steps=20",
    "metrics.carry_set_size=8",
    "metrics.chain_set_size=4",
    "data.val_size=64",
    "trainer.progress_bar=false",
]


def config(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[*SMALL, *overrides])


def final_weights(job_dir):
    return torch.load(job_dir / "checkpoints" / "last.ckpt", weights_only=True)["model"]


def test_members_equal_single_runs_bitwise(tmp_path, one_thread):
    settings = [
        ("seed=0", "optimizer.lr=1e-3", "optimizer.weight_decay=0.1"),
        ("seed=1", "optimizer.lr=3e-3", "optimizer.weight_decay=0.0"),
        ("seed=2", "optimizer.lr=1e-3", "optimizer.weight_decay=1.0"),
    ]
    cfgs = [config(*s) for s in settings]
    assert len({packing_key(c) for c in cfgs}) == 1
    plans = [JobPlan(c, tmp_path / f"member{i}", f"m{i}", "g", True) for i, c in enumerate(cfgs)]
    for p in plans:
        p.job_dir.mkdir()
    stacked_finals = train(plans)
    for i, cfg in enumerate(cfgs):
        single = JobPlan(cfg, tmp_path / f"single{i}", "s", "g", False)
        single.job_dir.mkdir()
        (single_final,) = train([single])
        a, b = final_weights(plans[i].job_dir), final_weights(single.job_dir)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (i, name)
        drop = {"member"}
        assert {k: v for k, v in single_final.items() if k not in drop} == {
            k: v for k, v in stacked_finals[i].items() if k not in drop
        }
    # Members really differ from each other (different seeds and settings).
    assert not torch.equal(final_weights(plans[0].job_dir)["embed.W_E"], final_weights(plans[1].job_dir)["embed.W_E"])


def test_packing_groups_only_shape_compatible_jobs():
    cfgs = [
        config("seed=0"),
        config("seed=1", "optimizer.lr=3e-3"),
        config("model.width=64"),
        config("seed=5", "data.seed=9", "optimizer.weight_decay=0.5"),
        config("data.base=2"),
    ]
    keys = [packing_key(c) for c in cfgs]
    groups = pack(list(range(5)), keys, max_members=64)
    assert groups == [[0, 1, 3], [2], [4]]
    assert pack(list(range(5)), ["k"] * 5, max_members=2) == [[0, 1], [2, 3], [4]]


def test_ensemble_launcher_gives_each_member_its_own_run_and_fails_only_the_diverging_ones(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "addrepro.train",
        "-m",
        "seed=0,1",
        "optimizer.lr=1e30,1e-3",  # jobs 0 and 2 diverge
        "hydra/launcher=ensemble",
        "data.n_digits=2",
        "model.width=32",
        "trainer.max_steps=30",
        "trainer.plots=false",
        f"hydra.sweep.dir={sweep}",
        *FAST,
    )
    assert proc.returncode == 1
    assert "training 4 job(s) as one stack" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [summary[job.name]["status"] for job in job_dirs(sweep)] == ["failed", "ok", "failed", "ok"]
    assert (
        "non-finite" in summary[job_dirs(sweep)[0].name]["message"]
        and "addrepro: sweep" in proc.stderr
        and "2/4 jobs ok" in proc.stderr
    )
    runs = [read_run(job_dirs(sweep)[j]) for j in range(4)]
    assert len({r.run_id for r in runs}) == 4 and len({r.group for r in runs}) == 1
    assert [r.name for r in runs] == [f"seed={s},optimizer.lr={lr}" for s in (0, 1) for lr in ("1e+30", "0.001")]
    assert [r.config["seed"] for r in runs] == [0, 0, 1, 1]
    assert [r.exit_code for r in runs] == [1, 0, 1, 0]
    assert runs[1].history_keys == runs[3].history_keys and "train/loss/place_2" in runs[1].history_keys
    assert runs[1].series("train/loss")[1][-1] != runs[3].series("train/loss")[1][-1]  # two different models
    for j in (1, 3):
        ckpt = torch.load(job_dirs(sweep)[j] / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["config"]["seed"] == j // 2 and ckpt["model"]["embed.W_E"].dim() == 2  # a single model
        assert json.loads((job_dirs(sweep)[j] / "status.json").read_text())["status"] == "ok"
    for j in (0, 2):
        assert not (job_dirs(sweep)[j] / "checkpoints" / "last.ckpt").exists()
        assert json.loads((job_dirs(sweep)[j] / "status.json").read_text())["status"] == "failed"


def test_a_diverging_member_fails_alone_and_the_others_train_on_unchanged(tmp_path, one_thread):
    bad, good = config("optimizer.lr=1e30"), config("optimizer.lr=1e-3")
    plans = [JobPlan(c, tmp_path / f"member{i}", f"m{i}", "g", True) for i, c in enumerate((bad, good))]
    single = JobPlan(good, tmp_path / "single", "s", "g", False)
    for p in [*plans, single]:
        p.job_dir.mkdir()
    finals = train(plans)
    assert finals[0]["diverged"].startswith("step ") and "non-finite" in finals[0]["diverged"]
    assert "member0" in finals[0]["diverged"]
    # Only finite weights are saved, in every kind of checkpoint (log-spaced ones fall between the
    # update that broke the weights and the logged loss that shows it): some of the healthy member's
    # files are missing from the diverged one's, and every file it has is finite.
    saved = sorted((plans[0].job_dir / "checkpoints").glob("*.ckpt"))
    healthy_names = {p.name for p in (plans[1].job_dir / "checkpoints").glob("weights_*.ckpt")}
    assert saved and {p.name for p in saved} < healthy_names | {"step_0.ckpt"}
    assert all(t.isfinite().all() for p in saved for t in torch.load(p, weights_only=True)["model"].values())
    (single_final,) = train([single])
    assert {k: v for k, v in finals[1].items() if k != "member"} == {
        k: v for k, v in single_final.items() if k != "member"
    }
    a, b = final_weights(plans[1].job_dir), final_weights(single.job_dir)
    assert all(torch.equal(a[name], b[name]) for name in b)
    # Metrics too; grad norms are summed over a (groups, K) tensor, whose float rounding depends on K,
    # so the rows are compared with those of a healthy stack of the same size.
    healthy = [
        JobPlan(c, tmp_path / f"healthy{i}", f"h{i}", "g", True)
        for i, c in enumerate((config("optimizer.lr=2e-3"), good))
    ]
    for p in healthy:
        p.job_dir.mkdir()
    train(healthy)
    assert load_rows(plans[1].job_dir) == load_rows(healthy[1].job_dir)
    drop = lambda rows: [{k: v for k, v in r.items() if "grad_norm" not in k} for r in rows]  # noqa: E731
    assert drop(load_rows(plans[1].job_dir)) == drop(load_rows(single.job_dir))
    # The failed member saved nothing past its divergence, and kept the rows before it.
    assert not (plans[0].job_dir / "checkpoints" / "last.ckpt").exists()
    diverged_at = int(finals[0]["diverged"].split()[1].rstrip(":"))
    rows = load_rows(plans[0].job_dir)
    assert rows and rows[0]["step"] == 0 and all(r["step"] <= diverged_at for r in rows)


def test_a_resumed_stack_ends_with_each_members_own_files(tmp_path, one_thread):
    """Each member's confusion matrices, spikes and metrics continue from its own files, not member 0's."""
    extra = ("trainer.ckpt_every_n_steps=20", "trainer.ckpt_schedule=linear", "metrics.spike_factor=1.001")
    extra += ("metrics.spike_min_excess=0",)  # any rise above the trend is a spike: the files have content
    cfgs = [config(f"seed={s}", *extra) for s in (0, 1)]

    def plans(root):
        out = [JobPlan(c, root / f"m{i}", f"m{i}", "g", True) for i, c in enumerate(cfgs)]
        for p in out:
            p.job_dir.mkdir(parents=True)
        return out

    full = plans(tmp_path / "full")
    train(full)
    # The same stack stopped after 20 of its 40 steps (a shorter run, same numbers up to there) ...
    cut = plans(tmp_path / "cut")
    short = [config(f"seed={s}", *extra, "trainer.max_steps=20") for s in (0, 1)]
    train([JobPlan(c, p.job_dir, p.name, "g", True) for c, p in zip(short, cut, strict=True)])
    # ... then resumed from its checkpoint at step 20 to step 40.
    step_20 = [p.job_dir / "checkpoints" / "step_20.ckpt" for p in cut]
    train([JobPlan(p.cfg, p.job_dir, p.name, "g", True, resume_from=c) for p, c in zip(cut, step_20, strict=True)])
    for a, b in zip(full, cut, strict=True):
        assert load_rows(a.job_dir) == load_rows(b.job_dir)
        ca, cb = np.load(a.job_dir / "confusion.npz"), np.load(b.job_dir / "confusion.npz")
        assert np.array_equal(ca["steps"], cb["steps"])
        assert np.array_equal(ca["confusion"], cb["confusion"], equal_nan=True)
        for name in ("spikes.json", "shelf_exits.json"):
            assert (a.job_dir / name).read_text() == (b.job_dir / name).read_text(), name
    # the members' matrices differ (the check above would not notice member 0's copied into member 1)
    c0, c1 = (np.load(p.job_dir / "confusion.npz")["confusion"] for p in full)
    assert not np.array_equal(c0, c1, equal_nan=True)
