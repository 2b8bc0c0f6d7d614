"""The default run is reproduced bitwise, and a checkpoint written by an earlier addrepro resumes.

``tests/reference/default_300`` holds what the default config (300 steps, one thread, CSV logger)
wrote before the code was reorganised into subpackages: its metrics file, the hashes of its final
weights and its step-200 checkpoint. Bitwise equality only holds on the same kind of CPU and torch
build (BLAS kernels round differently across CPUs), so those comparisons run where the reference
was made and are skipped elsewhere; that the old checkpoint loads and resumes is checked everywhere.
"""

import csv
import hashlib
import json

import pytest
import torch
from conftest import REPO, run_cli

REF = REPO / "tests" / "reference" / "default_300"
ARGS = ["trainer.max_steps=300", "logger=csv", "trainer.plots=false", "trainer.progress_bar=false"]


def machine() -> dict:
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx2", "fma")
    return {
        "cpu": info.get("model name", ""),
        "torch": torch.__version__,
        "flags": sorted(f for f in info.get("flags", "").split() if f in wanted),
    }


def reference() -> dict:
    return json.loads((REF / "final_weights.json").read_text())


def same_machine() -> bool:
    return machine() == reference()["machine"]


def weight_hashes(path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in ckpt["model"].items()}


def read_rows(path, keys=None) -> dict[int, dict]:
    """Rows by step; with ``keys``, only those columns (metrics added since the reference are ignored)."""
    with open(path) as f:
        rows = {int(r["step"]): {k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)}
    return {s: {k: v for k, v in r.items() if keys is None or k in keys} for s, r in rows.items()}


def reference_keys() -> set[str]:
    with open(REF / "metrics.csv") as f:
        return set(next(csv.reader(f)))


def one_thread_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


def test_default_run_reproduces_the_reference_bitwise(tmp_path, monkeypatch):
    if not same_machine():
        pytest.skip(f"reference made on {reference()['machine']}, this is {machine()}")
    one_thread_env(monkeypatch)
    proc = run_cli("addrepro.train", [*ARGS, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_rows(tmp_path / "run" / "csv" / "metrics.csv", reference_keys()) == read_rows(REF / "metrics.csv")
    assert weight_hashes(tmp_path / "run" / "checkpoints" / "last.ckpt") == reference()["weights_sha256"]


def test_a_checkpoint_of_the_earlier_layout_resumes(tmp_path, monkeypatch):
    one_thread_env(monkeypatch)
    job = tmp_path / "job"
    (job / "checkpoints").mkdir(parents=True)
    # Checkpoints store their run's config; keys added to addrepro since then take today's defaults. This
    # one predates metrics.spike_min_excess, and trainer.compile is removed too, as if written before it.
    ckpt = torch.load(REF / "old_layout_step_200.ckpt", weights_only=True)
    assert "spike_min_excess" not in ckpt["config"]["metrics"]
    del ckpt["config"]["trainer"]["compile"]
    torch.save(ckpt, job / "checkpoints" / "step_200.ckpt")
    proc = run_cli("addrepro.train", [*ARGS, f"resume={job}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    last = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["step"] == 300
    rows = read_rows(job / "csv" / "metrics.csv", reference_keys())
    assert min(rows) == 200 and max(rows) == 300
    if same_machine():  # the resumed run ends exactly where the uninterrupted reference run ended
        assert weight_hashes(job / "checkpoints" / "last.ckpt") == reference()["weights_sha256"]
        expected = {s: r for s, r in read_rows(REF / "metrics.csv").items() if s >= 200}
        assert rows == expected
