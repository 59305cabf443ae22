"""Helpers for end-to-end tests: train.py that must succeed, metrics.jsonl, and the untrained baseline a training
run must beat."""

import dataclasses
import json
from functools import partial
from pathlib import Path

import torch
from conftest import ROOT, run_train


def train_ok(args, nproc: int | None = None, cwd: Path = ROOT):
    """train.py in a subprocess (torchrun with `nproc` ranks); fails the test with its output if it fails."""
    done = run_train(args, nproc=nproc, cwd=cwd)
    assert done.returncode == 0, f"train.py {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
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


def shuffled_val_metric(task_name: str, run_dir: Path, out_dir: Path, key: str, *flags) -> float:
    """The run's best checkpoint evaluated with every sample given another sample's features: val `key`."""
    args = ["--evaluate", "--resume", run_dir / "ckpt_best.pt", "--output-dir", out_dir, "--data.shuffle-features"]
    train_ok([task_name, *args, *flags])
    (value,) = [m[key] for m in read_metrics(out_dir) if key in m]
    return value


def write_image_dataset(root: Path, splits: dict[str, list], features: dict[str, tuple], seed: int = 0) -> Path:
    """The image tasks' real layout: ROOT/annotations/{split}.json and a random ROOT/features/{id}.npy per id."""
    import numpy as np

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    (root / "features").mkdir()
    for split, entries in splits.items():
        (root / "annotations" / f"{split}.json").write_text(json.dumps(entries))
    for image_id, shape in features.items():
        np.save(root / "features" / f"{image_id}.npy", rng.standard_normal(shape).astype(np.float32))
    return root


def comparable_weights(state: dict) -> dict:
    """A state dict without the key third of GPT-2's attention biases, which nothing the model computes depends on
    (softmax is shift-invariant): its gradient is float rounding noise, which Adam scales up to updates of ~lr, so it
    differs between runs that only round differently (2 ranks and 1 process, a hand-written loop)."""
    out = dict(state)
    for name, value in state.items():
        if name.endswith("attn.c_attn.bias"):
            third = len(value) // 3
            out[name] = torch.cat([value[:third], value[2 * third :]])
    return out
