"""Hugging Face `Trainer`: recorded runs bit-identical to unrecorded ones, ids kept.

Tiny BERT (sequence classification) and GPT-2 (causal LM) from configs, CPU, nothing
downloaded. The classifier is compared with the stock `transformers.Trainer` (its model
computes the mean cross-entropy itself, and `remove_unused_columns` drops the id column
there); the language model with a `Trainer` whose `compute_loss` is the documented
per-sequence mean, written out here independently of the adapter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration_support import assert_same_parameters, steps, visits
from torch import Tensor

from samplescope.recorder.integrations import IntegrationError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from samplescope.recorder.integrations.transformers import (  # noqa: E402
    RecordingTrainer,
    sequence_losses,
)

N_SAMPLES, T, V, CLASSES, BATCH = 12, 6, 40, 3, 4
ID_OFFSET = 500  # ids are not the row numbers: a mix-up would show


def _rows(*, lm: bool) -> list[dict[str, Tensor | int]]:
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(N_SAMPLES):
        ids = torch.randint(1, V, (T,), generator=g)
        if lm:
            labels = ids.clone()
            labels[: i % 4] = -100  # a prompt of 0-3 tokens left out of the loss
            rows.append({"input_ids": ids, "labels": labels, "sample_id": ID_OFFSET + i})
        else:
            label = int(torch.randint(0, CLASSES, (1,), generator=g))
            rows.append({"input_ids": ids, "labels": label, "sample_id": ID_OFFSET + i})
    return rows


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config)


def _args(tmp_path, **overrides):
    options = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": BATCH,
        "num_train_epochs": 2,
        "learning_rate": 1e-2,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 7,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return transformers.TrainingArguments(**options)


class _Seen:
    """Each step's input_ids and per-sample losses, as the unrecorded run computed them."""

    def __init__(self) -> None:
        self.input_ids: list[Tensor] = []
        self.losses: list[Tensor] = []

    def add(self, input_ids: Tensor, losses: Tensor) -> None:
        self.input_ids.append(input_ids.detach().clone())
        self.losses.append(losses.detach().clone())


class _StockTrainer(transformers.Trainer):
    """The stock Trainer; it only notes what the model computed."""

    seen: _Seen

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        labels = inputs["labels"]
        self.seen.add(
            inputs["input_ids"], F.cross_entropy(outputs.logits, labels, reduction="none")
        )
        return (loss, outputs) if return_outputs else loss


class _SequenceMeanTrainer(transformers.Trainer):
    """A user's own loop: each sequence's mean token loss, averaged over the batch."""

    seen: _Seen

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[:, :-1]
        targets = labels[:, 1:]
        per_token = F.cross_entropy(
            logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100, reduction="none"
        ).reshape(targets.shape)
        losses = per_token.sum(1) / (targets != -100).sum(1)
        self.seen.add(inputs["input_ids"], losses)
        return losses.mean()


def _trace_matches(path, seen: _Seen, rows) -> None:
    """The trace's ids and losses are those the unrecorded run computed, step by step."""
    id_of = {tuple(r["input_ids"].tolist()): r["sample_id"] for r in rows}
    ids = [id_of[tuple(s.tolist())] for batch in seen.input_ids for s in batch]
    got = visits(path)
    assert got["sample_id"].tolist() == ids
    assert np.array_equal(got["loss"], torch.cat(seen.losses).numpy().astype(np.float32))
    assert sorted(ids[:N_SAMPLES]) == list(range(ID_OFFSET, ID_OFFSET + N_SAMPLES))
    table = steps(path)
    assert table["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
    assert table["batch_size"].tolist() == [BATCH] * 6


@pytest.mark.slow
def test_classification_is_bit_identical_to_the_stock_trainer(tmp_path):
    rows = _rows(lm=False)
    stock = _StockTrainer(model=_bert(), args=_args(tmp_path), train_dataset=rows)
    stock.seen = _Seen()
    stock.train()
    recorded = RecordingTrainer(
        model=_bert(),
        args=_args(tmp_path),
        train_dataset=rows,
        trace=tmp_path / "bert.h5",
        task="classification",
    )
    recorded.train()
    assert not torch.equal(_bert().classifier.weight, recorded.model.classifier.weight)
    assert_same_parameters(stock.model, recorded.model)
    _trace_matches(tmp_path / "bert.h5", stock.seen, rows)
    got = visits(tmp_path / "bert.h5")
    label_of = {r["sample_id"]: r["labels"] for r in rows}
    assert got["target"].tolist() == [label_of[i] for i in got["sample_id"].tolist()]
    assert recorded.recorder is not None
    assert not recorded.recorder.active  # closed when train() returned
    # Evaluation takes the same per-sample losses (and the id column out of the batch).
    metrics = recorded.evaluate(rows)
    model = recorded.model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.stack([r["input_ids"] for r in rows])).logits
    expected = F.cross_entropy(logits, torch.tensor([r["labels"] for r in rows]))
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_causal_lm_is_bit_identical_to_the_per_sequence_mean(tmp_path):
    rows = _rows(lm=True)
    plain = _SequenceMeanTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=rows)
    plain.seen = _Seen()
    plain.train()
    recorded = RecordingTrainer(
        model=_gpt2(),
        args=_args(tmp_path),
        train_dataset=rows,
        trace=tmp_path / "gpt2.h5",
        task="causal_lm",
    )
    recorded.train()
    assert not torch.equal(_gpt2().lm_head.weight, recorded.model.lm_head.weight)
    assert_same_parameters(plain.model, recorded.model)
    _trace_matches(tmp_path / "gpt2.h5", plain.seen, rows)
    assert "target" not in visits(tmp_path / "gpt2.h5")  # no class outputs for an LM


def test_sequence_losses_take_the_mean_over_labelled_tokens():
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, 3, 4], [-100, -100, 0, -100]])
    got = sequence_losses(logits, labels, shift=True)
    first = F.cross_entropy(logits[0, :3], labels[0, 1:])
    second = F.cross_entropy(logits[1, 1:2], labels[1, 2:3])  # the one labelled next token
    assert torch.allclose(got, torch.stack([first, second]))
    none = sequence_losses(logits, torch.full((2, 4), -100), shift=False)
    assert torch.equal(none, torch.zeros(2))


def test_a_batch_without_the_id_column_is_refused(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "sample_id"} for r in _rows(lm=False)]
    trainer = RecordingTrainer(
        model=_bert(),
        args=_args(tmp_path, max_steps=1),
        train_dataset=rows,
        trace=tmp_path / "t.h5",
        task="classification",
    )
    with pytest.raises(IntegrationError, match="no 'sample_id' column"):
        trainer.train()
    # The recorder it had opened was closed on the way out: a readable trace, no steps.
    assert not trainer.recorder.active
    assert len(steps(tmp_path / "t.h5")["step"]) == 0


def test_gradient_accumulation_records_one_step_per_optimizer_step(tmp_path):
    trainer = RecordingTrainer(
        model=_bert(),
        args=_args(tmp_path, gradient_accumulation_steps=2, max_steps=1),
        train_dataset=_rows(lm=False),
        trace=tmp_path / "ga.h5",
        task="classification",
    )
    trainer.train()
    # Two micro-batches of BATCH, one optimizer step: one /steps row over both.
    assert steps(tmp_path / "ga.h5")["batch_size"].tolist() == [2 * BATCH]


def test_trace_and_recorder_are_exclusive(tmp_path):
    with pytest.raises(IntegrationError, match="either trace="):
        RecordingTrainer(model=_bert(), args=_args(tmp_path), task="classification")
