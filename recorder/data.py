"""Give every sample a stable id, so the trace can follow it across epochs."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["IndexedDataset", "with_sample_ids"]


class IndexedDataset(Dataset):
    """Wraps a map-style dataset: item ``i`` becomes ``(*item, i)``."""

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            msg = "with_sample_ids needs a map-style dataset (with __getitem__ and __len__)"
            raise TypeError(msg)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        return (item, index)


def with_sample_ids(dataset: Dataset) -> IndexedDataset:
    """Return ``dataset`` with each item extended by its index, its sample id.

    Example:
        >>> train = with_sample_ids(TensorDataset(x, y))   # items: (x, y, sample_id)
    """
    return IndexedDataset(dataset)
