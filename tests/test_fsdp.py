"""--fsdp (FSDP2 over 2 gloo ranks) against one process, its sharded checkpoints and exact resume, evaluation of a
sharded model, and lean checkpoints (frozen parameters left out, their digest checked).

The model has frozen parts throughout: the word embeddings (tied to the LM head, in FSDP's root unit) and the MLP of
the first block (inside a block's unit). Runs under torchrun execute this file, which freezes them and runs train.py.
"""

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import comparable_weights, step_metrics

import embedded
import tasks
import train
from data import InputError

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "--model.n-layer", "1", "--model.n-embd", "32", "--model.n-head", "2", "--model.dropout", "0",
    "--num-beams", "1", "--max-len", "5", "--data.num-workers", "0", "--log-every", "1", "--lr", "3e-3",
    "--warmup-steps", "2", "--max-steps", "6", "--eval-every", "3", "--max-grad-norm", "0.5",
]  # fmt: skip
SHARDED = ["--fsdp", "--batch-size", "2", "--grad-accum", "2"]  # 2 ranks x 2 micro-batches of 2 = the batch of 8
FROZEN = ("lm.transformer.wte.weight", "lm.lm_head.weight", "lm.transformer.h.0.mlp.c_fc.weight")
unfrozen_build = tasks.DialogueTask.build_model


def build_with_frozen_parts(self, *args, shift: float = 0.0):
    model = unfrozen_build(self, *args)
    model.lm.transformer.wte.requires_grad_(False)
    model.lm.transformer.h[0].mlp.requires_grad_(False)
    with torch.no_grad():
        model.lm.transformer.h[0].mlp.c_fc.weight.add_(shift)  # "other pretrained weights"
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    with mock.patch.dict(embedded.EMBEDDED_SPLITS, {"train": 12, "val": 6, "test": 6}):
        embedded.make_embedded_avsd(base / "avsd")
    no_java = base / "bin"  # PATH without java: metrics skip METEOR (seconds per evaluation)
    no_java.mkdir()
    variables = {"PATH": f"{Path(sys.executable).parent}:{no_java}", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return {"base": base, "flags": [*FLAGS, "--data.root", str(base / "avsd")], "env": {**os.environ, **variables}}


def in_process(argv: list[str], shift: float = 0.0) -> None:
    """train.main here, with the frozen parts; the signal handlers it installs are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    build = lambda self, *args: build_with_frozen_parts(self, *args, shift=shift)  # noqa: E731
    try:
        with mock.patch.object(tasks.DialogueTask, "build_model", build):
            train.main(["dialogue", *argv])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def torchrun(env, *args) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", __file__, "dialogue"]
    proc = subprocess.run([*cmd, *args], cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


metrics = step_metrics


def sharded_weights(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, tmp / "whole.pt")
    return torch.load(tmp / "whole.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def runs(env):
    """`one`: 1 process, batch 8; `fsdp`: 2 ranks with --fsdp, 2 micro-batches of 2 each. Both evaluate at steps 3
    and 6, then the test split with the best checkpoint. `resumed`: the fsdp run as if killed before it saved step
    6, continued with --resume auto; `evaluated`: --evaluate of its best checkpoint (step 3)."""
    base = env["base"]
    in_process([*env["flags"], "--batch-size", "8", "--output-dir", str(base / "one")])
    torchrun(env, *env["flags"], *SHARDED, "--output-dir", base / "fsdp")
    resumed = Path(shutil.copytree(base / "fsdp", base / "resumed", symlinks=True))
    shutil.rmtree(resumed / "ckpt_step00000006.dcp")
    train.point(resumed / "ckpt_last.dcp", "ckpt_step00000003.dcp")
    proc = torchrun(env, *env["flags"], *SHARDED, "--output-dir", resumed, "--resume", "auto")
    assert "resumed at step 3" in proc.stdout
    torchrun(env, *env["flags"], "--fsdp", "--evaluate", "--resume", base / "fsdp" / "ckpt_best.dcp",
             "--output-dir", base / "evaluated")  # fmt: skip
    return {name: base / name for name in ("one", "fsdp", "resumed", "evaluated")}


def test_fsdp_on_two_ranks_trains_like_one_process(runs, tmp_path):
    one, fsdp = metrics(runs["one"]), metrics(runs["fsdp"])
    diff = max(abs(one[s]["train/loss"] - fsdp[s]["train/loss"]) for s in range(1, 7))
    print(f"max |loss| difference, 2 ranks --fsdp --grad-accum 2 vs 1 process: {diff:.2e}")
    assert diff < 1e-5
    assert fsdp[6]["train/grad_norm"] == pytest.approx(one[6]["train/grad_norm"], rel=1e-4)
    assert "val/CIDEr" in fsdp[3] and "test/CIDEr" in fsdp[6]  # evaluated twice, then the test split with the best
    ours = comparable_weights(sharded_weights(runs["fsdp"] / "ckpt_last.dcp", tmp_path))
    theirs = comparable_weights(torch.load(runs["one"] / "ckpt_last.pt", weights_only=True)["model"])
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        # Adam turns rounding-level gradient differences into updates of up to ~lr: an element whose gradient is
        # near zero can move 2-3e-5 apart over 6 steps at lr 3e-3 (still 100x below one Adam step).
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=5e-5, msg=key)


def test_fsdp_resume_is_exact(runs, tmp_path):
    assert metrics(runs["resumed"]) == metrics(runs["fsdp"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = sharded_weights(runs["fsdp"] / "ckpt_last.dcp", tmp_path / "a")
    b = sharded_weights(runs["resumed"] / "ckpt_last.dcp", tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_a_sharded_checkpoint(runs):
    """--evaluate of the best checkpoint (step 3) scores val as the run did at step 3 and test as it did at the end
    (with the best weights), predictions included."""
    run, evaluated = metrics(runs["fsdp"]), metrics(runs["evaluated"])
    assert evaluated.keys() == {3}
    assert evaluated[3] == {k: v for k, v in run[3].items() if k.startswith("val/")} | {
        k: v for k, v in run[6].items() if k.startswith("test/")
    }
    for split, step in [("val", 3), ("test", 6)]:
        ours = json.loads((runs["evaluated"] / "results" / f"{split}_step3.json").read_text())
        assert ours == json.loads((runs["fsdp"] / "results" / f"{split}_step{step}.json").read_text())


def test_sharded_checkpoint_layout_and_pointers(runs):
    run = runs["fsdp"]
    assert os.readlink(run / "ckpt_last.dcp") == "ckpt_step00000006.dcp"
    assert os.readlink(run / "ckpt_best.dcp") == "ckpt_step00000003.dcp"  # CIDEr never rose above the first eval
    assert sorted(p.name for p in run.glob("ckpt_step*")) == ["ckpt_step00000003.dcp", "ckpt_step00000006.dcp"]
    files = sorted(p.name for p in (run / "ckpt_step00000006.dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    state = torch.load(run / "ckpt_last.dcp" / "state.pt", weights_only=True)
    assert state["step"] == 6 and len(state["rng"]) == 2 and "model" not in state


def test_checkpoints_leave_frozen_weights_out_and_hold_their_digest(runs, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    saved = torch.load(runs["one"] / "ckpt_last.pt", weights_only=True)
    assert not set(FROZEN) & set(saved["model"]) and "lm.transformer.wpe.weight" in saved["model"]
    keys = FileSystemReader(runs["fsdp"] / "ckpt_last.dcp").read_metadata().state_dict_metadata
    assert not {f"model.{k}" for k in FROZEN} & set(keys) and "model.lm.transformer.wpe.weight" in keys
    sharded = torch.load(runs["fsdp"] / "ckpt_last.dcp" / "state.pt", weights_only=True)
    assert saved["frozen_sha256"] == sharded["frozen_sha256"] and len(saved["frozen_sha256"]) == 64


def test_resume_with_frozen_parts_is_exact(env, runs):
    out = env["base"] / "one-resumed"
    in_process([*env["flags"], "--batch-size", "8", "--resume", str(runs["one"] / "ckpt_step00000003.pt"),
                "--output-dir", str(out)])  # fmt: skip
    # test/ metrics are left out: the test split is scored with the best checkpoint of the run's own directory, and
    # the original run's (step 3) is not in this one.
    same = lambda m: {s: {k: v for k, v in e.items() if not k.startswith("test/")} for s, e in m.items() if s > 3}  # noqa: E731
    assert same(metrics(out)) == same(metrics(runs["one"]))
    a = torch.load(out / "ckpt_last.pt", weights_only=True)["model"]
    b = torch.load(runs["one"] / "ckpt_last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("kind", ["one", "fsdp"])
def test_other_frozen_weights_are_refused(env, runs, tmp_path, kind):
    """The frozen weights a fresh model gets (from --model.name) differ from those a checkpoint was trained with."""
    if kind == "one":
        path = runs["one"] / "ckpt_last.pt"
        with pytest.raises(
            InputError, match=re.escape(f"{path}: frozen weights from --model.name/--model.vision differ")
        ):
            in_process([*env["flags"], "--evaluate", "--resume", str(path), "--output-dir", str(tmp_path)], 1e-3)
        return
    # A sharded checkpoint is read under torchrun only: its check, on the model train.py builds.
    path = runs["fsdp"] / "ckpt_last.dcp"
    _, cfg = train.parse_config(["dialogue", *env["flags"]])
    task = tasks.DialogueTask(cfg)
    model = build_with_frozen_parts(task, task.build_datasets()["train"], runs["fsdp"] / "tokenizer", shift=1e-3)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert set(FROZEN) <= frozen
    state = train.load_checkpoint(path, "dialogue")
    with pytest.raises(
        InputError, match=r"frozen weights from --model\.name/--model\.vision differ from those it was trained with"
    ):
        train.check_fits(path, state, model, frozen, train.frozen_digest(model, frozen))
    with pytest.raises(InputError, match=r"does not fit this model .* lacks \['lm\.transformer\.wte\.weight'\]"):
        train.check_fits(path, state, model, frozen - {"lm.transformer.wte.weight"}, None)


def test_a_checkpoint_missing_a_trained_weight_is_refused(env, runs, tmp_path):
    saved = torch.load(runs["one"] / "ckpt_last.pt", weights_only=True)
    del saved["model"]["lm.transformer.wpe.weight"]
    torch.save(saved, tmp_path / "broken.pt")
    argv = [*env["flags"], "--evaluate", "--resume", str(tmp_path / "broken.pt"), "--output-dir", str(tmp_path)]
    expected = r"broken\.pt does not fit this model .* lacks \['lm\.transformer\.wpe\.weight'\]"
    with pytest.raises(InputError, match=expected):
        in_process(argv)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--resume", "{fsdp}/ckpt_last.dcp"], "ckpt_last.dcp was written with --fsdp: resume or evaluate it with"),
        (["--fsdp"], "--fsdp shards over the ranks torchrun starts: launch with torchrun"),
    ],
)
def test_fsdp_misuse_is_one_message(env, runs, tmp_path, flags, expected):
    argv = [*env["flags"], *(f.format(fsdp=runs["fsdp"]) for f in flags), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(InputError, match=re.escape(expected)):
        in_process(argv)
    assert not (tmp_path / "run").exists()


def test_fsdp_with_compile_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_config(["dialogue", "--fsdp", "--compile"])
    assert exit_.value.code == 2
    assert "--compile does not combine with --fsdp" in " ".join(capsys.readouterr().err.replace("│", " ").split())


def test_a_kill_mid_save_leaves_the_last_sharded_checkpoint_readable_and_retention_removes_directories(tmp_path):
    cfg = mock.Mock(resume="auto", fsdp=True)

    def save(step: int, best: bool = False) -> None:  # what TrainState.save leaves: the shard files in STEP.dcp.tmp
        shards = tmp_path / f"ckpt_step{step:08d}.dcp.tmp"
        shards.mkdir(exist_ok=True)
        (shards / "__0_0.distcp").write_bytes(b"shard")
        train.save_checkpoint({"task": "dialogue", "step": step}, tmp_path, best, keep_last=2, sharded=True)

    save(1, best=True)

    def killed_mid_write(obj, file):
        file.write(b"half a state")
        raise KeyboardInterrupt

    with mock.patch.object(torch, "save", killed_mid_write), pytest.raises(KeyboardInterrupt):
        save(2)
    assert train.load_checkpoint(train.find_checkpoint(cfg, tmp_path), "dialogue", needs=("step",))["step"] == 1
    for step in (2, 3, 4):
        save(step)
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*")) == [f"ckpt_step0000000{s}.dcp" for s in (1, 3, 4)]
    assert train.load_checkpoint(train.find_checkpoint(cfg, tmp_path), "dialogue", needs=("step",))["step"] == 4
    assert os.readlink(tmp_path / "ckpt_best.dcp") == "ckpt_step00000001.dcp"


# ----------------------------------------------------------------------------------------------------------------
# Generation with a sharded model: ranks run different numbers of forwards


def generate_sharded(rank: int, port: int) -> None:
    """Rank `rank` of 2: the same tiny VisualPrefixLM sharded, then generating 3 (rank 0) or 9 (rank 1) tokens, must
    give what the unsharded model gives; afterwards, training through the sharded model still works."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import models

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    model = models.VisualPrefixLM(lm, models.FeatureInput(8), markers=[38, 39]).eval()
    model.lm.transformer.h[1].attn.requires_grad_(False)
    batch = {
        "features": torch.randn(2, 2, 8),
        "feature_mask": torch.ones(2, 2, dtype=torch.bool),
        "input_ids": torch.randint(1, 40, (2, 5)),
        "token_type_ids": torch.full((2, 5), 38),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "is_visual": torch.tensor([[True, True, False, False, False]] * 2),
        "visual_index": torch.tensor([[0, 1, 0, 0, 0]] * 2),
    }
    length = 3 + 6 * rank
    expected = model.generate(batch, num_beams=2, max_len=length, min_len=length, eos_id=0, pad_id=0)
    train.shard_model(model, bf16=False)
    train.gather_weights(model, True)
    got = model.generate(batch, num_beams=2, max_len=length, min_len=length, eos_id=0, pad_id=0)
    train.gather_weights(model, False)
    assert got == expected and len(got[0]) == length, (got, expected)
    model.train()
    loss, _ = model({**batch, "labels": batch["input_ids"]})
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch.distributed.destroy_process_group()


def test_a_sharded_model_generates_different_lengths_per_rank_like_the_whole_model():
    from conftest import free_port

    context = torch.multiprocessing.start_processes(
        generate_sharded, args=(free_port(),), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.time() + 60
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("generation with a sharded model hung")


if __name__ == "__main__":  # train.py with the frozen parts (what the torchrun runs above execute)
    tasks.DialogueTask.build_model = build_with_frozen_parts
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
