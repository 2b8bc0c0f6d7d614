"""The end-of-run reports of a stack's members, drawn in parallel processes, equal those drawn one by one."""

import pickle
import shutil

from omegaconf import OmegaConf
from test_ensemble import config

from addrepro.rundir.metrics_file import load_rows
from addrepro.train import JobPlan, draw, train
from addrepro.training.callbacks import draw_jobs


def test_members_drawn_in_processes_equal_members_drawn_here(tmp_path, one_thread):
    cfgs = [config(f"seed={s}", "trainer.max_steps=60") for s in (0, 1, 2)]
    plans = [JobPlan(c, tmp_path / f"m{k}", f"m{k}", "g", True) for k, c in enumerate(cfgs)]
    for p in plans:
        p.job_dir.mkdir()
    train(plans)  # plots off: the files below are drawn by draw_jobs alone
    assert pickle.loads(pickle.dumps(draw)) is draw  # what sends it to the processes
    results = {}
    for workers in (1, 2):
        jobs = []
        for p in plans:
            job = shutil.copytree(p.job_dir, tmp_path / f"w{workers}" / p.job_dir.name)
            jobs.append((job, load_rows(job), OmegaConf.to_container(p.cfg, resolve=True), True))
        paths = draw_jobs(draw, jobs, workers)
        assert [len(p) for p in paths] == [len(paths[0])] * 3 and any(p.suffix == ".png" for p in paths[0])
        results[workers] = {p.relative_to(tmp_path / f"w{workers}"): p.read_bytes() for job in paths for p in job}
    assert results[1] == results[2]
