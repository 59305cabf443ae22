"""Runs that fail on purpose, for the recovery tests. As a script, `python tests/faulty.py kill|raise STEP RANK TASK
[flags]` (under torchrun too) is train.py with rank RANK failing once STEP steps are done, in torchrun's first
attempt only (--max-restarts then runs through); in-process, `fail_after` is what to monkeypatch
train.forward_backward with."""

import itertools
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist

import train


def fail_after(how: str, step: int, rank: int = 0):
    """train.forward_backward, except that on rank `rank` it raises (or SIGKILLs the process: `how` "kill") when
    step `step` + 1 would start, that is after step `step` and its checkpoint."""
    real, calls = train.forward_backward, itertools.count(1)

    def forward_backward(*args, **kwargs):
        me = dist.get_rank() if dist.is_initialized() else 0
        if next(calls) == step + 1 and me == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault: rank {rank} fails after step {step}")
        return real(*args, **kwargs)

    return forward_backward


if __name__ == "__main__":
    train.forward_backward = fail_after(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    train.run(sys.argv[4:])
