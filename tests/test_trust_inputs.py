"""Bad input (issue 4): one clear message naming the bad thing, exit != 0, nothing created or overwritten; and the
security rules (checkpoints with weights_only, YAML with safe_load). All in-process through `train.main`: every case
fails before a model is built."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import embedded
import tasks
import train
from data import InputError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs") / "avsd"
    with mock.patch.dict(embedded.EMBEDDED_SPLITS, {"train": 4, "val": 2, "test": 2}):
        embedded.make_embedded_avsd(root)
    return root


@pytest.fixture
def root(tiny_root, tmp_path, monkeypatch):
    """A private copy of the tiny dataset, to break."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_root, tmp_path / "avsd"))


def break_json(root: Path) -> str:
    (root / "annotations" / "train.json").write_text('{"dialogs": [\n  {"image_id": "train0000",\n   "dialog": [}\n]}')
    return "malformed JSON in {root}/annotations/train.json, line 3"


def drop_answer(root: Path) -> str:
    path = root / "annotations" / "train.json"
    dialogs = json.loads(path.read_text())
    del dialogs["dialogs"][1]["dialog"][2]["answer"]
    path.write_text(json.dumps(dialogs))
    return "dialog 1 (image_id 'train0001'), turn 2: missing field(s) answer"


def drop_dialog_list(root: Path) -> str:
    path = root / "annotations" / "train.json"
    dialogs = json.loads(path.read_text())
    del dialogs["dialogs"][1]["dialog"]
    path.write_text(json.dumps(dialogs))
    return "{root}/annotations/train.json: dialog 1 (image_id 'train0001'): missing field(s) dialog"


def references_in_train(root: Path) -> str:
    path = root / "annotations" / "train.json"
    dialogs = json.loads(path.read_text())
    dialogs["dialogs"][0]["dialog"][-1]["answer"] = ["one reference", "another"]  # a multi-reference test file's turn
    path.write_text(json.dumps(dialogs))
    return "{root}/annotations/train.json: dialog 0 (image_id 'train0000'), turn 9: 'answer' must be a string"


def delete_feature(root: Path) -> str:
    (root / "features" / "vggish" / "train0002.npy").unlink()
    return "missing feature file for id 'train0002': {root}/features/vggish/train0002.npy"


def narrow_feature(root: Path) -> str:
    np.save(root / "features" / "i3d_flow" / "train0002.npy", np.zeros((5, 7), np.float32))
    return "feature file for id 'train0002' has shape (5, 7), expected (T, 2048)"


def empty_split(root: Path) -> str:
    (root / "annotations" / "val.json").write_text('{"dialogs": []}')
    return "empty split: no dialogs in {root}/annotations/val.json"


def other_task_checkpoint(root: Path) -> str:
    torch.save({"task": "caption", "model": {}}, root / "other.pt")
    return "{root}/other.pt is a checkpoint of task 'caption', not 'dialogue'"


def corrupt_checkpoint(root: Path) -> str:
    (root / "other.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    return "cannot read checkpoint {root}/other.pt: RuntimeError: PytorchStreamReader failed reading zip archive"


def text_checkpoint(root: Path) -> str:
    (root / "other.pt").write_text("not a checkpoint at all")
    return "cannot read checkpoint {root}/other.pt: "


class Payload:
    """A pickled object in a checkpoint: weights_only=True must refuse to build it."""

    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def incomplete_checkpoint(root: Path) -> str:
    torch.save({"task": "dialogue", "model": {}, "step": 3}, root / "other.pt")
    return "{root}/other.pt lacks optimizer, scheduler, best, window, rng"


def pickled_code_checkpoint(root: Path) -> str:
    torch.save({"task": "dialogue", "model": {}, "payload": Payload()}, root / "other.pt")
    return "cannot read checkpoint {root}/other.pt: UnpicklingError: Unsupported global: GLOBAL print"


@pytest.mark.parametrize(
    ("breaks", "flags"),
    [
        (break_json, []),
        (drop_answer, []),
        (drop_dialog_list, []),
        (references_in_train, []),
        (delete_feature, []),
        (narrow_feature, []),
        (empty_split, []),
        (other_task_checkpoint, ["--resume", "{root}/other.pt"]),
        (corrupt_checkpoint, ["--resume", "{root}/other.pt"]),
        (text_checkpoint, ["--resume", "{root}/other.pt"]),
        (incomplete_checkpoint, ["--resume", "{root}/other.pt"]),
        (pickled_code_checkpoint, ["--resume", "{root}/other.pt"]),
    ],
)
def test_bad_data_or_checkpoint_is_one_message_and_creates_nothing(root, tmp_path, breaks, flags, capsys):
    expected = breaks(root).format(root=root)
    out = tmp_path / "run"
    argv = ["dialogue", "--data.root", str(root), "--output-dir", str(out), *(f.format(root=root) for f in flags)]
    with pytest.raises(InputError) as error:
        train.main(argv)
    # One line, all of it kept: train.py prints only an error's last line (a worker's carries its traceback).
    assert expected in str(error.value) and "\n" not in str(error.value).strip()
    assert not out.exists()
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["dialogue", "--bogus", "1"], "Unrecognized options: --bogus"),
        (["dialogue", "--num-beams", "x"], "Error parsing --num-beams"),
        (["dialogue", "--num-beams", "0"], "--num-beams must be >= 1, got 0"),
        (["dialogue", "--min-len", "9", "--max-len", "3"], "need 0 <= --min-len <= --max-len"),
        (["dialogue", "--data.root", "/no/such/dir"], "--data.root /no/such/dir is not a directory"),
        (["dialogue", "--keep-last", "0"], "--keep-last must be >= 1"),
    ],
)
def test_bad_flag_is_one_message_and_exit_2(argv, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train.main([*argv, "--output-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro wraps its message in a box
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_task_suggests_the_closest_and_exits_2():
    proc = subprocess.run([sys.executable, "train.py", "dialog"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    names = ", ".join(tasks.TASKS)
    assert proc.stderr == f"error: unknown task 'dialog'; did you mean 'dialogue'? (tasks: {names})\n"


def held_run(tmp_path: Path, task: str = "dialogue") -> tuple[Path, dict]:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(f"task: {task}\nlr: 0.5\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def test_output_dir_holding_a_run_is_refused_and_left_alone(root, tmp_path):
    out, before = held_run(tmp_path)
    with pytest.raises(InputError, match="already holds a run: pass --resume auto to continue it, --overwrite"):
        train.main(["dialogue", "--data.root", str(root), "--output-dir", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resuming_a_run_of_another_task_is_refused_and_left_alone(root, tmp_path):
    out, before = held_run(tmp_path, task="caption")
    with pytest.raises(InputError, match="holds a run of task 'caption', not 'dialogue'"):
        train.main(["dialogue", "--data.root", str(root), "--output-dir", str(out), "--resume", "auto"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_with_bad_data_keeps_the_old_run(root, tmp_path):
    out, before = held_run(tmp_path)
    empty_split(root)
    with pytest.raises(InputError, match="empty split"):
        train.main(["dialogue", "--data.root", str(root), "--output-dir", str(out), "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_yaml_preset_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    preset = tmp_path / "evil.yaml"
    preset.write_text(f'task: dialogue\nlr: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(InputError, match="malformed YAML"):
        train.main(["dialogue", "--config", str(preset)])
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files: atomic pointers, retention


def state(step: int) -> dict:
    return {"task": "dialogue", "step": step, "model": {"w": torch.full((3,), float(step))}}


def test_a_crash_mid_save_leaves_the_last_checkpoint_readable_and_retention_keeps_last_n_plus_best(tmp_path):
    train.save_checkpoint(state(1), tmp_path, is_best=True, keep_last=2)

    def killed_mid_write(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies here

    with mock.patch.object(torch, "save", killed_mid_write), pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(state(2), tmp_path, is_best=True, keep_last=2)
    cfg = mock.Mock(resume="auto", fsdp=False)
    last = train.find_checkpoint(cfg, tmp_path)
    assert train.load_checkpoint(last, "dialogue", needs=("step",))["step"] == 1

    for step, best in [(2, False), (3, True), (4, False), (5, False), (6, False)]:
        train.save_checkpoint(state(step), tmp_path, is_best=best, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*.pt")) == [
        "ckpt_step00000003.pt",
        "ckpt_step00000005.pt",
        "ckpt_step00000006.pt",
    ]
    assert train.load_checkpoint(tmp_path / "ckpt_best.pt", "dialogue", needs=("step",))["step"] == 3
    assert train.load_checkpoint(train.find_checkpoint(cfg, tmp_path), "dialogue", needs=("step",))["step"] == 6


# ----------------------------------------------------------------------------------------------------------------
# A model or tokenizer that cannot be loaded: one line naming it and where it was set, nothing created


def llama_weights_under(config, directory: Path) -> Path:
    """A Llama checkpoint whose config.json describes another architecture: nothing of it fits."""
    from helpers import save_lm_family

    save_lm_family("llama", directory)
    config.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("task", "checkpoint", "expected"),
    [
        ("dialogue", None, "--model.name /no/such/dir: cannot load the tokenizer: no directory /no/such/dir"),
        ("dialogue", "gpt2", "its checkpoint does not fit GPT2LMHeadModel, the model its config.json describes: "),
        ("retrieval", "bert", "its checkpoint does not fit BertModel, the model its config.json describes: "),
    ],
)
def test_a_model_that_does_not_load_is_one_message_and_creates_nothing(root, tmp_path, task, checkpoint, expected):
    from transformers import BertConfig, GPT2Config

    name = "/no/such/dir"
    if checkpoint is not None:
        small = {
            "gpt2": GPT2Config(n_embd=32, n_layer=1, n_head=2),
            "bert": BertConfig(hidden_size=32, num_attention_heads=2),
        }
        config = small[checkpoint]
        name = str(llama_weights_under(config, tmp_path / "checkpoint"))
    out = tmp_path / "run"
    data_flags = ["--data.root", str(root)] if task == "dialogue" else []
    with pytest.raises(InputError) as error:
        train.main([task, *data_flags, "--model.name", name, "--output-dir", str(out)])
    assert expected in str(error.value) and "\n" not in str(error.value)
    if checkpoint is not None:
        assert str(error.value).startswith(f"--model.name {name}: ") and "missing" in str(error.value)
    assert not out.exists()


@pytest.mark.parametrize("from_preset", [True, False])
def test_a_tower_that_does_not_load_names_the_preset_or_the_flag_that_named_it(root, tmp_path, from_preset):
    preset = tmp_path / "preset.yaml"
    preset.write_text("model:\n  vision: /no/such/dir\n")
    flags = ["--config", str(preset)] if from_preset else ["--model.vision", "/no/such/dir"]
    with pytest.raises(InputError) as error:
        train.main(["dialogue", *flags, "--data.root", str(root), "--output-dir", str(tmp_path / "run")])
    source = f"{preset}: model.vision" if from_preset else "--model.vision"
    assert str(error.value) == f"{source} /no/such/dir: cannot load the image processor: no directory /no/such/dir"
    assert not (tmp_path / "run").exists()


def test_a_preset_hub_model_offline_is_one_line_naming_the_preset_and_creates_no_run_dir(tiny_root, tmp_path):
    preset = ROOT / "configs" / "dialogue_avsd_ft.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = [sys.executable, str(ROOT / "train.py"), "dialogue", "--config", str(preset), "--data.root", str(tiny_root)]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {preset}: model.name gpt2: cannot load the tokenizer: not a local directory")
    assert proc.stderr.endswith("pass a directory saved with save_pretrained\n") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
