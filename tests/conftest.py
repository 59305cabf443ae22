"""Shared test setup: no wandb network, one thread per process, embedded datasets generated once per session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory):
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    import torch

    torch.set_num_threads(1)
    yield


def run_train(args, env=None, nproc=None, timeout=600, cwd=ROOT):
    """train.py in a subprocess (plain python, or torchrun with `nproc` ranks) with environment `env` (default:
    this process's); returns the CompletedProcess."""
    import subprocess

    cmd = [sys.executable, "train.py", *map(str, args)]
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
            "train.py",
            *map(str, args),
        ]
    return subprocess.run(
        cmd, cwd=cwd, env=os.environ if env is None else env, capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
