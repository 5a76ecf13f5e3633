"""String sample ids: integer ids plus a /sample_names table, read back by the analysis."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from samplescope.analysis import open_trace
from samplescope.recorder import Recorder, RecorderError, sample_id_of


class _Keyed(Dataset):
    """Items (x, y, key) with string keys, as a Hugging Face dataset's id column gives."""

    def __init__(self, n: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.keys = [f"doc-{i:03d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.x[i], self.y[i], self.keys[i]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_string_ids_round_trip_through_the_trace(tmp_path):
    data = _Keyed()
    model = _model()
    path = tmp_path / "names.h5"
    flipped = np.array([True] + [False] * 11)
    info = {"sample_id": np.array(data.keys), "flipped": flipped}
    with Recorder(path, model, sample_info=info) as rec:
        for epoch in range(2):
            rec.set_epoch(epoch)
            for x, y, keys in DataLoader(data, batch_size=5, shuffle=True):
                assert isinstance(keys, (list, tuple))
                assert isinstance(keys[0], str)
                logits = model(x)
                rec.backward(F.cross_entropy(logits, y, reduction="none"), keys, logits, y)
    expected = {sample_id_of(k): k for k in data.keys}
    with h5py.File(path, "r") as f:
        ids = f["visits/sample_id"][:]
        stored = f["sample_names/sample_id"][:].tolist()
        names = dict(zip(stored, f["sample_names/name"].asstr()[:], strict=True))
        info_ids = f["sample_info/sample_id"][:].tolist()
    assert set(ids.tolist()) == set(expected)
    assert names == expected  # each name once, though seen in sample_info and two epochs
    assert info_ids == [sample_id_of(k) for k in data.keys]
    with open_trace(path) as t:
        samples = t.samples()
        assert samples.columns[:2] == ["sample_id", "sample_name"]
        by_name = dict(zip(samples["sample_name"], samples["sample_id"], strict=True))
        assert by_name == {k: sample_id_of(k) for k in data.keys}
        assert samples.filter(samples["sample_name"] == "doc-000")["flipped"].item() == 1
        sql = t.query(
            "SELECT sample_name, count(*) AS n FROM visits JOIN sample_names USING (sample_id) "
            "GROUP BY 1 ORDER BY 1"
        )
        assert sql["sample_name"].to_list() == sorted(data.keys)
        assert sql["n"].to_list() == [2] * 12
        # 63-bit hashed ids in the importance view (stored BIGINT, not INTEGER).
        per_sample = t.query("SELECT sample_id, sum(importance) AS i FROM importance GROUP BY 1")
        assert set(per_sample["sample_id"].to_list()) == set(expected)
        assert (
            t.query("SELECT count(*) AS n FROM samples WHERE sample_name = 'doc-003'")["n"].item()
            == 1
        )


def test_numpy_str_and_bytes_ids_are_names_too(tmp_path):
    model = _model()
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with Recorder(tmp_path / "np.h5", model) as rec:
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), np.array(["a", "b", "c"]))
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), [b"a", b"b", b"d"])
    with open_trace(tmp_path / "np.h5") as t:
        assert sorted(t.samples()["sample_name"].to_list()) == ["a", "b", "c", "d"]
        assert t.table("sample_names").collect().height == 4


def test_string_ids_are_checked_like_integer_ids(tmp_path):
    model = _model()
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with Recorder(tmp_path / "bad.h5", model) as rec:
        losses = F.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(RecorderError, match="'a' appears more than once"):
            rec.backward(losses, ["a", "b", "a"])
        with pytest.raises(RecorderError, match="mix strings"):
            rec.backward(losses, ["a", "b", 3])
        rec.backward(losses, ["a", "b", "c"])
        losses = F.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(RecorderError, match="one kind of sample id"):
            rec.backward(losses, [0, 1, 2])


def test_integer_ids_leave_sample_names_empty(tmp_path):
    model = _model()
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with Recorder(tmp_path / "int.h5", model) as rec:
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), torch.arange(3))
    with h5py.File(tmp_path / "int.h5", "r") as f:
        assert f["sample_names/sample_id"].shape == (0,)
    with open_trace(tmp_path / "int.h5") as t:
        assert "sample_name" not in t.samples().columns
        assert "sample_names" not in t.table_names
        assert t.samples()["sample_id"].to_list() == [0, 1, 2]


def test_sample_id_of_is_a_stable_non_negative_int64():
    assert sample_id_of("doc-000") == sample_id_of("doc-000")
    assert sample_id_of("a") != sample_id_of("b")
    assert 0 <= sample_id_of("é" * 50) < 2**63


def test_checkpoint_scores_take_string_ids(tmp_path):
    data = _Keyed(6)
    model = _model()

    def loss_fn(m, x, y):
        logits = m(x)
        return F.cross_entropy(logits, y, reduction="none"), logits

    with Recorder(tmp_path / "ckpt.h5", model, checkpoints=True) as rec:
        for x, y, keys in DataLoader(data, batch_size=3):
            rec.backward(F.cross_entropy(model(x), y, reduction="none"), keys)
        rec.score_checkpoint(DataLoader(data, batch_size=4), loss_fn)
    with open_trace(tmp_path / "ckpt.h5") as t:
        ids = t.checkpoints()["sample_id"].to_list()
        assert sorted(ids) == sorted(sample_id_of(k) for k in data.keys)
        assert t.samples()["grand_ckpt"].null_count() == 0
