"""A hand-built 1-layer transformer that adds two 3-digit numbers exactly (test helper).

Its weights are written by hand, so what every component does is known exactly and does not depend
on how training happens to turn out on a given CPU. Every attention weight is exactly 1/2 (or 1), and
every other weight and every activation is an integer (or a half-integer) far below 2^24, so float32
computes them exactly in any summation order: the logits are the same bits on every machine (20 for
the right digit, 0 for the others; checked once on all 10^6 pairs).

Layout (msb order, n = 3): ``a2 a1 a0 + b2 b1 b0 = c3 c2 c1 c0``; place j is predicted at input
position ``10 - j``. Residual dimensions:

* ``DIGIT`` (0): the digit value of the token (0 for ``+`` and ``=``);
* ``X[h]`` (1..4): written by head h, ``x_h = a_i + b_i`` with ``i = j - h`` (0 when there is no
  such pair: the head then attends to ``+`` and ``=``, whose digit value is 0);
* ``POS`` (5..15): one-hot position;
* ``OUT`` (16..25): the MLP's answer, one-hot over digits, read by the unembedding (times ``LOGIT``).

Head h attends, from the position predicting place j, half to ``a_{j-h}`` and half to ``b_{j-h}``
(position scores ``SCORE`` apart: every other key gets weight ``exp(-SCORE)``, below float32's
resolution). So at place j, x0 is the pair sum there and x1, x2, x3 the pair sums below it.

MLP: with ``L = K^2 (x1 - 9) + K (x2 - 9) + (x3 - 9)`` (K = 20 > 19) the carry into j is ``[L >= 1]``
(the pairs below, read as a number, beat 9 9 9), and ``t = x0 + carry >= d`` exactly when
``K^3 (x0 - d + 1) + L >= 1``: each threshold is ``clamp(., 0, 1) = relu(.) - relu(. - 1)``, two neurons.
The answer digit is ``t mod 10``: ``OUT[u] = [t = u] + [t = u + 10]`` from the thresholds.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from addrepro.model.transformer import ModelConfig, Transformer
from addrepro.task.spec import TaskSpec

SPEC = TaskSpec(n_digits=3)
N = SPEC.n_digits
BASE = SPEC.base
N_HEADS = 4
D_HEAD = 8
D_MODEL = 32
D_MLP = 64
DIGIT = 0
X = [1, 2, 3, 4]  # x_h, written by head h
POS = 5  # POS + p: position p
OUT = 16  # OUT + u: digit u of the answer
LOGIT = 20.0  # logit of the answer digit; every other digit's logit is 0
SCORE = 64  # attention score of the two keys a head reads; 0 for the others
K = 20
N_THRESHOLDS = 2 * BASE - 1  # t >= 1 .. t >= 19 (t = x0 + carry is at most 19)


def config() -> ModelConfig:
    return ModelConfig(
        d_vocab=SPEC.d_vocab,
        d_vocab_out=BASE,
        n_ctx=SPEC.seq_len - 1,
        d_model=D_MODEL,
        n_layers=1,
        n_heads=N_HEADS,
        d_head=D_HEAD,
        d_mlp=D_MLP,
        act_fn="relu",
        normalization=None,
    )


def place_of_query(pos: int) -> int | None:
    """The place predicted at input position ``pos`` (None before the answer)."""
    e = pos - (SPEC.answer_start - 1)
    return SPEC.answer_places[e] if 0 <= e < SPEC.n_places else None


def pair_positions(i: int) -> list[int]:
    """Input positions of ``a_i`` and ``b_i``; ``+`` and ``=`` (digit value 0) when there is no pair i."""
    if 0 <= i < N:
        return [N - 1 - i, 2 * N - i]
    return [N, 2 * N + 1]


def attended(head: int, pos: int) -> list[int]:
    """The two key positions head ``head`` reads from query position ``pos`` (answer positions only)."""
    return pair_positions(place_of_query(pos) - head)


def model() -> Transformer:
    cfg = config()
    m = Transformer(cfg, seeds=0)
    state = {name: torch.zeros_like(t) for name, t in m.state_dict().items()}
    # Embeddings: digit value, one-hot position.
    state["embed.W_E"][0, :BASE, DIGIT] = torch.arange(BASE, dtype=torch.float32)
    for p in range(cfg.n_ctx):
        state["pos_embed.W_pos"][0, p, POS + p] = 1.0
    # Attention: key position p is code c(p) in the head dimension (pair i -> i, "no pair" -> N); the
    # query at an answer position asks for the code of pair j - h. scores = q.k / sqrt(d_head).
    codes = {}
    for i in range(N + 1):
        for p in pair_positions(i):
            codes[p] = i
    q_scale = SCORE * D_HEAD**0.5  # sqrt(8) is not an integer: the two attended keys still get equal scores
    for h in range(N_HEADS):
        for p, c in codes.items():
            state["blocks.0.attn.W_K"][0, h, POS + p, c] = 1.0
        for pos in range(cfg.n_ctx):
            j = place_of_query(pos)
            # Before the answer, read pair N - 1 (a_{n-1} at position 0 is always visible): every query
            # then averages one or two keys exactly, and every activation stays an exact integer.
            i = N - 1 if j is None else j - h
            state["blocks.0.attn.W_Q"][0, h, POS + pos, i if 0 <= i < N else N] = q_scale
        state["blocks.0.attn.W_V"][0, h, DIGIT, 0] = 1.0  # the value is the digit: z = (a_i + b_i) / 2
        state["blocks.0.attn.W_O"][0, h, 0, X[h]] = 2.0
    # MLP: neuron 2k and 2k+1 give clamp(E_d, 0, 1) = relu(E_d) - relu(E_d - 1) for d = k + 1,
    # E_d = K^3 (x0 - d + 1) + K^2 (x1 - 9) + K (x2 - 9) + (x3 - 9).
    w_in, b_in = state["blocks.0.mlp.W_in"][0], state["blocks.0.mlp.b_in"][0]
    w_out, b_out = state["blocks.0.mlp.W_out"][0], state["blocks.0.mlp.b_out"][0]
    for k in range(N_THRESHOLDS):
        d = k + 1
        for n, shift in ((2 * k, 0), (2 * k + 1, -1)):
            w_in[X[0], n], w_in[X[1], n], w_in[X[2], n], w_in[X[3], n] = K**3, K**2, K, 1
            b_in[n] = -(K**3) * (d - 1) - 9 * (K**2 + K + 1) + shift
        # [t = u] = [t >= u] - [t >= u + 1]: threshold d adds to OUT[d mod 10] and takes from OUT[(d-1) mod 10]
        for n, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
            w_out[n, OUT + d % BASE] += sign
            w_out[n, OUT + (d - 1) % BASE] -= sign
    b_out[OUT + 0] = 1.0  # [t >= 0] = 1
    for u in range(BASE):
        state["unembed.W_U"][0, OUT + u, u] = LOGIT
    m.load_state_dict(state)
    return m


def checkpoint(val_size: int = 512, val_seed: int = 5) -> dict:
    """A checkpoint dict of the adder, as ``load_subject`` reads it."""
    return {
        "task": asdict(SPEC),
        "model_config": config().to_dict(),
        "model": model().member_state_dict(0),
        "config": {"data": {"val_size": val_size, "val_seed": val_seed}},
        "step": 0,
    }
