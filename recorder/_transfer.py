"""A step's tensors on their way to the writer thread, with no host synchronisation.

On an accelerator, reading a tensor's values on the host (``.numpy()``, ``.item()``,
``float()``) waits for every kernel queued before it: once per step, that stalls the
training thread and empties the device's queue. Instead, each tensor is copied to host
memory with ``non_blocking=True`` (torch puts such copies in pinned memory) and an event
is recorded on the device's current stream after the copies. The writer thread, which
reads the rows when it next writes, waits for the event and only then converts to numpy.

CPU tensors need neither copy nor event: the path is the same, with nothing to wait for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DeferredRows", "HostTransfer", "NonfiniteCounter"]


_NOT_NUMPY = (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def _needs_copy(t: Tensor) -> bool:
    return t.device.type != "cpu"


def _record_event(device: torch.device) -> Any:
    """An event on ``device``'s current stream, or None where the device has no streams."""
    try:
        stream = torch.accelerator.current_stream(device)
    except (RuntimeError, ValueError, TypeError):
        # Not an accelerator torch knows streams for (e.g. XLA): its copies to the host
        # complete before `.to` returns, so there is nothing to wait for.
        return None
    return stream.record_event()


class HostTransfer:
    """Starts copying tensors to host memory now; `arrays` (another thread) waits and converts.

    Args:
        tensors: the step's tensors, by name. CPU tensors are held as they are, so pass
            tensors nothing will modify in place (copies where in doubt).
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._host: dict[str, Tensor] = {}
        devices: dict[torch.device, None] = {}
        self.nbytes = 0  # host memory the copies hold until the writer converts them
        for name, tensor in tensors.items():
            t = tensor.detach()
            self.nbytes += t.numel() * t.element_size()
            if t.dtype in _NOT_NUMPY:
                t = t.float()  # on the device, before the copy: numpy has no bfloat16
            if _needs_copy(t):
                devices[t.device] = None
                t = t.to("cpu", non_blocking=True)
            self._host[name] = t
        self._events = [_record_event(device) for device in devices]
        self._arrays: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def arrays(self) -> dict[str, np.ndarray]:
        """The tensors as numpy arrays, once their copies are complete (blocks until then)."""
        with self._lock:
            if self._arrays is None:
                for event in self._events:
                    if event is not None:
                        event.synchronize()
                self._arrays = {name: t.numpy() for name, t in self._host.items()}
                self._host, self._events = {}, []
            return self._arrays


class DeferredRows(Mapping[str, np.ndarray]):
    """A table's rows, built by ``produce`` the first time anything reads them.

    The recorder appends these to the writer, whose thread is the first to read them, so
    the waiting and converting in ``produce`` happen there and not on the training thread.
    """

    def __init__(self, produce: Callable[[], Mapping[str, np.ndarray]]) -> None:
        self._produce: Callable[[], Mapping[str, np.ndarray]] | None = produce
        self._rows: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def _resolved(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._rows is None:
                assert self._produce is not None
                self._rows = dict(self._produce())
                self._produce = None
            return self._rows

    def __getitem__(self, key: str) -> np.ndarray:
        return self._resolved()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())


class NonfiniteCounter:
    """Non-finite values counted by the writer thread, read by the training thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.first_step: int | None = None

    def add(self, step: int, count: int) -> None:
        if not count:
            return
        with self._lock:
            self.total += count
            if self.first_step is None or step < self.first_step:
                self.first_step = step
