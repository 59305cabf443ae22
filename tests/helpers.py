"""Helpers for the encoder-task tests (retrieval, classification, the adding-a-task guide): a private environment
(no wandb, one thread, a private embedded-data cache), train.py in a subprocess, and an untrained baseline."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module", autouse=True)
def private_environment(tmp_path_factory):
    """Set for the module, restored after: wandb off, one thread, embedded datasets generated into a temp cache."""
    import torch

    saved, threads = dict(os.environ), torch.get_num_threads()
    os.environ.update(
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache")),
    )
    torch.set_num_threads(1)
    yield
    os.environ.clear()
    os.environ.update(saved)
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, nproc: int | None = None, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """train.py in a subprocess: plain python, or torchrun with `nproc` ranks (gloo on CPU)."""
    cmd = [sys.executable, "train.py", *map(str, args)]
    if nproc:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
        cmd = [sys.executable, *launcher, *cmd[1:]]
    done = subprocess.run(cmd, cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untrained_metrics(task_name: str, tmp_path: Path, seed: int = 42) -> dict[str, float]:
    """Val metrics of the task's freshly initialised model (the baseline a training run must beat clearly)."""
    import torch
    from torch.utils.data import DataLoader

    import tasks

    task_class, default = tasks.TASKS[task_name]
    cfg = dataclasses.replace(default, data=dataclasses.replace(default.data, num_workers=0))
    task = task_class(cfg)
    datasets = task.build_datasets()
    torch.manual_seed(seed)
    model = task.build_model(datasets["train"], tmp_path / "tokenizer").eval()
    loader = DataLoader(datasets["val"], batch_size=32, collate_fn=partial(task.collate, train=False))
    return task.after_evaluation(task.evaluation(model, loader, lambda batch: batch), "val")
