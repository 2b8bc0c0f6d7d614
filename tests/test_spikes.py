"""Loss spikes during training: the weights around each one are kept (by the SpikeSnapshots callback)."""

import torch
from conftest import REPO
from hydra import compose, initialize_config_dir

import addrepro.train  # noqa: F401 - registers the ${uid:} resolver used by the configs
from addrepro.training.callbacks import SpikeSnapshots
from addrepro.training.config import architecture, task_spec, typed
from addrepro.training.module import AdditionModule
from addrepro.training.recorder import Member


def test_a_loss_spike_keeps_the_weights_before_at_and_after(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.n_digits=3", "model.width=32"])
    spec = task_spec(cfg.data)
    member = Member(seed=0, data_seed=0, lr=1e-3, weight_decay=0.1, job_dir=tmp_path)
    module = AdditionModule(spec, architecture(cfg.model, spec), [member], typed(cfg))
    first_nonfinite = torch.full((1,), -1)
    snapshots = SpikeSnapshots()
    for step in range(0, 600, 10):
        loss = 5.0 if step == 400 else 1.0 + 0.01 * (step % 3)  # one spike on a flat noisy curve
        with torch.no_grad():
            module.model.embed.W_E.fill_(step)  # mark the weights with the step they belong to
        module.recorder.emit({"train/loss": torch.tensor([loss])}, step, first_nonfinite)
        new_spikes = module.recorder.check_spikes(step)
        snapshots.on_train_log_step(None, module, step, module.stack.weights(), new_spikes, [])
    saved = {p.name: torch.load(p, weights_only=True) for p in (tmp_path / "checkpoints").iterdir()}
    assert sorted(saved) == ["spike_400_after.ckpt", "spike_400_at.ckpt", "spike_400_before.ckpt"]
    for name, step in (("before", 390), ("at", 400), ("after", 410)):
        ckpt = saved[f"spike_400_{name}.ckpt"]
        assert ckpt["step"] == step and ckpt["model"]["embed.W_E"].unique().tolist() == [step]
        assert ckpt["model"]["embed.W_E"].shape == module.model.embed.W_E.shape[1:]  # one model, no K
    assert [s.step for _, s in module.recorder.spikes] == [400]
