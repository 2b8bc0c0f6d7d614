"""Validate a composed run config before anything is built, with one clear line per mistake."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from addrepro.model.transformer import ACTIVATIONS, INITS
from addrepro.task.spec import ORDERS, TASKS


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def _int(cfg: DictConfig, key: str, lo: int | None = None, hi: int | None = None, null: bool = False) -> None:
    value = _select(cfg, key)
    if value is None and null:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        if lo is not None and hi is not None:
            allowed = f"must be an integer in {lo}..{hi}"
        elif lo is not None:
            allowed = f"must be an integer >= {lo}"
        else:
            allowed = "must be an integer"
        raise ConfigError(key, value, allowed + (" or null" if null else ""))


def _number(cfg: DictConfig, key: str, lo: float, strict: bool = False) -> None:
    value = _select(cfg, key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value > lo if strict else value >= lo)
    if not ok:
        raise ConfigError(key, value, f"must be a number {'>' if strict else '>='} {lo}")


def _choice(cfg: DictConfig, key: str, choices: tuple) -> None:
    value = _select(cfg, key)
    # Compare types too: 1 == True and 0 == False would otherwise pass for a boolean switch.
    if not any(value == c and type(value) is type(c) for c in choices):
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(key, value, f"must be one of {shown}")


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first invalid value of a training config."""
    _int(cfg, "seed")
    _int(cfg, "data.n_digits", 1)
    _int(cfg, "data.base", 2, 36)
    _choice(cfg, "data.order", ORDERS)
    _choice(cfg, "data.task", TASKS)
    if cfg.data.batch_size is None and cfg.data.train_size is None:
        raise ConfigError("data.batch_size", None, "must be an integer >= 1 (null, full batch, needs data.train_size)")
    _int(cfg, "data.batch_size", 1, null=True)
    _int(cfg, "data.seed")
    _int(cfg, "data.val_size", 1)
    _int(cfg, "data.val_seed")
    _int(cfg, "data.train_size", 1, null=True)
    if cfg.data.train_size is not None:
        n_pairs = cfg.data.base ** (2 * cfg.data.n_digits)
        need = cfg.data.train_size + cfg.data.val_size
        if need > n_pairs:
            raise ConfigError(
                "data.train_size",
                cfg.data.train_size,
                f"train_size + val_size ({need}) must not exceed the {n_pairs} distinct pairs",
            )
        if n_pairs > 2**62:
            raise ConfigError("data.train_size", cfg.data.train_size, "finite data needs base^(2n) <= 2^62")

    m = cfg.model
    _int(cfg, "model.width", 1)
    _int(cfg, "model.depth", 1)
    _int(cfg, "model.n_heads", 1)
    _int(cfg, "model.d_head", 1, null=True)
    _int(cfg, "model.d_mlp", 1, null=True)
    if m.d_head is None and m.width % m.n_heads != 0:
        raise ConfigError(
            "model.width", m.width, f"must be divisible by model.n_heads={m.n_heads} (or set model.d_head)"
        )
    _choice(cfg, "model.act_fn", ACTIVATIONS)
    _choice(cfg, "model.normalization", (None, "LN"))
    _choice(cfg, "model.attn_only", (True, False))
    _choice(cfg, "model.init", INITS)
    _number(cfg, "model.init_std", 0.0, strict=True)

    _number(cfg, "optimizer.lr", 0.0, strict=True)
    _number(cfg, "optimizer.weight_decay", 0.0)
    betas = cfg.optimizer.betas
    if len(betas) != 2 or not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise ConfigError("optimizer.betas", list(betas), "must be two numbers in [0, 1)")
    _number(cfg, "optimizer.eps", 0.0, strict=True)
    _int(cfg, "optimizer.warmup_steps", 0)

    _int(cfg, "trainer.max_steps", 1)
    _int(cfg, "trainer.steps_per_call", 1)
    _choice(cfg, "trainer.accelerator", ("auto", "cpu", "gpu", "cuda", "mps"))
    _choice(cfg, "trainer.compile", (True, False))
    _int(cfg, "trainer.log_every_n_steps", 1)
    _int(cfg, "trainer.val_every_n_steps", 1)
    _int(cfg, "trainer.ckpt_every_n_steps", 1)
    _choice(cfg, "trainer.ckpt_schedule", ("linear", "log"))
    _int(cfg, "trainer.ckpt_log_count", 1)
    _int(cfg, "metrics.every_n_steps", 1)
    _choice(cfg, "logger.wandb.mode", ("offline", "online", "disabled"))
