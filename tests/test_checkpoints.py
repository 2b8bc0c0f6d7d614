"""Tests for addrepro.rundir.checkpoints: atomic writes, loading errors, compatibility and schedules."""

import pickle
from dataclasses import asdict

import pytest
import torch

from addrepro.model.transformer import ModelConfig, Transformer
from addrepro.rundir.atomic import atomic_write
from addrepro.rundir.checkpoints import (
    FORMAT,
    CheckpointError,
    check_compatible,
    checkpoint_steps,
    load_checkpoint,
    log_spaced_steps,
    model_from_checkpoint,
    save_checkpoint,
)
from addrepro.task.spec import TaskSpec


class Boom(Exception):
    pass


def failing_writer(f):
    f.write(b"partial bytes that must never become the file")
    f.flush()
    raise Boom("writer died")


# -----------------------------------------------------------------------------
# atomic_write


def test_atomic_write_success_leaves_only_the_file(tmp_path):
    path = tmp_path / "sub" / "out.bin"  # parent folders are created
    atomic_write(path, lambda f: f.write(b"hello"))
    assert path.read_bytes() == b"hello"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]
    atomic_write(path, lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]


def test_atomic_write_failure_leaves_no_file(tmp_path):
    path = tmp_path / "new.ckpt"
    with pytest.raises(Boom):
        atomic_write(path, failing_writer)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_atomic_write_failure_keeps_old_file(tmp_path, exc):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old contents")

    def writer(f):
        f.write(b"new half")
        raise exc()

    with pytest.raises(exc):
        atomic_write(path, writer)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# -----------------------------------------------------------------------------
# save / load


def small_model_checkpoint(spec: TaskSpec, cfg: ModelConfig, seed: int) -> tuple[dict, Transformer]:
    model = Transformer(cfg, seeds=seed)
    payload = {
        "task": asdict(spec),
        "model_config": cfg.to_dict(),
        "config": {"seed": seed},
        "step": 12,
        "model": model.member_state_dict(0),
    }
    return payload, model


SPEC = TaskSpec(n_digits=2, base=10, order="lsb")
CFG = ModelConfig(d_vocab=12, d_vocab_out=10, n_ctx=8, d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32)


def test_save_load_round_trip(tmp_path):
    payload, model = small_model_checkpoint(SPEC, CFG, seed=5)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    save_checkpoint(path, payload)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT
    assert ckpt["step"] == 12 and ckpt["config"] == {"seed": 5}
    rebuilt, spec = model_from_checkpoint(ckpt)
    assert spec == SPEC
    assert rebuilt.n_models == 1
    for name, t in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], t), name
    tokens = torch.randint(0, 12, (3, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(rebuilt(tokens), model(tokens))
    # a run folder resolves to checkpoints/last.ckpt
    assert load_checkpoint(tmp_path / "run")["step"] == 12


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_folder_without_last_ckpt(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints/last.ckpt") as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_load_truncated_file(tmp_path):
    payload, _ = small_model_checkpoint(SPEC, CFG, seed=1)
    path = tmp_path / "trunc.ckpt"
    save_checkpoint(path, payload)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        "torch-dict-without-format",
        "torch-dict-wrong-format",
        "torch-list",
        "text",
        "empty",
        "pickled-code",
    ],
)
def test_load_foreign_files(tmp_path, content):
    path = tmp_path / f"{content}.ckpt"
    if content == "torch-dict-without-format":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif content == "torch-dict-wrong-format":
        torch.save({"format": "addrepro-checkpoint/0", "model": {}}, path)
    elif content == "torch-list":
        torch.save([1, 2, 3], path)
    elif content == "text":
        path.write_text("this is not a checkpoint\n")
    elif content == "empty":
        path.write_bytes(b"")
    else:  # a pickle that would run code: weights_only loading must refuse it
        path.write_bytes(pickle.dumps(Boom("x"), protocol=2))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert ("not an addrepro checkpoint" in message) or ("cannot be read" in message)
    if content.startswith("torch-"):
        assert "not an addrepro checkpoint" in message


# -----------------------------------------------------------------------------
# check_compatible


def test_check_compatible_same_config_passes():
    payload, _ = small_model_checkpoint(SPEC, CFG, seed=0)
    check_compatible(payload, asdict(SPEC), CFG.to_dict(), path="x.ckpt")


def test_check_compatible_names_differing_keys():
    payload, _ = small_model_checkpoint(SPEC, CFG, seed=0)
    task = asdict(TaskSpec(n_digits=2, base=16, order="lsb"))
    model_config = dict(CFG.to_dict(), d_model=32)
    with pytest.raises(CheckpointError) as info:
        check_compatible(payload, task, model_config, path="runs/a/last.ckpt")
    message = str(info.value)
    assert "runs/a/last.ckpt" in message
    assert "data.base: checkpoint 10 vs config 16" in message
    assert "model.d_model: checkpoint 16 vs config 32" in message
    # keys that agree are not mentioned
    for same in ("n_digits", "order", "n_heads", "d_mlp", "init"):
        assert f".{same}:" not in message


def test_check_compatible_key_on_one_side_only():
    payload, _ = small_model_checkpoint(SPEC, CFG, seed=0)
    model_config = CFG.to_dict()
    del model_config["init_std"]
    task = dict(asdict(SPEC), extra=1)
    with pytest.raises(CheckpointError) as info:
        check_compatible(payload, task, model_config)
    message = str(info.value)
    assert "model.init_std: checkpoint 0.02 vs config None" in message
    assert "data.extra: checkpoint None vs config 1" in message


# -----------------------------------------------------------------------------
# checkpoint_steps


@pytest.mark.parametrize("max_steps,every", [(3000, 1000), (3001, 1000), (2999, 1000), (10, 3), (5, 7), (1, 1)])
def test_resumable_checkpoints_every_n_steps(max_steps, every):
    expected = [s for s in range(1, max_steps + 1) if s % every == 0]
    assert checkpoint_steps(max_steps, every) == expected


def test_resumable_checkpoint_examples():
    assert checkpoint_steps(3000, 1000) == [1000, 2000, 3000]
    assert checkpoint_steps(10, 4) == [4, 8]


@pytest.mark.parametrize("max_steps,count", [(1000, 4), (3000, 20), (100000, 10), (50, 20), (7, 3)])
def test_log_spaced_steps(max_steps, count):
    steps = log_spaced_steps(max_steps, count)
    periodic = [s for s in steps if s != 0]
    # log-spaced from 1 to max_steps: round(max_steps^(i / (count - 1)))
    expected = sorted({round(max_steps ** (i / (count - 1))) for i in range(count)})
    assert periodic == expected
    assert periodic[0] == 1 and periodic[-1] == max_steps
    assert steps == sorted(set(steps))
    # geometric spacing: successive ratios never exceed the nominal ratio by more than rounding
    ratio = max_steps ** (1 / (count - 1))
    for lo, hi in zip(periodic, periodic[1:], strict=False):
        assert hi / lo <= ratio * (1 + 1 / lo) + 1e-9


def test_log_spaced_examples():
    assert [s for s in log_spaced_steps(1000, 4) if s] == [1, 10, 100, 1000]
    assert [s for s in log_spaced_steps(10000, 5) if s] == [1, 10, 100, 1000, 10000]
    # rounding collapses duplicates when there are more points than steps
    assert [s for s in log_spaced_steps(5, 20) if s] == [1, 2, 3, 4, 5]
    assert [s for s in log_spaced_steps(100, 1) if s] == [1]


def test_log_spaced_steps_start_with_the_initialisation():
    # Step 0 is kept on purpose: the initial weights are the start of every over-training analysis.
    assert log_spaced_steps(1000, 4) == [0, 1, 10, 100, 1000]
