"""Train a tiny model a few steps, record it, query the trace: the whole path a user takes."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from samplescope import Recorder
from samplescope.analysis import open_trace
from samplescope.cli import main
from samplescope.experiments.train import RunConfig, train_run


@pytest.fixture(scope="module")
def cnn_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "cnn.h5"
    config = RunConfig(dataset="digits", model="cnn", epochs=2, batch_size=64, lr=0.05)
    train_run(
        config, path, progress=False, recorder_options={"alignment": True, "input_grad": True}
    )
    return path


def test_recorded_cnn_trace_reads_back_through_sql_and_polars(cnn_trace):
    with h5py.File(cnn_trace, "r", swmr=True) as f:
        grad_sq = f["visits/grad_sq"][:].astype(np.float64)
        step_of_visit = f["visits/step"][:]
        lr = f["steps/lr"][:]
        batch = f["steps/batch_size"][:]
        methods = [m.decode() for m in f["layers/method"][:]]
        kinds = [k.decode() for k in f["layers/kind"][:]]
    assert kinds == ["Conv2d", "Conv2d", "Linear", "Linear"]
    assert methods == ["identity"] * 4
    expected = ((lr / batch)[step_of_visit, None] ** 2 * grad_sq).sum(0)
    n_steps = 2 * math.ceil(1437 / 64)
    with open_trace(cnn_trace) as t:
        assert t.meta["n_steps"] == n_steps
        got = t.sql(
            "SELECT layer_index, sum(importance) FROM importance GROUP BY 1 ORDER BY 1"
        ).fetchall()
        np.testing.assert_allclose([v for _, v in got], expected, rtol=1e-6)
        samples = t.samples()
        assert samples.height == 1437
        assert samples["sample_id"].n_unique() == 1437
        assert t.evals().height == 2


def test_cli_info_and_sql_on_a_recorded_trace(cnn_trace):
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(cnn_trace)])
    assert result.exit_code == 0, result.output
    assert "n_steps              46" in result.output
    assert "layer 0              0 (Conv2d, 320 params, identity)" in result.output
    result = runner.invoke(
        main, ["sql", str(cnn_trace), "SELECT count(*) AS n FROM visits", "--format", "csv"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["n", str(2 * 1437)]


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.encoder(self.embed(tokens)))
        return self.head(out[:, -1])


def test_transformer_and_lstm_record_through_reexpression(tmp_path):
    torch.manual_seed(0)
    model = _TokenModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens, y = torch.randint(0, 50, (24, 7)), torch.randint(0, 3, (24,))
    with Recorder(tmp_path / "tok.h5", model, opt) as rec:
        for start in (0, 8, 16):
            ids = torch.arange(start, start + 8)
            logits = model(tokens[ids])
            rec.backward(F.cross_entropy(logits, y[ids], reduction="none"), ids, logits, y[ids])
            opt.step()
            opt.zero_grad()
    with open_trace(tmp_path / "tok.h5") as t:
        layers = t.layers()
        methods = dict(zip(layers["layer"], layers["method"], strict=True))
        assert methods["encoder.self_attn"] == "reexpressed"
        assert methods["lstm"] == "reexpressed"  # recorder/layers/rnn.py
        assert methods["embed"] == "identity"
        assert layers["layer"][0] == "embed"
        assert t.samples().height == 24
