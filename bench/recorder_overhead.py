"""Recording overhead: plain training step vs recorded step, measured side by side.

    python bench/recorder_overhead.py            # every model below
    python bench/recorder_overhead.py --quick    # a few minutes: 5 models, few steps
    python bench/recorder_overhead.py --models lstm,gpt2
    python bench/recorder_overhead.py --models "" --reference  # validation attribution only

Models: mlp, cnn, transformer (the recorder issue's three), resnet18 (ResNet-18 for
32x32 inputs, batch 64), mlp49 (49 narrow Linear layers), lstm (a 2-layer LSTM tagger) and
gpt2 (Hugging Face GPT-2 with the small config's sizes, random weights; only when
transformers is installed, otherwise the row is skipped with a note).

For each model the plain step (forward, loss, backward, SGD step) and the recorded step
(the same plus per-sample norms, outputs and HDF5 writing) run interleaved in one process
on 2 threads; the table gives the median of the timed steps after warm-up and the ratio.
Beside them, the same per-sample norms from torch.func, Opacus and BackPACK (when
installed: pip install -e '.[bench]'), each checked for agreement with ours first.
Peak memory is measured per variant in a fresh subprocess: peak RSS during the steps
minus the RSS before the first step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplescope import Recorder
from samplescope.recorder.headroom import writer_headroom

torch.set_num_threads(2)
warnings.filterwarnings("ignore")

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 128)
        self.encoder = nn.TransformerEncoderLayer(
            128, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(128, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def mlp() -> tuple[nn.Module, Batch]:
    model = nn.Sequential(
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    return model, (torch.randn(128, 784), torch.randint(0, 10, (128,)))


def cnn() -> tuple[nn.Module, Batch]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4096, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    return model, (torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))


def transformer() -> tuple[nn.Module, Batch]:
    return TokenClassifier(), (torch.randint(0, 1000, (64, 64)), torch.randint(0, 10, (64,)))


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.rnn = nn.LSTM(64, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


def mlp49() -> tuple[nn.Module, Batch]:
    """49 narrow Linear layers (784-128, 47 x 128-128, 128-10): per-layer cost dominates."""
    layers: list[nn.Module] = [nn.Linear(784, 128), nn.ReLU()]
    for _ in range(47):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    layers.append(nn.Linear(128, 10))
    return nn.Sequential(*layers), (torch.randn(128, 784), torch.randint(0, 10, (128,)))


def lstm() -> tuple[nn.Module, Batch]:
    return LSTMTagger(), (torch.randint(0, 1000, (64, 32)), torch.randint(0, 10, (64,)))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with BatchNorm and an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet18() -> tuple[nn.Module, Batch]:
    """ResNet-18 for 32x32 inputs (CIFAR layout: 3x3 stem, 4 stages of 2 blocks)."""
    widths, layers, cin = (64, 128, 256, 512), [], 64
    for i, width in enumerate(widths):
        layers += [BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
        cin = width
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    return model, (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))


class GPT2NextToken(nn.Module):
    """GPT-2 (small config, random weights) predicting the token after the sequence."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        # Dropout off so plain and recorded steps do the same arithmetic.
        config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=tokens).logits[:, -1]


def gpt2() -> tuple[nn.Module, Batch]:
    return GPT2NextToken(), (torch.randint(0, 50257, (8, 64)), torch.randint(0, 50257, (8,)))


MODELS: dict[str, Callable[[], tuple[nn.Module, Batch]]] = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
    "resnet18": resnet18,
    "mlp49": mlp49,
    "lstm": lstm,
    "gpt2": gpt2,
}

# Models whose torch.func anchor (vmap over the batch of a per-sample grad) is too slow or too
# large to run beside them (over 15 minutes for ResNet-18); --quick also skips mlp49's.
SLOW_FUNC = {"resnet18", "lstm", "gpt2"}

# Models that need an optional package: (import name, what to install).
NEEDS = {"gpt2": ("transformers", "pip install transformers")}


# -- step functions: each returns a callable doing one full training step ---------------


def plain_step(model: nn.Module, batch: Batch) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step


def recorded_step(
    model: nn.Module, batch: Batch, path: Path, stack: contextlib.ExitStack, **options: object
):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = stack.enter_context(Recorder(path, model, opt, overwrite=True, **options))
    x, y = batch
    ids = torch.arange(len(y))

    def step() -> None:
        logits = model(x)
        rec.backward(F.cross_entropy(logits, y, reduction="none"), ids, logits, y)
        opt.step()
        opt.zero_grad()

    return step


def torch_func_norms(model: nn.Module, batch: Batch) -> tuple[Callable[[], None], Callable]:
    from torch.func import functional_call, grad, vmap

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch
    layers = _layer_params(model)

    def per_sample_norms() -> np.ndarray:
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return np.stack(
            [sum(grads[n].flatten(1).square().sum(1) for n in names).numpy() for names in layers],
            axis=1,
        )

    def step() -> None:
        per_sample_norms()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step, per_sample_norms


def opacus_norms(model: nn.Module, batch: Batch) -> tuple[Callable[[], None], Callable]:
    """Opacus ghost clipping's first backward, which yields per-sample norms (_norm_sample)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", use_ghost_clipping=True
    )
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    x, y = batch
    layers = _layer_params(model)
    named = dict(model.named_parameters())

    def norms_now() -> np.ndarray:
        # With loss_reduction="mean" Opacus rescales _norm_sample to the per-sample loss.
        return np.stack(
            [
                sum(named[p]._norm_sample.square() for p in names).detach().numpy()
                for names in layers
            ],
            axis=1,
        )

    def step() -> None:
        F.cross_entropy(wrapped(x), y).backward()
        opt.step()
        opt.zero_grad()

    def per_sample_norms() -> np.ndarray:
        F.cross_entropy(wrapped(x), y).backward()
        out = norms_now()
        opt.zero_grad()
        return out

    return step, per_sample_norms


def backpack_norms(model: nn.Module, batch: Batch) -> tuple[Callable[[], None], Callable]:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch
    layers = _layer_params(model)
    named = dict(model.named_parameters())

    def per_sample_norms() -> np.ndarray:
        with backpack(BatchL2Grad()):
            loss_fn(model(x), y).backward()
        n = len(y)
        out = np.stack(
            [sum(named[p].batch_l2 * n * n for p in names).detach().numpy() for names in layers],
            axis=1,
        )
        opt.zero_grad()
        return out

    def step() -> None:
        with backpack(BatchL2Grad()):
            loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step, per_sample_norms


def _layer_params(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped as the recorder groups them (module owning them)."""
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if ".self_attn.out_proj" in f".{owner}" or owner.endswith("self_attn.out_proj"):
            owner = owner.rsplit(".", 1)[0]
        groups.setdefault(owner, []).append(name)
    return list(groups.values())


def our_norms(model: nn.Module, batch: Batch) -> np.ndarray:
    """grad_sq of one recorded step, read back from the trace, in parameter order."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agree.h5"
        x, y = batch
        with Recorder(path, model) as rec:
            logits = model(x)
            rec.backward(F.cross_entropy(logits, y, reduction="none"), torch.arange(len(y)))
        model.zero_grad()
        with h5py.File(path, "r", swmr=True) as f:
            names = [n.decode() for n in f["layers/name"][:]]
            grad_sq = f["visits/grad_sq"][:]
    order = {name: j for j, name in enumerate(names)}
    owners = [g[0].rsplit(".", 1)[0] if "." in g[0] else "" for g in _layer_params(model)]
    return grad_sq[:, [order[o] for o in owners]]


# -- measurement ------------------------------------------------------------------------


def reference_rows(warmup: int, n: int) -> list[tuple[str, str, str]]:
    """MLP rows for validation attribution (``Recorder(reference=...)``), k = 1 and k = 10.

    The reference batch is 128 held-out samples, as large as a training batch: at k = 1
    every step adds its forward and backward plus the val_dot pass. Mean ms per step
    (the k = 10 cost is amortised over its ten steps).
    """
    torch.manual_seed(0)
    base, batch = mlp()
    reference = (torch.randn(128, 784), torch.randint(0, 10, (128,)))

    def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(x), y, reduction="none")

    rows = []
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        steps = {"plain": plain_step(copy.deepcopy(base), batch)}
        steps["recorded"] = recorded_step(copy.deepcopy(base), batch, Path(tmp) / "r.h5", stack)
        for k in (1, 10):
            options = {"reference": reference, "reference_loss": loss, "reference_every": k}
            path = Path(tmp) / f"k{k}.h5"
            steps[f"k={k}"] = recorded_step(copy.deepcopy(base), batch, path, stack, **options)
        # The mean, not the median, over a whole number of k = 10 periods: only one step in
        # ten measures the reference, and a median would leave it out.
        ms = _mean_ms(steps, warmup, 10 * -(-n // 10))
    for label in ("recorded", "k=1", "k=10"):
        ratio = ms[label] / ms["plain"]
        text = f"{ms[label]:9.2f}{ratio:8.2f}   x{ms[label] / ms['recorded']:.2f} of recorded"
        rows.append(("mlp", f"reference {label}" if "k" in label else "recorded (no ref)", text))
    return rows


def _mean_ms(steps: dict[str, Callable[[], None]], warmup: int, n: int) -> dict[str, float]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    totals = dict.fromkeys(steps, 0.0)
    for _ in range(n):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            totals[name] += time.perf_counter() - start
    return {k: v / n * 1e3 for k, v in totals.items()}


def interleaved(steps: dict[str, Callable[[], None]], warmup: int, n: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def peak_memory_mb(model_name: str, variant: str, n_steps: int = 10) -> tuple[float, float]:
    """Peak RSS (first two steps, then steady) above the process with its imports done.

    Measured in a fresh process; the kernel's high-water mark (VmHWM) is reset after the
    imports, so the figure holds the model, optimizer state, activations, gradients, the
    recorder's buffers and the trace writer — everything the training itself needs.
    """
    code = (
        "import sys, contextlib, tempfile, pathlib, gc;"
        "sys.path.insert(0, 'bench'); import recorder_overhead as b;"
        "gc.collect(); base = b.status_mb('VmRSS');"
        f"m, batch = b.MODELS[{model_name!r}](); stack = contextlib.ExitStack();"
        "tmp = pathlib.Path(tempfile.mkdtemp()) / 't.h5';"
        f"step = (b.plain_step(m, batch) if {variant!r} == 'plain' "
        "else b.recorded_step(m, batch, tmp, stack));"
        # Two warm-up steps: the trace's tables exist and convolutions have timed their
        # methods (a one-off transient, reported separately as 'first step').
        "[step() for _ in range(2)]; first = b.status_mb('VmHWM') - base;"
        # Hand memory that is free but kept by malloc back to the system first, so the
        # steady figure is what the steps use, not what the warm-up left behind.
        "gc.collect(); b.trim_heap(); open('/proc/self/clear_refs', 'w').write('5');"
        f"[step() for _ in range({n_steps})];"
        "stack.close(); print(first, b.status_mb('VmHWM') - base)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    first, steady = out.stdout.strip().splitlines()[-1].split()
    return float(first), float(steady)


def trim_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the system (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: mlp, cnn, transformer, resnet18, mlp49; few steps; no slow anchors",
    )
    parser.add_argument("--models", default=None, help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant (≥ 40)")
    parser.add_argument("--no-anchors", action="store_true", help="skip torch.func/Opacus/BackPACK")
    parser.add_argument(
        "--reference", action="store_true", help="add the MLP's validation-attribution rows"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="intra-op threads (1 on a shared, loaded machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = "mlp,cnn,transformer,resnet18,mlp49" if args.quick else ",".join(MODELS)
    models = list(filter(None, (default if args.models is None else args.models).split(",")))
    warmup, n = (3, 15) if args.quick else (20, max(40, args.steps))
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {n} steps, "
        f"{os.cpu_count()} CPUs, load average (1/5/15 min) {load}"
    )
    print(f"{'model':<12}{'variant':<22}{'ms/step':>9}{'ratio':>8}{'agrees':>8}", flush=True)
    for name in models:
        if name in NEEDS and importlib.util.find_spec(NEEDS[name][0]) is None:
            print(
                f"note: skipping the {name} row: {NEEDS[name][0]} is not installed "
                f"({NEEDS[name][1]})"
            )
            continue
        # Each model's rows as soon as they are measured: a long run shows progress.
        for model_name, label, text in model_rows(name, args, warmup, n):
            print(f"{model_name:<12}{label:<22}{text}", flush=True)
    if args.reference:  # --models "" --reference: those rows only
        for model_name, label, text in reference_rows(warmup, n):
            print(f"{model_name:<12}{label:<22}{text}", flush=True)
    for layers in (4, 50):
        rate = writer_headroom(layers)
        print(f"writer headroom, {layers} layers: {rate:,.0f} visits/s (HDF5 included)")
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"load average at the end: {load}")


def model_rows(name: str, args: argparse.Namespace, warmup: int, n: int) -> list[tuple]:
    rows = []
    torch.manual_seed(0)
    base, batch = MODELS[name]()
    anchors = [] if args.no_anchors else list(ANCHORS)
    if name in SLOW_FUNC or (args.quick and name == "mlp49"):
        anchors = [a for a in anchors if "func" not in a[0]]
        rows.append((name, "torch.func (norms)", "skipped: too slow for this model"))
    reference = our_norms(copy.deepcopy(base), batch) if anchors else None
    # Each variant is interleaved with its own plain step, so a slow neighbour (torch.func
    # allocates gigabytes) never colours another variant's figure.
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        plain = plain_step(copy.deepcopy(base), batch)
        ours = recorded_step(copy.deepcopy(base), batch, Path(tmp) / "t.h5", stack)
        # The first step of each (convolutions probe their methods in the recorded one).
        first = {}
        for label, step in (("plain", plain), ("ours", ours)):
            start = time.perf_counter()
            step()
            first[label] = (time.perf_counter() - start) * 1e3
        ms = interleaved({"plain": plain, "ours": ours}, warmup, n)
        rows.append((name, "plain", f"{ms['plain']:9.2f}{1:8.2f}"))
        ratio = ms["ours"] / ms["plain"]
        rows.append((name, "samplescope (all)", f"{ms['ours']:9.2f}{ratio:8.2f}{'ref':>8}"))
        rows.append(
            (
                name,
                "first step ms",
                f"{first['plain']:9.1f} / {first['ours']:.1f} recorded "
                f"({first['ours'] / ms['ours']:.1f}x a recorded step)",
            )
        )
        for label, factory in anchors:
            try:
                step, norms = factory(copy.deepcopy(base), batch)
                agree = "yes" if np.allclose(norms(), reference, rtol=2e-3, atol=1e-6) else "NO"
            except Exception as error:  # noqa: BLE001 - a reference tool may not support a model
                rows.append((name, label, f"unavailable: {type(error).__name__}"))
                continue
            pair = interleaved(
                {"plain": plain_step(copy.deepcopy(base), batch), "tool": step},
                warmup,
                max(10, n // 4) if "func" in label else n,
            )
            ratio = pair["tool"] / pair["plain"]
            rows.append((name, label, f"{pair['tool']:9.2f}{ratio:8.2f}{agree:>8}"))
    mem_steps = 4 if args.quick else 10
    (first_plain, mem_plain), (first_rec, mem_rec) = (
        peak_memory_mb(name, "plain", mem_steps),
        peak_memory_mb(name, "recorded", mem_steps),
    )
    rows.append(
        (
            name,
            "peak MB plain/recorded",
            f"{mem_plain:7.0f} / {mem_rec:.0f}  ratio {mem_rec / mem_plain:.2f}"
            f"   (first steps {first_plain:.0f} / {first_rec:.0f})",
        )
    )
    return rows


ANCHORS = (
    ("torch.func (norms)", torch_func_norms),
    ("opacus ghost (norms)", opacus_norms),
    ("backpack (norms)", backpack_norms),
)


if __name__ == "__main__":
    main()
