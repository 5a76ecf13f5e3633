"""Training that the write-fault tests run, in a child process or in the test's own.

Step k trains on sample ids (k * batch + i) % N_SAMPLES, so a test knows every step's visits.
Exit status 2 with one ``Error: ...`` line on a recorder failure, as the CLI would.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from samplescope.recorder import Recorder, RecorderError, TraceWriteError

N_SAMPLES = 4096


def train(
    path: str, on_error: str, n_steps: int, batch: int, *, say=print, flush_seconds: float = 0.5
) -> int:
    """Train and record; returns the number of steps trained."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)], nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(N_SAMPLES, 16), torch.randint(0, 3, (N_SAMPLES,))
    step = 0
    with Recorder(path, model, opt, flush_seconds=flush_seconds, on_error=on_error) as rec:
        say("entered")
        while step < n_steps:
            ids = (torch.arange(batch) + step * batch) % N_SAMPLES
            logits = model(x[ids])
            losses = F.cross_entropy(logits, y[ids], reduction="none")
            rec.backward(losses, ids, logits, y[ids])
            opt.step()
            opt.zero_grad()
            step += 1
            if step % 10 == 0:
                rec.flush()
                say(f"flushed {step}")
    return step


def main() -> None:
    torch.set_num_threads(1)
    path, on_error, n_steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    try:
        step = train(path, on_error, n_steps, batch, say=lambda s: print(s, flush=True))
    except (RecorderError, TraceWriteError) as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)
    print("done", step, flush=True)


if __name__ == "__main__":
    main()
