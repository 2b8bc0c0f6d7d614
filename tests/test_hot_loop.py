"""The hot loop's amortisation changes nothing that is logged or saved."""

import pytest
import torch
from test_ensemble import config, final_weights
from torch.utils._python_dispatch import TorchDispatchMode

from addrepro.rundir.metrics_file import load_rows
from addrepro.train import JobPlan, train
from addrepro.training.module import AdditionModule


def run(tmp_path, name: str, *overrides: str):
    plan = JobPlan(config("seed=3", *overrides), tmp_path / name, name, "g", False)
    plan.job_dir.mkdir()
    train([plan])
    return load_rows(plan.job_dir), final_weights(plan.job_dir)


def test_steps_per_call_logs_what_a_step_by_step_loop_logs(tmp_path, one_thread):
    # 7 does not divide the 40 steps: the last call runs the remainder only
    rows_1, weights_1 = run(tmp_path, "one", "trainer.steps_per_call=1")
    rows_7, weights_7 = run(tmp_path, "seven", "trainer.steps_per_call=7")
    assert rows_1 == rows_7
    steps = [r["step"] for r in rows_1 if "train/loss" in r]
    assert steps == list(range(0, 40, 5))  # every logging step, once
    assert max(r["step"] for r in rows_1) == 40  # the final evaluation after exactly 40 updates
    assert weights_1.keys() == weights_7.keys()
    assert all(torch.equal(weights_1[n], weights_7[n]) for n in weights_1)


class HostSyncs(TorchDispatchMode):
    """Records every operation that reads a tensor value on the host or moves data between host and
    device: ``.item()``/``bool()``/``.tolist()`` (``_local_scalar_dense``), tensors built from Python
    data (``lift_fresh``: ``torch.tensor([...])`` and list indices, which on CUDA are then copied to
    the device with a blocking copy) and copies to another device. ``.tolist()`` and ``.numpy()`` of
    a CPU tensor read memory without an operator (on CUDA they copy to the host, caught above), so they
    are watched on the tensor class. Operations whose output shape depends on the values (``nonzero``,
    boolean-mask indexing, ``unique``) read the values on the host on CUDA, and are flagged too."""

    HOST_READS = ("tolist", "numpy")
    # Outputs whose shape depends on the values: CUDA must read them on the host to allocate the result.
    DATA_SHAPED = ("nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.saved = {name: getattr(torch.Tensor, name) for name in self.HOST_READS}

    def __enter__(self):  # noqa: ANN204
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._watched(name, method))
        if torch.cuda.is_available():  # on a GPU, CUDA itself also raises at any synchronising call
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        return super().__exit__(*exc)

    def _watched(self, name, method):  # noqa: ANN001, ANN202
        def watched(tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.seen.append(name)
            return method(tensor, *args, **kwargs)

        return watched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "lift_fresh", "lift_fresh_copy") or name in self.DATA_SHAPED:
            self.seen.append(name)
        elif name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.seen.append("index with a boolean mask")
        elif name in ("_to_copy", "copy_") and isinstance(args[0], torch.Tensor):
            source = args[1] if name == "copy_" else args[0]
            target = args[0].device if name == "copy_" else kwargs.get("device", args[0].device)
            if torch.device(target) != source.device:
                self.seen.append(f"{name} {source.device}->{target}")
        return func(*args, **kwargs)


def test_sync_check_flags_host_reads_and_host_built_indices():
    x = torch.arange(12.0).view(3, 4)
    for op in (lambda: x[:, [3, 2, 1, 0]], lambda: x.sum().item(), lambda: torch.tensor([1, 2]),
               lambda: bool(x.any()), lambda: x.to("meta"), lambda: x.sum().tolist(), lambda: x.numpy(),
               lambda: x[x > 3], lambda: x.nonzero(), lambda: x.unique()):  # fmt: skip
        with HostSyncs() as check:
            op()
        assert check.seen, op
    with HostSyncs() as check:  # what the hot loop uses instead
        x.flip(1), x[:, 1:], x.sum(), torch.where(x > 3, 5, x), torch.full((2,), 3)
    assert check.seen == []


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_non_logging_steps_never_synchronise(tmp_path, one_thread, monkeypatch, order):
    """Real training steps (data, forward, backward, optimiser, metrics kept on the device, the
    callbacks' per-step hooks) under the check above: steps that neither log nor evaluate touch
    the host not once."""
    checked, flagged = [], []
    original = AdditionModule.optimizer_step_once

    def optimizer_step_once(self):
        t, step = self.config.trainer, self.global_step
        evaluates = [(step + 1) % every == 0 for every in (t.val_every_n_steps, self.config.metrics.every_n_steps)]
        if step % t.log_every_n_steps == 0 or any(evaluates) or step + 1 == t.max_steps:
            return original(self)  # logging steps and evaluations after the update copy metrics to the host
        with HostSyncs() as check:
            original(self)
        checked.append(step)
        flagged.extend((step, s) for s in check.seen)

    monkeypatch.setattr(AdditionModule, "optimizer_step_once", optimizer_step_once)
    # No checkpoint inside the 12 steps (log-spaced ones would fall on every step): writing one reads the host.
    cfgs = [
        config(f"seed={s}", f"data.order={order}", "trainer.max_steps=12", "trainer.ckpt_schedule=linear")
        for s in (0, 1)
    ]
    plans = [JobPlan(c, tmp_path / f"m{i}", f"m{i}", "g", True) for i, c in enumerate(cfgs)]
    for p in plans:
        p.job_dir.mkdir()
    train(plans)  # a stack of two (the ensemble path encodes the members' batches together)
    assert checked == [1, 2, 3, 4, 6, 7, 8, 9]
    assert flagged == []
