"""Trusting the numbers (issue 4): reproducibility, exact resume, preemption, rank failures, NaN, multi-node.

Every run here is a real `train.py` run on a tiny generated AVSD (12/6/6 dialogs) with a tiny GPT-2, compared against
another real run. Runs shared by several tests (the references) are made once per module. Java is kept off PATH:
metrics then use the Python tokenizer and skip METEOR, which saves seconds per evaluation.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import comparable_weights, step_metrics

import embedded

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--model.n-layer", "1", "--model.n-embd", "32", "--model.n-head", "2", "--num-beams", "1", "--max-len", "5",
    "--data.num-workers", "0", "--log-every", "1", "--lr", "3e-3", "--warmup-steps", "2",
]  # fmt: skip
# No dropout where runs with different rank/micro-batch layouts are compared: their dropout draws differ by design.
EXACT = ["--model.dropout", "0", "--max-steps", "6"]
pytestmark = pytest.mark.slow  # real training runs, many under torchrun (~2-3 min on 2 cores)
WORKERS = ["--data.num-workers", "2"]  # where the data position and worker seeding matter: resume
DROPOUT = ["--model.dropout", "0.1"]  # (the default is 0) where restoring every rank's RNG state matters: resume


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("trust")
    root = base / "avsd"
    with mock.patch.dict(embedded.EMBEDDED_SPLITS, {"train": 12, "val": 6, "test": 6}):
        embedded.make_embedded_avsd(root)
    no_java = base / "bin"  # PATH: only the venv's scripts (python, torchrun)
    no_java.mkdir()
    return {
        "root": root,
        "base": base,
        "env": {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{no_java}",
            "WANDB_MODE": "disabled",
            "XDG_CACHE_HOME": str(base / "cache"),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        },
    }


def train_cmd(env, out: Path, *args, procs: int = 0, restarts: int = 0, launcher_args=(), fault=()) -> list[str]:
    """train.py, or with `fault` (how, step, rank) tests/faulty.py failing that way (see there)."""
    script = ["tests/faulty.py", *map(str, fault)] if fault else ["train.py"]
    launcher = [sys.executable, *script]
    if procs:
        launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={procs}"]
        launcher += [f"--max-restarts={restarts}", *launcher_args, *script]
    return [*launcher, "dialogue", *TINY, "--data.root", str(env["root"]), "--output-dir", str(out), *args]


def run(env, out: Path, *args, procs=0, restarts=0, extra_env=None, check=True, timeout=120, fault=()):
    proc = subprocess.run(
        train_cmd(env, out, *args, procs=procs, restarts=restarts, fault=fault),
        cwd=ROOT,
        env={**env["env"], **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


metrics = step_metrics


def losses(out: Path) -> dict[int, float]:
    return {step: m["train/loss"] for step, m in metrics(out).items() if "train/loss" in m}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "ckpt_last.pt", weights_only=True)["model"]


def max_loss_diff(a: Path, b: Path) -> float:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and len(la) >= 6
    return max(abs(la[s] - lb[s]) for s in la)


@pytest.fixture(scope="module")
def reference(env):
    """Runs several tests compare against, each made once: `one` (1 process, batch 8, with dropout, 20 steps
    crossing an epoch boundary at 15, evaluation at 15 and 20), `b8` (1 process, batch 8, no dropout, 6 steps) and
    `ddp` (2 processes, batch 4 each, no dropout, 6 steps)."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            out = env["base"] / f"ref-{name}"
            if name == "one":
                run(env, out, "--batch-size", "8", "--max-steps", "20", "--save-every", "5", *WORKERS, *DROPOUT)
            elif name == "b8":
                run(env, out, "--batch-size", "8", *EXACT)
            elif name == "ddp":
                run(env, out, "--batch-size", "4", *EXACT, procs=2)
            made[name] = out
        return made[name]

    return get


# ----------------------------------------------------------------------------------------------------------------
# Reproducibility


def test_same_config_reproduces_bitwise_and_config_yaml_reruns_the_run(env, reference):
    first = reference("one")
    again = env["base"] / "again"
    # Only the saved config (plus a new directory): the run must be the same to the last bit.
    run(env, again, "--config", str(first / "config.yaml"))
    assert metrics(again) == metrics(first)
    assert any("val/CIDEr" in m for m in metrics(first).values())
    assert all(torch.equal(a, b) for a, b in zip(weights(first).values(), weights(again).values(), strict=True))


def test_two_ranks_and_grad_accum_match_one_process(env, reference):
    accum = env["base"] / "accum"
    run(env, accum, "--batch-size", "4", "--grad-accum", "2", *EXACT)
    one, ddp = reference("b8"), reference("ddp")
    print(f"max |loss| difference: 2 ranks {max_loss_diff(one, ddp):.2e}, accum {max_loss_diff(one, accum):.2e}")
    assert max_loss_diff(one, ddp) < 1e-5
    assert max_loss_diff(one, accum) < 1e-5
    for other in (ddp, accum):
        ours, theirs = comparable_weights(weights(one)), comparable_weights(weights(other))
        for a, b in zip(ours.values(), theirs.values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_sigkill_then_resume_auto_is_exact_and_continues_the_wandb_run(env, reference):
    """Killed (SIGKILL) after step 12, mid-epoch, 2 steps after its last checkpoint; resumed: same losses, metrics
    and weights as the uninterrupted run, one wandb run, and no secret from the environment anywhere in the run."""
    out = env["base"] / "killed"
    secret = "fake-wandb-key-0123456789abcdef0123456789abcdef"
    wandb_env = {"WANDB_MODE": "offline", "WANDB_API_KEY": secret, "HF_TOKEN": "hf_fake_secret_token_4567"}
    args = ["--batch-size", "8", "--max-steps", "20", "--save-every", "5", *WORKERS, *DROPOUT]
    killed = run(env, out, *args, extra_env=wandb_env, check=False, fault=("kill", 12, 0))
    assert killed.returncode == -signal.SIGKILL
    assert max(losses(out)) == 12 and os.readlink(out / "ckpt_last.pt") == "ckpt_step00000010.pt"
    resumed = run(env, out, *args, "--resume", "auto", extra_env=wandb_env)
    assert "resumed at step 10" in resumed.stdout

    assert metrics(out) == metrics(reference("one"))
    final, uninterrupted = weights(out), weights(reference("one"))
    assert all(torch.equal(a, b) for a, b in zip(final.values(), uninterrupted.values(), strict=True))
    wandb_runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1
    leaked = subprocess.run(["grep", "-rlaE", f"{secret}|hf_fake_secret", str(out)], capture_output=True, text=True)
    assert leaked.stdout == "", f"secret written to {leaked.stdout}"
    assert secret not in killed.stdout + killed.stderr + resumed.stdout + resumed.stderr


def test_torchrun_max_restarts_resumes_after_a_rank_raises(env, reference):
    out = env["base"] / "restarted"
    proc = run(
        env,
        out,
        "--batch-size", "4", *EXACT, "--save-every", "2", "--resume", "auto",
        procs=2,
        restarts=1,
        fault=("raise", 3, 1),
    )  # fmt: skip
    assert "injected fault: rank 1 fails after step 3" in proc.stdout + proc.stderr
    assert "resumed at step 2" in proc.stdout
    assert metrics(out) == metrics(reference("ddp"))


def test_two_node_launch_matches_single_node(env, reference):
    out = env["base"] / "two-nodes"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    nodes = [
        subprocess.Popen(
            [
                *(torchrun, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={r}"),
                *("--master-addr=127.0.0.1", f"--master-port={port}"),
                *train_cmd(env, out, "--batch-size", "4", *EXACT)[1:],  # train.py and its flags
            ],
            cwd=ROOT,
            env=env["env"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [n.communicate(timeout=120)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs
    assert metrics(out) == metrics(reference("ddp"))


# ----------------------------------------------------------------------------------------------------------------
# Faults under torchrun: signals to one rank, a rank killed


def start_torchrun(env, out: Path, launcher_args=()) -> subprocess.Popen:
    return subprocess.Popen(
        train_cmd(env, out, "--batch-size", "4", "--max-steps", "100000", procs=2, launcher_args=launcher_args),
        cwd=ROOT,
        env=env["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def worker_pid(launcher: subprocess.Popen, rank: int, out: Path, after_step: int) -> int:
    """The pid of torchrun's worker `rank`, once rank 0 has logged `after_step`."""
    deadline = time.time() + 90
    while time.time() < deadline and launcher.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(losses(out)) >= after_step:
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                    environ = (stat.parent / "environ").read_bytes().split(b"\0")
                except (OSError, IndexError):
                    continue
                if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
                    return int(stat.parent.name)
        time.sleep(0.1)
    launcher.kill()
    raise AssertionError(f"training did not start: {launcher.communicate()[0][-3000:]}")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint_and_exit_0(env):
    out = env["base"] / "preempted-one-rank"
    launcher = start_torchrun(env, out)
    os.kill(worker_pid(launcher, 1, out, after_step=3), signal.SIGTERM)
    output = launcher.communicate(timeout=60)[0]
    assert launcher.returncode == 0, output[-3000:]  # torchrun: every worker exited 0
    stopped_at = max(losses(out))
    assert f"stopped by a signal to another rank after step {stopped_at}" in output
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] == stopped_at


def test_sigusr1_to_torchrun_as_slurm_sends_it_reaches_every_rank(env):
    """SLURM's `--signal=USR1@T` goes to torchrun; with --signals-to-handle it passes it to the workers, which save
    and exit 0 (torchrun itself then exits by the signal, as it does for any signal it handles)."""
    out = env["base"] / "preempted-launcher"
    launcher = start_torchrun(env, out, ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"])
    workers = [worker_pid(launcher, rank, out, after_step=3) for rank in (0, 1)]
    launcher.send_signal(signal.SIGUSR1)
    output = launcher.communicate(timeout=60)[0]
    stopped_at = max(losses(out))
    assert f"stopped by SIGUSR1 after step {stopped_at}" in output, output[-3000:]
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] == stopped_at
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_a_killed_rank_fails_the_whole_job_quickly(env):
    out = env["base"] / "rank-killed"
    launcher = start_torchrun(env, out)
    os.kill(worker_pid(launcher, 1, out, after_step=2), signal.SIGKILL)
    start = time.time()
    output = launcher.communicate(timeout=90)[0]
    elapsed = time.time() - start
    print(f"job exited {launcher.returncode} {elapsed:.1f} s after rank 1 was killed")
    assert launcher.returncode != 0, output[-3000:]
    assert elapsed < 45


# ----------------------------------------------------------------------------------------------------------------
# Non-finite loss: a feature file full of NaN in the training split


@pytest.fixture(scope="module")
def nan_root(env):
    import shutil

    import numpy as np

    root = env["base"] / "avsd-nan"
    shutil.copytree(env["root"], root)
    path = root / "features" / "i3d_rgb" / "train0003.npy"
    np.save(path, np.full_like(np.load(path), np.nan))
    return root


def test_nan_loss_stops_the_run_naming_the_step_and_saves_nothing_after(env, nan_root):
    out = env["base"] / "nan-stop"
    proc = run(env, out, "--data.root", str(nan_root), "--batch-size", "8", "--max-steps", "15", "--save-every", "1",
               check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    step = int(proc.stderr.split("non-finite loss at step ")[1].split(":")[0])
    saved = sorted(out.glob("ckpt_step*.pt"))
    assert all(int(p.stem[len("ckpt_step") :]) < step for p in saved)
    for path in saved:
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
        assert ckpt["best"] is None or ckpt["best"] == ckpt["best"]  # never NaN


def test_nan_policy_skip_skips_those_updates_and_finishes(env, nan_root):
    out = env["base"] / "nan-skip"
    proc = run(env, out, "--data.root", str(nan_root), "--batch-size", "8", "--max-steps", "15", "--nan-policy", "skip")
    assert "non-finite loss, update skipped" in proc.stdout
    assert all(torch.isfinite(t).all() for t in weights(out).values())
    logged = losses(out)  # steps whose update was skipped log no loss
    assert 0 < len(logged) < 15 and all(torch.isfinite(torch.tensor(v)) for v in logged.values())
