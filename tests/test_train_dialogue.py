"""End-to-end runs of train.py: one process, torchrun with 2 ranks, and a learning test on the embedded data."""

import json
import os

import torch
from conftest import run_train
from helpers import read_metrics, shuffled_val_metric, train_ok

SMALL = [
    "--model.n-layer",
    "1",
    "--model.n-embd",
    "64",
    "--num-beams",
    "2",
    "--max-len",
    "8",
    "--data.num-workers",
    "1",
    "--log-every",
    "5",
]


def check_run_dir(run_dir, steps):
    events = read_metrics(run_dir)
    train_events = [e for e in events if "train/loss" in e]
    assert train_events and train_events[-1]["step"] == steps
    assert {"train/lr", "train/samples_per_s", "train/tokens_per_s", "train/grad_norm"} <= set(train_events[-1])
    val = [e for e in events if "val/CIDEr" in e]
    assert val and {"val/Bleu_1", "val/Bleu_4", "val/METEOR", "val/ROUGE_L"} <= set(val[-1])
    assert any("test/CIDEr" in e for e in events)
    for name in ["config.yaml", "ckpt_last.pt", "ckpt_best.pt", "tokenizer/tokenizer.json"]:
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results" / f"val_step{steps}.json").read_text())
    assert len(results) == 40 and len({r["id"] for r in results}) == 40  # every val dialog once, no padding repeats
    assert {"id", "prediction", "references"} <= set(results[0])
    ckpt = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    assert ckpt["step"] == steps and ckpt["task"] == "dialogue"
    return events


def test_single_process_run_trains_evaluates_checkpoints_and_logs_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc: no wandb credentials
    out = run_train(
        [
            "dialogue",
            "--max-steps",
            "20",
            "--eval-every",
            "10",
            "--output-dir",
            tmp_path / "run",
            "--wandb.mode",
            "online",
            *SMALL,
        ],
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    events = check_run_dir(tmp_path / "run", steps=20)
    assert [e["step"] for e in events if "val/CIDEr" in e] == [10, 20]
    assert "wandb: no credentials" in out.stderr and "logging offline" in out.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))

    # --evaluate scores a checkpoint without training and writes its results.
    train_ok(
        [
            "dialogue",
            "--evaluate",
            "--resume",
            tmp_path / "run" / "ckpt_best.pt",
            "--output-dir",
            tmp_path / "eval",
            *SMALL,
        ]
    )
    events = read_metrics(tmp_path / "eval")
    assert {"val/CIDEr", "test/CIDEr"} <= {k for e in events for k in e}
    assert not list((tmp_path / "eval").glob("ckpt*"))


def test_torchrun_two_ranks_train_evaluate_and_checkpoint(tmp_path):
    out = train_ok(
        ["dialogue", "--max-steps", "12", "--eval-every", "12", "--output-dir", tmp_path / "run", *SMALL], nproc=2
    )
    assert "2 rank(s)" in out.stdout
    check_run_dir(tmp_path / "run", steps=12)


def test_learns_on_embedded_data_and_relies_on_the_video(tmp_path):
    """A short CPU run clearly raises CIDEr over the untrained model; the same checkpoint with features shuffled
    across dialogs scores far lower, so the model reads the answers off the video, not off the text.
    (Question-only context: with caption and history the small model needs a few times more steps before it starts
    reading the video.)"""
    args = [
        "--num-beams",
        "2",
        "--max-turns",
        "0",
        "--no-use-caption",
        "--data.num-workers",
        "1",
        "--log-every",
        "50",
        "--lr",
        "3e-3",
    ]

    def val_cider(run_dir):
        return [e["val/CIDEr"] for e in read_metrics(run_dir) if "val/CIDEr" in e]

    train_ok(["dialogue", "--max-steps", "1", "--output-dir", tmp_path / "untrained", *args])
    untrained = val_cider(tmp_path / "untrained")[-1]

    train_ok(["dialogue", "--max-steps", "480", "--eval-every", "240", "--output-dir", tmp_path / "run", *args])
    trained = max(val_cider(tmp_path / "run"))
    assert trained > 3.5 and trained > untrained + 3.0, (untrained, trained)

    shuffled = shuffled_val_metric("dialogue", tmp_path / "run", tmp_path / "shuffled", "val/CIDEr", *args)
    assert shuffled < 0.7 * trained, (shuffled, trained)
