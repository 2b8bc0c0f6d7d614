"""Tests for addrepro.training.config.validate on the real Hydra config composed with overrides."""

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_dir

import addrepro.train  # noqa: F401  (registers the `uid` resolver used by conf/hydra)
from addrepro.training.config import ConfigError, all_keys, check_override_grammar, check_override_keys, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
NO_CUDA_CHECK = torch.cuda.is_available()  # on a GPU machine accelerator=gpu is a good value


@pytest.fixture(scope="module")
def make_cfg():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides=(): compose(config_name="train", overrides=list(overrides))


def test_default_config_passes(make_cfg):
    validate(make_cfg())


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.base=2"],
        ["data.base=36"],
        ["data.n_digits=1"],
        ["model.width=130", "model.d_head=10"],  # not divisible by 4 heads, but d_head is given
        ["model.width=132", "model.n_heads=4"],
        ["data.order=lsb", "data.task=digitwise"],
        ["model.normalization=LN", "model.attn_only=true", "model.act_fn=gelu", "model.init=normal"],
        ["data.train_size=1000", "data.val_size=100"],
        ["data.train_size=1000", "data.batch_size=null"],  # full batch
        ["data.base=2", "data.n_digits=2", "data.train_size=12", "data.val_size=4"],  # exactly all 16 pairs
        ["optimizer.weight_decay=0", "optimizer.warmup_steps=0", "optimizer.betas=[0,0.999]"],
        ["trainer.max_steps=1", "trainer.ckpt_schedule=log", "trainer.ckpt_log_count=1"],
        ["trainer.accelerator=cpu", "logger=csv"],
        ["logger=tensorboard"],
        ["logger=many"],
        ["seed=-3", "data.seed=17"],
    ],
)
def test_good_configs_pass(make_cfg, overrides):
    validate(make_cfg(overrides))


# (overrides, key, value as shown in the message, text of the allowed range)
BAD = [
    (["data.base=1"], "data.base", "1", "integer in 2..36"),
    (["data.base=37"], "data.base", "37", "integer in 2..36"),
    (["data.base=10.0"], "data.base", "10.0", "integer in 2..36"),
    (["data.base=true"], "data.base", "True", "integer in 2..36"),
    (["data.n_digits=0"], "data.n_digits", "0", "integer >= 1"),
    (["data.n_digits=-2"], "data.n_digits", "-2", "integer >= 1"),
    (["data.task=mul"], "data.task", "'mul'", "one of add, digitwise"),
    (["data.order=middle"], "data.order", "'middle'", "one of msb, lsb"),
    (["data.batch_size=0"], "data.batch_size", "0", "integer in 1..1048576"),
    (["data.batch_size=null"], "data.batch_size", "None", "null, full batch, needs data.train_size"),
    (["data.seed=abc"], "data.seed", "'abc'", "must be an integer"),
    (["seed=1.5"], "seed", "1.5", "must be an integer"),
    (["data.val_size=0"], "data.val_size", "0", "integer in 1..1000000"),
    (["data.train_size=0"], "data.train_size", "0", "integer in 1..100000000 or null"),
    (
        ["data.base=2", "data.n_digits=2", "data.train_size=13", "data.val_size=4"],
        "data.train_size",
        "13",
        "must not exceed the 16 distinct pairs",
    ),
    (["data.base=36", "data.n_digits=13", "data.train_size=10"], "data.train_size", "10", "2^62"),
    (["model.width=130"], "model.width", "130", "divisible by model.n_heads=4"),
    (["model.width=0"], "model.width", "0", "integer in 1..16384"),
    (["model.depth=0"], "model.depth", "0", "integer in 1..64"),
    (["model.n_heads=0"], "model.n_heads", "0", "integer in 1..256"),
    (["model.d_head=0"], "model.d_head", "0", "integer in 1..16384 or null"),
    (["model.d_mlp=-1"], "model.d_mlp", "-1", "integer in 1..65536 or null"),
    (["model.act_fn=tanh"], "model.act_fn", "'tanh'", "one of relu, gelu"),
    (["model.normalization=RMS"], "model.normalization", "'RMS'", "one of null, LN"),
    (["model.attn_only=maybe"], "model.attn_only", "'maybe'", "one of True, False"),
    (["model.attn_only=1"], "model.attn_only", "1", "one of True, False"),
    (["optimizer.betas=[false,0.9]"], "optimizer.betas", "[False, 0.9]", "two numbers in [0, 1)"),
    (["model.init=xavier"], "model.init", "'xavier'", "one of nanda, normal"),
    (["model.init_std=0"], "model.init_std", "0", "number > 0.0"),
    (["optimizer.lr=-1"], "optimizer.lr", "-1", "number > 0.0"),
    (["optimizer.lr=0"], "optimizer.lr", "0", "number > 0.0"),
    (["optimizer.lr=fast"], "optimizer.lr", "'fast'", "number > 0.0"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", "-0.1", "number >= 0.0"),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas", "[0.9, 1.0]", "two numbers in [0, 1)"),
    (["optimizer.betas=[0.9]"], "optimizer.betas", "[0.9]", "two numbers in [0, 1)"),
    (["optimizer.betas=[-0.1,0.9]"], "optimizer.betas", "[-0.1, 0.9]", "two numbers in [0, 1)"),
    (["optimizer.eps=0"], "optimizer.eps", "0", "number > 0.0"),
    (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps", "-1", "integer in 0..16777216"),
    (["trainer.max_steps=0"], "trainer.max_steps", "0", "integer in 1..16777216"),
    (["trainer.accelerator=tpu"], "trainer.accelerator", "'tpu'", "one of auto, cpu, gpu, cuda, mps"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps", "0", "integer >= 1"),
    (["trainer.val_every_n_steps=0"], "trainer.val_every_n_steps", "0", "integer >= 1"),
    (["trainer.ckpt_every_n_steps=0"], "trainer.ckpt_every_n_steps", "0", "integer >= 1"),
    (["trainer.ckpt_schedule=exp"], "trainer.ckpt_schedule", "'exp'", "one of linear, log"),
    (["trainer.ckpt_log_count=0"], "trainer.ckpt_log_count", "0", "integer in 1..10000"),
    (["trainer.matmul_precision=low"], "trainer.matmul_precision", "'low'", "one of highest, high, medium"),
    (["trainer.precision=16-mixed"], "trainer.precision", "'16-mixed'", "one of 32, bf16-mixed"),
    (["trainer.precision=bf16"], "trainer.precision", "'bf16'", "one of 32, bf16-mixed"),
    (["trainer.devices=1"], "trainer.devices", "1", "one GPU index in a list, e.g. [1]"),
    (["trainer.devices=[0,1]"], "trainer.devices", "[0, 1]", "one GPU index in a list, e.g. [1]"),
    (["trainer.devices=[-1]"], "trainer.devices", "[-1]", "one GPU index in a list, e.g. [1]"),
    (["trainer.threads=0"], "trainer.threads", "0", "must be auto, null (torch's default) or an integer in 1..1024"),
    (["trainer.threads=many"], "trainer.threads", "'many'", "must be auto, null"),
    (["metrics.every_n_steps=0"], "metrics.every_n_steps", "0", "integer >= 1"),
    (["logger.wandb.mode=cloud"], "logger.wandb.mode", "'cloud'", "one of offline, online, disabled"),
    (["optimizer.betas=0.9"], "optimizer.betas", "0.9", "two numbers in [0, 1)"),
    (["metrics.carry_set_size=1"], "metrics.carry_set_size", "1", "integer in 2..100000"),
    (["metrics.chain_set_size=-1"], "metrics.chain_set_size", "-1", "integer in 2..100000"),
    (["metrics.spike_window=0"], "metrics.spike_window", "0", "integer in 1..100000"),
    (["metrics.spike_factor=abc"], "metrics.spike_factor", "'abc'", "number > 1.0"),
    (["logger.wandb.init_timeout=abc"], "logger.wandb.init_timeout", "'abc'", "number > 0.0"),
    (["logger.wandb.init_timeout=-5"], "logger.wandb.init_timeout", "-5", "number > 0.0"),
    (["logger.csv=maybe"], "logger.csv", "'maybe'", "one of True, False"),
    (["model.attn_only=true", "model.d_mlp=64"], "model.d_mlp", "64", "must be null when model.attn_only=true"),
    *([(["trainer.accelerator=gpu"], "trainer.accelerator", "'gpu'", "no CUDA GPU")] if not NO_CUDA_CHECK else []),
    (["logger.tensorboard=yes"], "logger.tensorboard", "'yes'", "one of True, False"),
]


@pytest.mark.parametrize("overrides,key,shown,allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_raises_config_error(make_cfg, overrides, key, shown, allowed):
    cfg = make_cfg(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    err = info.value
    message = str(err)
    assert err.key == key
    assert message.startswith(f"{key}={shown} is invalid: ")
    assert allowed in message
    assert isinstance(err, ValueError)


def test_val_seed_is_validated(make_cfg):
    # a non-integer val_seed passes validation and only fails later in torch.Generator.manual_seed
    with pytest.raises(ConfigError, match="data.val_seed"):
        validate(make_cfg(["data.val_seed=abc"]))


def test_config_error_attributes():
    err = ConfigError("data.base", 99, "must be an integer in 2..36")
    assert (err.key, err.value, err.allowed) == ("data.base", 99, "must be an integer in 2..36")
    assert str(err) == "data.base=99 is invalid: must be an integer in 2..36"


def test_tensorboard_without_its_package_is_one_line(make_cfg, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    hidden = lambda name, *a: None if "tensorboard" in name.lower() else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(["logger=tensorboard"]))
    needs = 'needs the tensorboard package: pip install "addrepro[tensorboard]"'
    assert str(err.value) == f"logger.tensorboard=True is invalid: {needs}"


NOT_A_KEY = "is not a config key; did you mean"


@pytest.mark.parametrize(
    "override,line",
    [
        (
            "model.widht=256",
            "model.widht=256 is invalid: is not a config key; did you mean model.width, model.init, model.depth?",
        ),
        (
            "+model.widht=256",
            "model.widht=256 is invalid: is not a config key; did you mean model.width, model.init, model.depth?",
        ),
        ("lgger.csv=true", "lgger.csv=true is invalid: is not a config key; did you mean logger.csv, logger?"),
    ],
)
def test_an_unknown_key_is_one_line_naming_the_nearest_keys_and_leaves_no_folder(tmp_path, override, line):
    # Without a "+", Hydra itself would refuse the key with several lines suggesting one; with it, the
    # key reached the schema and ended in a traceback. Both are refused before torch is imported.
    proc = run_cli("addrepro.train", [override], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"addrepro: config error: {line}"]
    assert list(tmp_path.iterdir()) == []


def test_every_key_of_the_schema_passes_the_command_line_check():
    check_override_keys([f"{key}=1" for key in all_keys()] + ["logger=csv", "+sweep=width", "experiment=nanda_5digit"])
    check_override_keys(["+callbacks.x._target_=a.B", "hydra.run.dir=x", "~logger", "callbacks=[early_stopping]"])
    with pytest.raises(
        ConfigError, match=r"^model\.d_modl=1 is invalid: is not a config key; did you mean model\.d_mlp"
    ):
        check_override_keys(["model.d_modl=1"])


@pytest.mark.parametrize(
    "sweep", ["callbacks=[lr_monitor],[early_stopping]", "callbacks=[],[lr_monitor,early_stopping]", "logger=csv,many"]
)
def test_a_sweep_over_group_options_and_lists_of_them_is_accepted(sweep):
    check_override_grammar([sweep])  # each swept list is checked by its names, not by its text
