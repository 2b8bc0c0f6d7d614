"""Tests for addrepro.model.optim: StackedAdamW against torch.optim.AdamW, and the warmup schedule."""

import copy

import pytest
import torch

from addrepro.model.optim import StackedAdamW, warmup_factor
from addrepro.model.transformer import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


CFG = ModelConfig(d_vocab=12, d_vocab_out=10, n_ctx=8, d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32)


def batches(n_steps: int, seed: int = 0, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, CFG.d_vocab, (batch, CFG.n_ctx), generator=g),
         torch.randint(0, CFG.d_vocab_out, (batch, CFG.n_ctx), generator=g))
        for _ in range(n_steps)
    ]  # fmt: skip


def member_losses(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every member ``(K,)``."""
    logits = model(tokens)  # (K, B, T, V)
    k = logits.shape[0]
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 2), targets.expand(k, *targets.shape).flatten(), reduction="none"
    )
    return ce.view(k, -1).mean(1)


def train(model, opt, data, scheduler=None) -> None:
    for tokens, targets in data:
        opt.zero_grad(set_to_none=True)
        member_losses(model, tokens, targets).sum().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_params_close(a: torch.nn.Module, b: torch.nn.Module, atol: float, rtol: float = 0.0) -> None:
    pb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(p, pb[name], atol=atol, rtol=rtol, msg=name)


def max_moved(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pb = dict(b.named_parameters())
    return max((p - pb[n]).abs().max().item() for n, p in a.named_parameters())


# -----------------------------------------------------------------------------
# warmup schedule


def test_warmup_factor():
    assert warmup_factor(0, 10) == 0.0
    assert [warmup_factor(s, 4) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(3, 10) == pytest.approx(0.3)
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(5, 0) == 1.0
    # the same schedule as Nanda's LambdaLR(lambda s: min(s / w, 1))
    for w in (1, 3, 10):
        assert all(warmup_factor(s, w) == min(s / w, 1) for s in range(25))


def test_current_lr_follows_warmup():
    model = Transformer(CFG, seeds=[0, 1])
    opt = StackedAdamW(model.parameters(), lr=[1e-2, 4e-3], weight_decay=[0.0, 0.0], warmup_steps=4)
    data = batches(5)
    seen = []
    for tokens, targets in data:
        seen.append(opt.current_lr().tolist())
        opt.zero_grad()
        member_losses(model, tokens, targets).sum().backward()
        opt.step()
    expected = [[f * 1e-2, f * 4e-3] for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    torch.testing.assert_close(torch.tensor(seen), torch.tensor(expected))


def test_lr_weight_decay_length_mismatch():
    model = Transformer(CFG, seeds=[0, 1])
    with pytest.raises(ValueError, match="one value per member"):
        StackedAdamW(model.parameters(), lr=[1e-3, 1e-3], weight_decay=[0.1])


# -----------------------------------------------------------------------------
# against torch.optim.AdamW


@pytest.mark.parametrize(
    "lr,wd,betas,eps",
    [(3e-3, 0.1, (0.9, 0.98), 1e-8), (1e-2, 1.0, (0.8, 0.999), 1e-6), (1e-3, 0.0, (0.9, 0.98), 1e-8)],
)
def test_k1_matches_torch_adamw(lr, wd, betas, eps):
    ours = Transformer(CFG, seeds=3)
    theirs = copy.deepcopy(ours)
    initial = copy.deepcopy(ours)
    data = batches(20, seed=1)
    train(ours, StackedAdamW(ours.parameters(), lr=[lr], weight_decay=[wd], betas=betas, eps=eps), data)
    ref_opt = torch.optim.AdamW(theirs.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    train(theirs, ref_opt, data)
    assert max_moved(ours, initial) > 10 * lr  # the parameters did move, by many steps' worth
    # float32 round-off only (fused kernel against torch's single-tensor loop): a few ulp of values up to ~2
    assert_params_close(ours, theirs, atol=1e-7, rtol=1e-6)


def test_k1_with_warmup_matches_torch_adamw_with_lambdalr():
    warmup = 5
    ours = Transformer(CFG, seeds=4)
    theirs = copy.deepcopy(ours)
    initial = copy.deepcopy(ours)
    data = batches(15, seed=2)
    opt = StackedAdamW(ours.parameters(), lr=[5e-3], weight_decay=[0.1], betas=(0.9, 0.98), warmup_steps=warmup)
    train(ours, opt, data[:1])
    # step 0 has learning rate 0 and weight decay factor 1: nothing moves
    assert max_moved(ours, initial) == 0.0
    train(ours, opt, data[1:])
    ref = torch.optim.AdamW(theirs.parameters(), lr=5e-3, betas=(0.9, 0.98), weight_decay=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: min(s / warmup, 1))
    train(theirs, ref, data, scheduler=sched)
    assert max_moved(ours, initial) > 1e-2
    assert_params_close(ours, theirs, atol=1e-7, rtol=1e-6)


def test_state_dict_round_trip_resumes_exactly():
    data = batches(10, seed=3)
    straight = Transformer(CFG, seeds=[0, 1])
    opt = StackedAdamW(straight.parameters(), lr=[3e-3, 1e-3], weight_decay=[0.1, 0.5], warmup_steps=3)
    train(straight, opt, data)

    first = Transformer(CFG, seeds=[0, 1])
    opt1 = StackedAdamW(first.parameters(), lr=[3e-3, 1e-3], weight_decay=[0.1, 0.5], warmup_steps=3)
    train(first, opt1, data[:4])
    state = copy.deepcopy(opt1.state_dict())
    assert state["step_count"] == 4
    resumed = copy.deepcopy(first)
    opt2 = StackedAdamW(resumed.parameters(), lr=[3e-3, 1e-3], weight_decay=[0.1, 0.5], warmup_steps=3)
    opt2.load_state_dict(state)
    assert opt2.step_count == 4
    train(resumed, opt2, data[4:])
    for name, p in straight.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


# -----------------------------------------------------------------------------
# per-member learning rate and weight decay


def test_per_member_settings_equal_separate_runs():
    seeds, lrs, wds = [10, 11, 12], [1e-2, 3e-3, 5e-3], [0.0, 0.5, 2.0]
    data = batches(15, seed=5)
    stack = Transformer(CFG, seeds=seeds)
    opt = StackedAdamW(stack.parameters(), lr=lrs, weight_decay=wds, betas=(0.9, 0.98), warmup_steps=3)
    train(stack, opt, data)
    for k, (seed, lr, wd) in enumerate(zip(seeds, lrs, wds, strict=True)):
        single = Transformer(CFG, seeds=seed)
        train(
            single,
            StackedAdamW(single.parameters(), lr=[lr], weight_decay=[wd], betas=(0.9, 0.98), warmup_steps=3),
            data,
        )
        member = stack.member_state_dict(k)
        for name, t in single.state_dict().items():
            torch.testing.assert_close(member[name], t[0], atol=2e-6, rtol=0, msg=f"member {k} {name}")
    # the settings matter: member 0 (lr 1e-2, wd 0) and a run of seed 10 with member 1's settings differ
    other = Transformer(CFG, seeds=seeds[0])
    train(other, StackedAdamW(other.parameters(), lr=[lrs[1]], weight_decay=[wds[1]], warmup_steps=3), data)
    assert (stack.embed.W_E[0] - other.embed.W_E[0]).abs().max() > 1e-3


def test_lr_zero_member_does_not_move():
    data = batches(8, seed=6)
    stack = Transformer(CFG, seeds=[0, 1])
    initial = copy.deepcopy(stack)
    train(stack, StackedAdamW(stack.parameters(), lr=[1e-2, 0.0], weight_decay=[0.1, 0.1]), data)
    for name, p in stack.named_parameters():
        q = dict(initial.named_parameters())[name]
        assert torch.equal(p[1], q[1]), name
    assert max((p[0] - dict(initial.named_parameters())[n][0]).abs().max().item()
               for n, p in stack.named_parameters()) > 1e-2  # fmt: skip


def test_a_step_without_gradients_changes_nothing_but_counts():
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = StackedAdamW([p], lr=[0.1, 0.1], weight_decay=[0.5, 0.5])
    opt.step()
    assert opt.step_count == 1 and torch.equal(p.detach(), torch.ones(2, 3))


def test_decoupled_weight_decay_closed_form():
    # with a zero gradient, AdamW only decays: p_t = p_0 * prod_s (1 - lr_s * wd)
    p = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))  # K = 2 members of 2 values
    opt = StackedAdamW([p], lr=[0.1, 0.01], weight_decay=[0.5, 2.0], warmup_steps=2)
    for _ in range(4):
        p.grad = torch.zeros_like(p)
        opt.step()
    factors = [0.0, 0.5, 1.0, 1.0]
    expected0 = torch.tensor([1.0, -2.0]) * torch.tensor([1 - f * 0.1 * 0.5 for f in factors]).prod()
    expected1 = torch.tensor([3.0, 0.5]) * torch.tensor([1 - f * 0.01 * 2.0 for f in factors]).prod()
    torch.testing.assert_close(p.detach(), torch.stack([expected0, expected1]), atol=1e-7, rtol=1e-6)


# -----------------------------------------------------------------------------
# the fused kernel (one pass per member) against the same update written elementwise


def test_fused_and_elementwise_steps_agree():
    seeds, lrs, wds = [1, 2, 3], [1e-2, 3e-3, 5e-3], [0.0, 0.5, 2.0]
    data = batches(12, seed=7)
    fused, plain = Transformer(CFG, seeds=seeds), Transformer(CFG, seeds=seeds)
    initial = copy.deepcopy(fused)
    opt_f = StackedAdamW(fused.parameters(), lr=lrs, weight_decay=wds, warmup_steps=3, fused=True)
    opt_e = StackedAdamW(plain.parameters(), lr=lrs, weight_decay=wds, warmup_steps=3, fused=False)
    assert opt_f.fused and not opt_e.fused
    train(fused, opt_f, data)
    train(plain, opt_e, data)
    assert max_moved(fused, initial) > 1e-2
    assert_params_close(fused, plain, atol=1e-6, rtol=1e-5)
    for p in fused.parameters():  # the moments, too
        q = dict(zip(fused.parameters(), plain.parameters(), strict=True))[p]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_f.state[p][key], opt_e.state[q][key], atol=1e-7, rtol=1e-5)


SETTINGS = [
    ([1e-2, 3e-3, 5e-3], [0.0, 0.5, 2.0]),  # all settings distinct
    ([1e-2, 1e-2, 3e-3], [0.5, 0.5, 0.5]),  # two neighbours share one block
    ([1e-2, 3e-3, 1e-2], [0.5, 0.5, 0.5]),  # two members share a call, not a block
    ([3e-3, 3e-3, 3e-3], [0.1, 0.1, 0.1]),  # a seed ensemble: the stacked tensors themselves
]


@pytest.mark.parametrize("lrs,wds", SETTINGS)
@pytest.mark.parametrize("shape", [(5, 7), (8, 16), (3, 64), (21,)])  # member blocks of 35, 128, 192, 21 floats
def test_fused_member_update_is_bitwise_the_single_run_update(lrs, wds, shape):
    # Same gradients in, same numbers out: member k's slice is updated exactly as a one-member run.
    g = torch.Generator().manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, *shape, generator=g))
    singles = [torch.nn.Parameter(stacked[k : k + 1].detach().clone()) for k in range(3)]
    opt = StackedAdamW([stacked], lr=lrs, weight_decay=wds, warmup_steps=2)
    opts = [StackedAdamW([s], lr=[lrs[k]], weight_decay=[wds[k]], warmup_steps=2) for k, s in enumerate(singles)]
    assert opt.fused and all(o.fused for o in opts)  # the fused kernel is what is tested here
    for _ in range(6):
        grad = torch.randn(3, *shape, generator=g)
        stacked.grad = grad
        opt.step()
        for k, (s, o) in enumerate(zip(singles, opts, strict=True)):
            s.grad = grad[k : k + 1].clone()
            o.step()
    for k, s in enumerate(singles):
        assert torch.equal(stacked[k : k + 1], s), k
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[stacked][key][k : k + 1], opts[k].state[s][key]), (k, key)
    assert not torch.equal(stacked[0], stacked[1])


def test_fused_plan_is_built_once_and_uses_the_stacked_tensors_when_members_share_settings():
    model = Transformer(CFG, seeds=[0, 1, 2, 3])
    opt = StackedAdamW(model.parameters(), lr=[1e-3] * 4, weight_decay=[0.1] * 4)
    data = batches(3)
    train(model, opt, data[:1])
    plan = opt._plan
    train(model, opt, data[1:])
    assert opt._plan is plan  # not rebuilt per step
    (call,) = plan.calls  # one kernel call for the whole seed ensemble
    blocks = [p for p in model.parameters() if p[0].numel() % 64 == 0]  # on CUDA: every parameter
    assert blocks and all(any(t.data_ptr() == p.data_ptr() and t.shape == p.shape for t in call.params)
                          for p in blocks)  # fmt: skip
    assert len(call.params) == len(blocks) + 4 * (len(list(model.parameters())) - len(blocks))
    # Two settings in two neighbouring runs: two calls, a block per run where blocks are exact.
    opt2 = StackedAdamW(model.parameters(), lr=[1e-3, 1e-3, 2e-3, 2e-3], weight_decay=[0.1] * 4)
    train(model, opt2, data[:1])
    assert [len(c.params) for c in opt2._plan.calls] == [len(blocks) + 2 * (len(call.params) - len(blocks)) // 4] * 2


# -----------------------------------------------------------------------------
# the step on the device alone (what a CUDA graph captures)


@pytest.mark.parametrize("warmup", [0, 4])
def test_the_step_reads_and_writes_device_memory_only(warmup):
    from test_hot_loop import HostSyncs  # noqa: PLC0415 - a test helper

    # Members 0 and 2 share settings (one kernel call over both), member 1 differs.
    lrs, wds, data = [3e-3, 1e-3, 3e-3], [0.1, 0.5, 0.1], batches(9, seed=7)
    model = Transformer(CFG, seeds=[0, 1, 2])
    opt = StackedAdamW(model.parameters(), lr=lrs, weight_decay=wds, warmup_steps=warmup)
    train(model, opt, data[:2])  # the moments and the kernel plan exist from here on
    for s, (tokens, targets) in enumerate(data[2:], start=2):
        opt.zero_grad(set_to_none=True)
        member_losses(model, tokens, targets).sum().backward()
        with HostSyncs() as check:
            lr = opt.current_lr()
            opt.step()
        assert check.seen == [], s
        factor = warmup_factor(s, warmup)
        assert torch.equal(lr, torch.tensor(lrs) * torch.tensor(factor, dtype=torch.float32)), s
    assert opt.step_count == 9
    assert max_moved(model, Transformer(CFG, seeds=[0, 1, 2])) > 1e-3  # the steps did move the weights
