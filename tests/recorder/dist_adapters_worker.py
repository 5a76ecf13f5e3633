"""The rank side of the adapters' DDP tests: ``python dist_adapters_worker.py JOB OUTDIR``.

Started twice by `dist_harness.run_ranks` with the variables torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the framework itself starts the gloo
group from them, as it would under torchrun. Each job trains the same tiny float64 model
twice under DDP with gradient accumulation over K micro-batches, unrecorded and through
the adapter, and writes ``OUTDIR/<job>.rank<r>.h5`` and ``OUTDIR/<job>.params<r>.pt`` (both
runs' final parameters). `reference` runs the adapter in one process on batches of W·B,
the same samples per optimizer step: what the shards must add up to.

Data order: HF's and Accelerate's loaders are sequential, and rank r gets batch j·W + r of
B, so global micro-batch j holds the same W·B samples as the one-process run's batch j.
Lightning's DistributedSampler shuffles: its reference replays the shards' micro-batches.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from samplescope.recorder import Recorder

WORLD, BATCH, K, N_SAMPLES, EPOCHS = 2, 4, 2, 16, 2
STEPS = EPOCHS * N_SAMPLES // (WORLD * BATCH * K)  # optimizer steps
JOBS = ("hf", "accelerate", "lightning")
T, V, CLASSES, FEATURES = 6, 40, 3, 5
ID_OFFSET = 500  # ids are not the row numbers: a mix-up would show


def tensors() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N_SAMPLES,), generator=g)
    return x, y, torch.arange(N_SAMPLES) + ID_OFFSET


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


# -- Hugging Face Trainer ------------------------------------------------------------------


def hf_rows() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(5)
    return [
        {
            "input_ids": torch.randint(1, V, (T,), generator=g),
            "labels": int(torch.randint(0, CLASSES, (1,), generator=g)),
            "sample_id": ID_OFFSET + i,
        }
        for i in range(N_SAMPLES)
    ]


def bert() -> nn.Module:
    import transformers

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
    return transformers.BertForSequenceClassification(config).double()


def hf_args(out: Path, batch: int) -> Any:
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=K,
        num_train_epochs=EPOCHS,
        learning_rate=1e-2,
        use_cpu=True,
        train_sampling_strategy="sequential",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=7,
        dataloader_num_workers=0,
    )


def hf_reference(out: Path) -> Path:
    from samplescope.recorder.integrations.transformers import RecordingTrainer

    path = out / "hf.ref.h5"
    RecordingTrainer(
        model=bert(),
        args=hf_args(out / "ref", WORLD * BATCH),
        train_dataset=hf_rows(),
        trace=path,
        task="classification",
    ).train()
    return path


def _hf(rank: int, out: Path) -> dict[str, Any]:
    import transformers

    from samplescope.recorder.integrations.transformers import RecordingTrainer

    class Plain(transformers.Trainer):
        """The unrecorded run: each step the mean cross-entropy, divided by K by the Trainer."""

        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            return F.cross_entropy(model(**inputs).logits, labels)

    plain = Plain(model=bert(), args=hf_args(out / "plain", BATCH), train_dataset=hf_rows())
    plain_loss = plain.train().training_loss
    recorded = RecordingTrainer(
        model=bert(),
        args=hf_args(out / "recorded", BATCH),
        train_dataset=hf_rows(),
        trace=str(out / "hf.rank{rank}.h5"),
        task="classification",
        recorder_options={"run_id": "hf"},
    )
    recorded_loss = recorded.train().training_loss
    return {
        "plain": plain.model.state_dict(),
        "recorded": recorded.model.state_dict(),
        "train_loss": {"plain": plain_loss, "recorded": recorded_loss},
    }


# -- Accelerate ------------------------------------------------------------------------------


def _accelerate_run(path: Path | None, batch: int) -> nn.Module:
    """Accelerate's accumulation loop; recorded through the adapter when ``path`` is given."""
    import accelerate

    from samplescope.recorder.integrations.accelerate import backward

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K)
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(*tensors()), batch_size=batch)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    rank, world = accelerator.process_index, accelerator.num_processes
    # Under DDP the recorder watches the prepared (wrapped) model, not unwrap_model(model).
    recording = (
        Recorder(path, model, opt, rank=rank, world_size=world, run_id="acc", accumulation_steps=K)
        if path is not None
        else None
    )
    with recording or contextlib.nullcontext() as rec:
        for epoch in range(EPOCHS):
            if rec is not None:
                rec.set_epoch(epoch)
            for x, y, ids in loader:
                with accelerator.accumulate(model):
                    logits = model(x)
                    losses = F.cross_entropy(logits, y, reduction="none")
                    if rec is None:
                        accelerator.backward(losses.mean())
                    else:
                        backward(accelerator, rec, losses, sample_ids=ids, logits=logits, targets=y)
                    opt.step()
                    opt.zero_grad()
    return accelerator.unwrap_model(model)


def accelerate_reference(out: Path) -> Path:
    path = out / "accelerate.ref.h5"
    _accelerate_run(path, WORLD * BATCH)
    return path


def _accelerate(rank: int, out: Path) -> dict[str, dict[str, Tensor]]:
    plain = _accelerate_run(None, BATCH)
    recorded = _accelerate_run(out / f"accelerate.rank{rank}.h5", BATCH)
    return {"plain": plain.state_dict(), "recorded": recorded.state_dict()}


# -- Lightning -------------------------------------------------------------------------------


def _lightning_modules() -> tuple[type, type]:
    import lightning.pytorch as pl

    from samplescope.recorder.integrations.lightning import RecordedModule

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = classifier()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Recorded(RecordedModule, Plain):
        def training_step(self, batch, batch_idx):
            x, y, ids = batch
            logits = self(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            return self.recorded(losses, sample_ids=ids, logits=logits, targets=y)

    return Plain, Recorded


def _fit(module: Any, loader: DataLoader, devices: int, epochs: int, callbacks: list[Any]) -> None:
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs,
        accumulate_grad_batches=K,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)


def lightning_reference(out: Path, micro_batches: list[list[int]]) -> Path:
    """One process over ``micro_batches`` (row numbers), in one epoch.

    Lightning's DistributedSampler shuffles (seeded, per epoch), so the global micro-batches
    are read from the shards' traces rather than predicted.
    """
    from samplescope.recorder.integrations.lightning import RecorderCallback

    path = out / "lightning.ref.h5"
    _, recorded = _lightning_modules()
    _fit(
        recorded(),
        DataLoader(TensorDataset(*tensors()), batch_sampler=micro_batches),
        devices=1,
        epochs=1,
        callbacks=[RecorderCallback(path, accumulation_steps=K)],
    )
    return path


def _lightning(rank: int, out: Path) -> dict[str, dict[str, Tensor]]:
    from samplescope.recorder.integrations.lightning import RecorderCallback

    plain_cls, recorded_cls = _lightning_modules()
    plain, recorded = plain_cls(), recorded_cls()
    callback = RecorderCallback(
        out / "lightning.rank{rank}.h5", run_id="lightning", accumulation_steps=K
    )
    # Lightning puts a DistributedSampler in place of the loader's own sampler.
    for module, callbacks in ((plain, []), (recorded, [callback])):
        loader = DataLoader(TensorDataset(*tensors()), batch_size=BATCH)
        _fit(module, loader, WORLD, EPOCHS, callbacks)
    return {"plain": plain.net.state_dict(), "recorded": recorded.net.state_dict()}


def main(job: str, out: Path) -> None:
    import os

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    runs = {"hf": _hf, "accelerate": _accelerate, "lightning": _lightning}
    if job not in runs:
        msg = f"unknown job {job!r}"
        raise SystemExit(msg)
    params = runs[job](rank, out)
    torch.save(params, out / f"{job}.params{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
