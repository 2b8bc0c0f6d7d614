"""The model's hyperparameters: plain values, no torch, so a run's config is checked before torch loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ACTIVATIONS = ("relu", "gelu")
NORMALIZATIONS = (None, "LN")
INITS = ("nanda", "normal")


@dataclass
class ModelConfig:
    d_vocab: int  # input tokens: base digits, "+" and "="
    d_vocab_out: int  # the unembedding maps to the digits only
    n_ctx: int
    d_model: int = 128
    n_layers: int = 1
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    act_fn: str = "relu"
    normalization: str | None = None  # None or "LN"
    attn_only: bool = False
    init: str = "nanda"  # "nanda": the scales of Nanda's 5-digit addition code; "normal": init_std for all
    init_std: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)
