"""PyTorch Lightning: losses from training_step recorded in backward, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration_support import (
    assert_same_parameters,
    classification_data,
    classifier,
    steps,
    visits,
)
from torch.utils.data import DataLoader, TensorDataset

from samplescope.recorder.integrations import IntegrationError

pl = pytest.importorskip("lightning.pytorch")

from samplescope.recorder.integrations.lightning import (  # noqa: E402
    RecordedModule,
    RecorderCallback,
)

EPOCHS = 2


class Plain(pl.LightningModule):
    """The unrecorded module: mean cross-entropy, SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.net = classifier()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        return self.net(x)

    def per_sample(self, batch):
        x, y, ids = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        self.seen.append((ids.clone(), losses.detach().clone()))
        return logits, losses

    def training_step(self, batch, batch_idx):
        return self.per_sample(batch)[1].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorded(RecordedModule, Plain):
    def training_step(self, batch, batch_idx):
        logits, losses = self.per_sample(batch)
        return self.recorded(losses, sample_ids=batch[2], logits=logits, targets=batch[1])


def _fit(module, callbacks=(), **options):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **options,
    )
    loader = DataLoader(TensorDataset(*classification_data()), batch_size=8)
    trainer.fit(module, loader)
    return trainer


@pytest.mark.slow
def test_lightning_run_is_bit_identical_and_records_training_step_losses(tmp_path):
    plain, recorded = Plain(), Recorded()
    _fit(plain)
    callback = RecorderCallback(tmp_path / "pl.h5")
    _fit(recorded, [callback])
    assert not torch.equal(classifier()[0].weight, recorded.net[0].weight)
    assert_same_parameters(plain, recorded)
    assert callback.recorder is None  # closed at the end of fit
    rows = visits(tmp_path / "pl.h5")
    assert np.array_equal(rows["sample_id"], torch.cat([i for i, _ in plain.seen]).numpy())
    expected = torch.cat([loss for _, loss in plain.seen]).numpy().astype(np.float32)
    assert np.array_equal(rows["loss"], expected)
    assert np.array_equal(rows["target"], classification_data()[1].repeat(EPOCHS).numpy())
    table = steps(tmp_path / "pl.h5")
    assert table["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
    assert np.allclose(table["lr"], 0.1)


def test_recorded_module_without_the_callback_trains_as_the_plain_one():
    plain, recorded = Plain(), Recorded()
    _fit(plain, max_steps=2)
    _fit(recorded, max_steps=2)
    assert_same_parameters(plain, recorded)


def test_a_module_without_the_mixin_is_refused(tmp_path):
    with pytest.raises(IntegrationError, match="must derive from RecordedModule"):
        _fit(Plain(), [RecorderCallback(tmp_path / "x.h5")], max_steps=1)


def test_accumulation_the_recorder_does_not_divide_by_is_refused(tmp_path):
    module = Recorded()
    before = [p.detach().clone() for p in module.parameters()]
    callback = RecorderCallback(tmp_path / "ga.h5")
    with pytest.raises(IntegrationError, match="but the Recorder has accumulation_steps=1"):
        _fit(module, [callback], accumulate_grad_batches=2, max_steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


class _FailsAtStep2(Recorded):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            msg = "boom"
            raise RuntimeError(msg)
        return super().training_step(batch, batch_idx)


def test_a_failing_fit_closes_the_trace_with_its_steps(tmp_path):
    callback = RecorderCallback(tmp_path / "fail.h5")
    with pytest.raises(RuntimeError, match="boom"):
        _fit(_FailsAtStep2(), [callback])
    assert callback.recorder is None
    assert steps(tmp_path / "fail.h5")["step"].tolist() == [0, 1]
    assert not (tmp_path / "fail.h5.lock").exists()


class _ForgetsToRecord(Recorded):
    def training_step(self, batch, batch_idx):
        return self.per_sample(batch)[1].mean()


def test_a_training_step_that_skips_recorded_is_refused(tmp_path):
    with pytest.raises(IntegrationError, match=r"return self.recorded\(losses"):
        _fit(_ForgetsToRecord(), [RecorderCallback(tmp_path / "x.h5")], max_steps=1)
