"""Training distributions (``data.sampler``): frequencies against their closed forms, streams that
resume and stack exactly, and a run that resumes bitwise with a non-uniform sampler."""

import math

import pytest
import torch
from conftest import FAST, run_cli

from addrepro.task.complexity import cascade_class, class_frequencies
from addrepro.task.encoding import operands_from_tokens
from addrepro.task.spec import SamplerSpec, TaskSpec
from addrepro.task.streams import InfiniteBatches, stacked_batch

SPEC = TaskSpec(n_digits=5)


def within(share: float, p: float, draws: int, sds: float = 5.0) -> bool:
    return abs(share - p) <= sds * math.sqrt(p * (1 - p) / draws)


@pytest.mark.parametrize("batches,digits", [(0.4, 0.4), (0.2, 0.2)])
def test_carry_enriched_batches_and_digits_come_as_often_as_asked(batches, digits):
    """An enriched batch has exactly round-down(digits · B · n) positions made to sum 9, plus the
    uniform ones among the rest (1 in base); the others are uniform batches."""
    stream = InfiniteBatches(SPEC, 64, 3, sampler=SamplerSpec("carry_enriched", batches, digits))
    positions = 64 * 5
    made = int(digits * positions)
    enriched, nines = 0, []
    draws = 1500
    for _ in range(draws):
        a, b = stream.draw()
        count = int((a + b == 9).sum())
        if count >= made and count > 0.25 * positions:  # uniform batches have ~32 of 320 (never > 80)
            enriched += 1
            nines.append(count)
    assert within(enriched / draws, batches, draws)
    expected = made + (positions - made) / 10
    sd = math.sqrt((positions - made) * 0.09 / len(nines))
    assert abs(sum(nines) / len(nines) - expected) < 5 * sd
    assert min(nines) >= made


def test_carry_enriched_rewrites_one_operand_per_batch():
    stream = InfiniteBatches(SPEC, 64, 5, sampler=SamplerSpec("carry_enriched", 1.0, 0.4))
    reference = InfiniteBatches(SPEC, 64, 5)  # the same generator draws the uniform operands first
    for _ in range(20):
        a, b = stream.draw()
        a0, b0 = reference.draw()
        reference.generator.set_state(stream.generator.get_state())
        kept_a, kept_b = torch.equal(a, a0), torch.equal(b, b0)
        assert kept_a != kept_b  # exactly one operand was rewritten
        changed = (a != a0) | (b != b0)
        assert ((a + b)[changed] == 9).all()


def test_carry_balanced_draws_every_class_equally_often():
    stream = InfiniteBatches(SPEC, 4096, 1, sampler=SamplerSpec("carry_balanced"))
    classes = torch.cat([cascade_class(*stream.draw(), 10) for _ in range(3)])
    for k in range(6):
        assert within(float((classes == k).float().mean()), 1 / 6, len(classes))


def test_curriculum_adds_one_class_every_curriculum_steps_in_uniform_proportions():
    spec = TaskSpec(n_digits=4)
    stream = InfiniteBatches(spec, 2048, 2, sampler=SamplerSpec("curriculum", curriculum_steps=3))
    freq = torch.tensor(class_frequencies(4, 10))
    for top in (1, 2, 3, 4, 4):
        classes = torch.cat([cascade_class(*stream.draw(), 10) for _ in range(3)])
        assert int(classes.max()) <= top
        allowed = freq[: top + 1] / freq[: top + 1].sum()
        for k in range(top + 1):
            assert within(float((classes == k).float().mean()), float(allowed[k]), len(classes)), (top, k)


@pytest.mark.parametrize("name", ["carry_enriched", "carry_balanced", "curriculum"])
def test_a_sampled_stream_resumes_and_stacks_exactly(name):
    sampler = SamplerSpec(name, curriculum_steps=2)
    stream = InfiniteBatches(SPEC, 32, 9, sampler=sampler)
    for _ in range(5):
        stream.next()
    saved = stream.state_dict()
    expected = [stream.next() for _ in range(4)]
    resumed = InfiniteBatches(SPEC, 32, 9, sampler=sampler)
    resumed.load_state_dict(saved, step=5)
    assert all(torch.equal(resumed.next(), e) for e in expected)
    # a stack's batches are each member's own stream's batches
    members = [InfiniteBatches(SPEC, 32, s, sampler=sampler) for s in (1, 2)]
    alone = [InfiniteBatches(SPEC, 32, s, sampler=sampler) for s in (1, 2)]
    for _ in range(3):
        assert torch.equal(stacked_batch(members), torch.stack([s.next() for s in alone]))
    a, b = operands_from_tokens(expected[0], SPEC)
    assert ((a < 10) & (b < 10)).all()


def test_a_run_with_a_sampler_resumes_bitwise(tmp_path):
    args = ["data.n_digits=3", "model.width=16", "logger=csv", "trainer.plots=false", *FAST, "trainer.threads=1"]
    args += ["data.sampler=curriculum", "data.curriculum_steps=10", "trainer.ckpt_every_n_steps=20"]
    whole = run_cli("addrepro.train", [*args, "trainer.max_steps=40", "hydra.run.dir=whole"], tmp_path)
    first = run_cli("addrepro.train", [*args, "trainer.max_steps=40", "hydra.run.dir=cut"], tmp_path)
    assert whole.returncode == first.returncode == 0, whole.stderr[-2000:] + first.stderr[-2000:]
    cut = tmp_path / "cut" / "checkpoints"
    (cut / "last.ckpt").unlink()
    (cut / "step_40.ckpt").unlink()
    again = run_cli("addrepro.train", [*args, "trainer.max_steps=40", "resume=cut"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cut / "last.ckpt", weights_only=True)
    assert a["data"]["draws"] == b["data"]["draws"] == 40  # the curriculum's position travels with the stream
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_sampler_is_read_from_a_config_a_stored_config_and_one_from_before_its_keys():
    from addrepro.training.config import DataConfig  # noqa: PLC0415 - the schema, for its defaults

    assert SamplerSpec.from_config(DataConfig()) == SamplerSpec()
    set_ = {"sampler": "carry_enriched", "enrich_batches": 0.2, "enrich_digits": 0.1, "curriculum_steps": 7}
    assert SamplerSpec.from_config(set_) == SamplerSpec("carry_enriched", 0.2, 0.1, 7)
    assert SamplerSpec.from_config(DataConfig(**set_)) == SamplerSpec("carry_enriched", 0.2, 0.1, 7)
    assert SamplerSpec.from_config({"n_digits": 5, "base": 10}) == SamplerSpec()  # stored before samplers existed
