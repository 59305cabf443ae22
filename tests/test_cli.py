"""The command line: task listing, per-task help with docstrings, presets, the unknown-task suggestion, and a clean
console (stdout holds the run's own lines; evaluation has a progress bar)."""

import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import ROOT

import embedded
import metrics
import tasks
import train
from data import InputError


def help_text(*args):
    out = subprocess.run(
        [sys.executable, "train.py", *args, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_lists_every_task():
    text = help_text()
    for name in tasks.TASKS:
        assert name in text


def test_task_help_shows_every_contract_flag_with_its_docstring():
    text = help_text("dialogue")
    for flag in [
        "--num-beams",
        "--max-len",
        "--min-len",
        "--evaluate",
        "--output-dir",
        "--max-steps",
        "--max-epochs",
        "--seed",
        "--resume",
        "--config",
        "--data.root",
        "--model.name",
        "--wandb.mode",
        "--max-turns",
        "--use-caption",
        "--features",
    ]:
        assert flag in text, flag
    assert "Beam width at evaluation" in text and "Earlier question/answer pairs kept as history" in text


def test_flags_override_defaults_and_presets():
    name, cfg = train.parse_config(["dialogue", "--num-beams", "3", "--data.num-workers", "0"])
    assert name == "dialogue" and cfg.num_beams == 3 and cfg.data.num_workers == 0 and cfg.max_len == 20
    preset = ROOT / "configs" / "dialogue_avsd_ft.yaml"
    _, cfg = train.parse_config(["dialogue", "--config", str(preset), "--num-beams", "3"])
    assert cfg.num_beams == 3  # the flag wins over the preset's 5
    assert cfg.lr == 1e-5 and cfg.min_len == 5 and cfg.model.name == "gpt2" and cfg.max_epochs == 20


def test_unknown_task_suggests_the_closest():
    with pytest.raises(InputError, match="unknown task 'dialog'; did you mean 'dialogue'"):
        train.parse_config(["dialog"])


def test_preset_with_unknown_key_or_wrong_type_names_it(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: dialogue\nnum_beam: 3\n")
    with pytest.raises(InputError, match="unknown key 'num_beam'; did you mean 'num_beams'"):
        train.parse_config(["dialogue", "--config", str(bad)])
    bad.write_text("task: dialogue\ndata:\n  num_workers: two\n")
    with pytest.raises(InputError, match="data: num_workers: expected int, got 'two'"):
        train.parse_config(["dialogue", "--config", str(bad)])


def test_bad_input_found_in_a_loader_worker_is_one_clear_line(tmp_path: Path):
    """Errors raised while a DataLoader worker builds a batch arrive wrapped in the worker's traceback; the user
    still gets one line naming the sample, and exit 2."""
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "dialogue",
            "--model.n-positions",
            "16",
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
            "--data.num-workers",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "leave no room for text in the model's 16 positions" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer's chatter comes from Java")
def test_stdout_holds_only_the_runs_lines_and_evaluation_has_a_bar(tmp_path, capfd):
    """pycocoevalcap's PTB tokenizer (a Java process) prints "PTBTokenizer tokenized N tokens at ..." on every
    evaluation; none of it may reach the console (capfd sees file descriptors, so a child process's output too)."""
    with mock.patch.dict(embedded.EMBEDDED_SPLITS, {"train": 4, "val": 2, "test": 2}):
        embedded.make_embedded_avsd(tmp_path / "avsd")
    tiny = ["--model.n-layer", "1", "--model.n-embd", "32", "--model.n-head", "2", "--num-beams", "1", "--max-len", "4"]
    argv = ["dialogue", "--data.root", str(tmp_path / "avsd"), "--data.num-workers", "0", "--batch-size", "2", *tiny]
    train.main([*argv, "--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    out, err = capfd.readouterr()
    assert "PTBTokenizer" not in out + err
    lines = out.splitlines()
    assert lines[0].startswith("run dir ") and all(line.startswith("step 1 ") for line in lines[1:]), out
    assert any(line.startswith("step 1 test: ") for line in lines), out
    assert "eval val" in err and "eval test" in err  # rank 0's evaluation bars
    metrics.ptb_tokenize({"a": ["x"]})  # and the tokenizer itself: what it says stays with it
    assert capfd.readouterr() == ("", "")
