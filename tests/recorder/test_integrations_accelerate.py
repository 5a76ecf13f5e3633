"""Accelerate: `accelerator.backward` routed through the recorder, bit for bit."""

from __future__ import annotations

import contextlib
import copy
import types

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

from samplescope.recorder import Recorder
from samplescope.recorder.integrations import IntegrationError
from samplescope.recorder.integrations.accelerate import backward

accelerate = pytest.importorskip("accelerate")

EPOCHS = 2


def _train(model, path=None):
    """Two epochs of SGD under an Accelerator; recorded when ``path`` is given.

    Returns each step's (ids, per-sample losses) as the loop computed them.
    """
    accelerator = accelerate.Accelerator(cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(*classification_data()), batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    seen = []
    recording = Recorder(path, accelerator.unwrap_model(model), opt) if path else None
    with recording or contextlib.nullcontext() as rec:
        for epoch in range(EPOCHS):
            if rec is not None:
                rec.set_epoch(epoch)
            for x, y, ids in loader:
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                seen.append((ids.clone(), losses.detach().clone()))
                if rec is None:
                    accelerator.backward(losses.mean())
                else:
                    backward(accelerator, rec, losses, sample_ids=ids, logits=logits, targets=y)
                opt.step()
                opt.zero_grad()
    return seen


def test_accelerate_backward_trains_bit_identically_and_records_every_sample(tmp_path):
    plain, recorded = classifier(), classifier()
    _train(plain)
    seen = _train(recorded, tmp_path / "acc.h5")
    assert_same_parameters(plain, recorded)
    rows = visits(tmp_path / "acc.h5")
    ids = torch.cat([i for i, _ in seen]).numpy()
    losses = torch.cat([loss for _, loss in seen]).numpy()
    assert np.array_equal(rows["sample_id"], ids)
    assert np.array_equal(rows["loss"], losses.astype(np.float32))
    assert sorted(rows["sample_id"][: len(ids) // EPOCHS]) == list(range(1000, 1024))
    table = steps(tmp_path / "acc.h5")
    assert np.array_equal(table["epoch"], [0, 0, 0, 1, 1, 1])  # 24 samples / 8, two epochs
    assert np.array_equal(table["batch_size"], [8] * 6)


def test_accumulation_the_recorder_does_not_divide_by_is_refused(tmp_path):
    model = classifier()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    x, y, ids = classification_data()
    before = copy.deepcopy(model)
    with Recorder(tmp_path / "ga.h5", model) as rec:
        losses = F.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(
            IntegrationError,
            match="over 2 micro-batches but the Recorder has accumulation_steps=1",
        ):
            backward(accelerator, rec, losses, sample_ids=ids)
    # Refused before anything was back-propagated.
    assert all(p.grad is None for p in model.parameters())
    assert_same_parameters(before, model)


def test_lomo_backward_is_refused(tmp_path):
    model = classifier()
    accelerator = accelerate.Accelerator(cpu=True)
    x, y, ids = classification_data()
    with Recorder(tmp_path / "lomo.h5", model) as rec:
        losses = F.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(IntegrationError, match="LOMO"):
            backward(accelerator, rec, losses, sample_ids=ids, learning_rate=0.1)


def test_accumulation_passes_through_to_an_accumulating_recorder(tmp_path):
    # Accelerate divides each micro-batch's loss by K; a recorder that accumulates over K
    # calls must do the same, so the parameters end bit-identical and losses stay unscaled.
    x, y, ids = classification_data()
    seen = []
    models = []
    for record in (False, True):
        model = classifier()
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(TensorDataset(x, y, ids), batch_size=4)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        recording = (
            Recorder(tmp_path / "ga.h5", accelerator.unwrap_model(model), opt, accumulation_steps=2)
            if record
            else None
        )
        with recording or contextlib.nullcontext() as rec:
            for xb, yb, ib in loader:
                with accelerator.accumulate(model):
                    logits = model(xb)
                    losses = F.cross_entropy(logits, yb, reduction="none")
                    if rec is None:
                        seen.append(losses.detach().clone())
                        accelerator.backward(losses.mean())
                    else:
                        backward(accelerator, rec, losses, sample_ids=ib)
                    opt.step()
                    opt.zero_grad()
        models.append(model)
    assert_same_parameters(*models)
    assert np.array_equal(visits(tmp_path / "ga.h5")["loss"], torch.cat(seen).numpy())


def _stub_accelerator(**overrides):
    # The set-ups below need hardware or launchers (a GPU for fp16, DeepSpeed); what the
    # check reads is these attributes, as the real Accelerator exposes them.
    real = accelerate.Accelerator(cpu=True)
    fields = {
        "distributed_type": real.distributed_type,
        "scaler": None,
        "gradient_accumulation_steps": 1,
        "parallelism_config": None,
    }
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scaler": object()}, "mixed_precision='fp16'"),
        ({"distributed_type": accelerate.DistributedType.DEEPSPEED}, "DeepSpeed"),
        ({"distributed_type": accelerate.DistributedType.MEGATRON_LM}, "Megatron-LM"),
        (
            {"parallelism_config": types.SimpleNamespace(tp_enabled=True, cp_enabled=False)},
            "TP parallelism",
        ),
    ],
)
def test_setups_the_recorder_cannot_follow_are_refused(tmp_path, overrides, message):
    model = classifier()
    x, y, ids = classification_data()
    with Recorder(tmp_path / "r.h5", model) as rec:
        losses = F.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(IntegrationError, match=message):
            backward(_stub_accelerator(**overrides), rec, losses, sample_ids=ids)
    assert all(p.grad is None for p in model.parameters())
