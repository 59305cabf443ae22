"""Benchmarks (not part of the test suite): is the training loop as fast as a bare loop and HF Trainer, does the data
path keep up, does evaluation scale over ranks, how fast does it start, how does cost grow with the dataset.

    pip install -r requirements.txt -r requirements-bench.txt
    python bench.py                    # everything (12-25 min on 2 CPU cores); --only startup loop loop-llama
                                       # data eval pixels gpu
    bash bench_gpu.sh                  # the gpu section alone, Python and packages set up (see the script)

Every comparison runs in ONE process (or one machine, for subprocesses) with the same thread settings
(`--threads`, also exported as OMP_NUM_THREADS to subprocesses), the same model and the same batches. Timings are
interleaved (train.py's loop and the bare loop take turns every `--window` steps, on the same batches) and reported
as medians of paired ratios, so a machine shared with other work moves both sides alike.

Sections:
  loop     train.py's real loop (train.main, driven in-process) vs a bare loop vs HF Trainer, at real AVSD
           feature sizes; loss after N steps
  loop-llama  the same with a Llama-family model of about the same cost per step (random init, saved with
           save_pretrained, loaded with --model.name)
  data     DataLoader batches/s vs training steps/s at real feature sizes (in turns, in one process); peak RSS
           of that process and its workers at 1x and 10x the dataset;
           time per epoch and peak RSS of a real train.py run at 1x, 4x, 16x
  eval     beam-search evaluation samples/s with 1 and 2 ranks (torchrun, generation-bound)
  startup  `train.py --help`, `train.py dialogue --help` wall time; launch-to-first-step
  pixels   raw 640x480 JPEGs through a CLIP ViT tower (--model.vision): loader vs training images/s at 224 px;
           train.py with a frozen tower vs a bare loop; the cache command vs a bare model(pixel_values) loop;
           peak RSS of the cache command at 1x and 10x the images
  gpu      (skipped without a GPU) GPT-2 124M dialogue training on one GPU in bf16, eager and --compile: tokens/s,
           MFU, peak memory; a bare loop on batches already on the GPU beside it (< 5 min on an H100/H200)
"""

import argparse
import contextlib
import copy
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TRAIN = [sys.executable, str(HERE / "train.py")]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def children_cpu() -> float:
    """CPU seconds used so far by this process's live children (DataLoader workers): /proc/PID/stat utime+stime."""
    me, tick, total = str(os.getpid()), os.sysconf("SC_CLK_TCK"), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if fields[1] == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Interleaver:
    """Times a contender (train.py's loop, HF Trainer) and the bare loop in turns, on the same windows of batches.

    `turn(step)` is called by the contender at the end of every window: it closes the contender's window (wall
    time; CPU time of this process plus its loader workers' CPU since the last turn, which also covers the batches
    they prefetched while the bare loop ran), builds the same batches (off the clock) and runs the bare loop on
    them (wall and CPU time). The first window is warm-up for both."""

    def __init__(self, bare: "BareLoop", batches: Iterator[dict]):
        self.bare, self.batches = bare, batches
        self.pairs = []  # (contender wall, bare wall, contender cpu, bare cpu, contender cpu in this process)
        self.done, self.exit, self.enter_kids = 0, None, None

    def turn(self, step: int) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        kids = children_cpu()
        batches = [next(self.batches) for _ in range(step - self.done)]
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        self.bare.run(batches)
        bare_wall, bare_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        if self.exit is not None:
            ours_wall = wall - self.exit[0]
            ours_cpu = cpu - self.exit[1] + kids - self.enter_kids
            self.pairs.append((ours_wall, bare_wall, ours_cpu, bare_cpu, cpu - self.exit[1]))
        self.done, self.enter_kids = step, kids
        self.exit = (time.perf_counter(), time.process_time())

    def summary(self, window: int, name: str) -> dict:
        wall, bare_wall, cpu, bare_cpu, main_cpu = zip(*self.pairs, strict=True)
        ratios = [b / o for o, b in zip(wall, bare_wall, strict=True)]
        return {
            f"{name}_steps_per_s": window / median(wall),
            f"bare_{name}_steps_per_s": window / median(bare_wall),
            f"{name}_vs_bare": median(ratios),
            f"{name}_vs_bare_quartiles": statistics.quantiles(ratios, n=4)[::2],
            f"{name}_vs_bare_cpu": median([b / o for o, b in zip(cpu, bare_cpu, strict=True)]),
            f"{name}_vs_bare_main_cpu": median([b / o for o, b in zip(main_cpu, bare_cpu, strict=True)]),
            f"{name}_windows": len(wall),
            f"{name}_pairs_wall_s": [[round(o, 5), round(b, 5)] for o, b in zip(wall, bare_wall, strict=True)],
        }


# ----------------------------------------------------------------------------------------------------------------
# A bare loop: the same forward/backward/clip/AdamW/schedule step, on batches built before the clock starts


class BareLoop:
    """What a user would write by hand: no loader, no logging, no bookkeeping."""

    def __init__(self, model, cfg, total_steps: int, fused: bool = False, autocast=None):
        import torch

        import train

        self.torch, self.model, self.cfg = torch, model, cfg
        self.autocast = autocast or contextlib.nullcontext()  # train.py's bf16 autocast on a GPU
        self.optimizer = train.build_optimizer(model, cfg, fused=fused)
        factor = partial(train.lr_factor, cfg=cfg, total_steps=total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        model.train()

    def run(self, batches) -> None:
        for batch in batches:
            with self.autocast:
                loss_sum, count = self.model(batch)
            (loss_sum / count).backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)


def build_side(argv: list[str], workdir: Path):
    """The task, datasets and an initial model exactly as train.main builds them for `argv` (same seed)."""
    import torch

    import train
    from tasks import TASKS

    name, cfg = train.parse_config(argv)
    task = TASKS[name][0](cfg)
    datasets = task.build_datasets()
    torch.manual_seed(cfg.seed)
    model = task.build_model(datasets["train"], workdir / "tokenizer")
    return task, datasets, model, cfg


def training_batches(task, dataset, cfg) -> Iterator[dict]:
    """The batches train.py's loader yields, in its order (ResumableSampler, epoch by epoch), built in this process
    (one window at a time: at real feature sizes a whole run's batches would not fit in memory)."""
    import torch

    from data import ResumableSampler

    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, cfg.batch_size, sampler=sampler, collate_fn=partial(task.collate, train=True), drop_last=True
    )
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def heldout_loss(model, task, dataset) -> float:
    """Token-mean loss on the val split (collated as training batches): compares models after the same steps."""
    import torch

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(dataset), 32):
            batch = task.collate([dataset[j] for j in range(i, min(i + 32, len(dataset)))], train=True)
            loss_sum, n = model(batch)
            total, count = total + loss_sum.item(), count + n.item()
    model.train()
    return total / count


# ----------------------------------------------------------------------------------------------------------------
# 1 + 2: train.py's loop vs a bare loop vs HF Trainer


def interleaved_train_main(argv: list[str], work: Path, steps: int):
    """train.main(argv) for real, and at every train log event the bare loop on the same window of batches."""
    import train

    side = build_side(argv, work)
    task, datasets, model0, cfg = side
    bare = BareLoop(copy.deepcopy(model0), cfg, steps)
    ours = Interleaver(bare, training_batches(task, datasets["train"], cfg))

    class InterleavingLogger(train.Logger):
        def log(self, step, metrics):
            super().log(step, metrics)  # writing the log is part of the loop's cost: in this window
            if "train/loss" in metrics:
                ours.turn(step)

    real_logger, train.Logger = train.Logger, InterleavingLogger
    try:
        train_main(argv)
    finally:
        train.Logger = real_logger
    return ours, bare, side


def bench_loop(args, work: Path, lm: str = "gpt2") -> dict:
    """`lm`: gpt2, the small GPT-2 train.py builds by default; llama, a Llama-family model of about the same cost
    per step loaded with --model.name (see save_llama)."""
    steps, window = args.steps, args.window
    out = work / f"ours-{lm}"
    argv = (
        ["dialogue"] if args.loop_data == "embedded" else ["dialogue", "--data.root", str(real_size_root(args, work))]
    )
    argv += ["--max-steps", str(steps), "--log-every", str(window), "--eval-every", str(steps)]
    argv += ["--output-dir", str(out), "--overwrite", "--num-beams", "1", "--no-report-metric"]
    argv += ["--model.dropout", str(args.dropout), "--wandb.mode", "disabled", "--data.cache-dir", str(work / "cache")]
    if lm == "llama":
        argv += ["--model.name", str(save_llama(argv, work / "llama"))]
    argv += shlex.split(args.train_flags)
    ours, bare, (task, datasets, model0, cfg) = interleaved_train_main(argv, work / f"side-{lm}", steps)
    ours_model = load_trained(copy.deepcopy(model0), out / "ckpt_last.pt")

    # HF Trainer, interleaved the same way with a fresh bare loop.
    hf_model, hf = hf_trainer_run(args, cfg, task, datasets, copy.deepcopy(model0), work)

    loop = {
        "lm": lm,
        "parameters": sum(p.numel() for p in model0.parameters()),
        "steps": steps,
        "window": window,
        "threads": args.threads,
        **ours.summary(window, "ours"),
        **hf.summary(window, "hf"),
        "loss_ours": heldout_loss(ours_model, task, datasets["val"]),
        "loss_bare": heldout_loss(bare.model, task, datasets["val"]),
        "loss_hf": heldout_loss(hf_model, task, datasets["val"]),
        "loss_bare_hf": heldout_loss(hf.bare.model, task, datasets["val"]),
    }
    loop["ours_vs_hf"] = loop["ours_vs_bare"] / loop["hf_vs_bare"]
    loop["ours_vs_hf_cpu"] = loop["ours_vs_bare_cpu"] / loop["hf_vs_bare_cpu"]
    return loop


def train_main(argv: list[str]) -> None:
    """train.main in this process, its stop-signal handlers (SIGTERM, SIGUSR1: finish the step, save, exit) put back
    afterwards: the bench itself must still stop on SIGTERM."""
    import train

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        train.main(argv)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def load_trained(model, path: Path):
    """`model` with the weights saved at `path` by train.py: lean checkpoints leave out the frozen weights (train.py
    checks their digest instead), so those, and only those, may be missing."""
    import torch

    missing, unexpected = model.load_state_dict(torch.load(path, weights_only=True)["model"], strict=False)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise RuntimeError(f"{path} does not fit: missing {sorted(set(missing) - frozen)}, unexpected {unexpected}")
    return model


def save_llama(argv: list[str], directory: Path) -> Path:
    """A Llama-family model (random init) at about the default GPT-2's cost per step on CPU: 2 layers, width 160 (at
    128 a step measured 35% cheaper, side by side), 2 query heads sharing 1 key/value head, SwiGLU MLP 320 wide, 512
    positions, saved with save_pretrained beside a tokenizer trained on the run's training text with the default's
    vocabulary size, so that its sequences are as long as GPT-2's (plus Llama's <s>). tests/helpers builds it."""
    import train
    from tasks import TASKS

    sys.path.insert(0, str(HERE / "tests"))
    from helpers import save_lm_family

    name, cfg = train.parse_config(argv)
    task = TASKS[name][0](cfg)
    texts = task.training_texts(task.build_datasets()["train"])
    return save_lm_family("llama", directory, width=160, positions=512, texts=texts, vocab_size=cfg.model.vocab_size)


def hf_trainer_run(args, cfg, task, datasets, model, work: Path):
    """The same model, data order (our sampler), optimizer, schedule and clipping through transformers.Trainer."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import train
    from data import ResumableSampler

    steps, window = args.steps, args.window

    class LossModel(torch.nn.Module):
        """Trainer wants `model(**batch)["loss"]` (a mean); ours returns (summed loss, count)."""

        accepts_loss_kwargs = False  # so Trainer passes no num_items_in_batch and scales the loss as usual

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **batch):  # whatever the task's collate makes
            loss_sum, count = self.inner(batch)
            return {"loss": loss_sum / count}

    class OurSampler(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return ResumableSampler(self.train_dataset, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)

    wrapped = LossModel(model)
    optimizer = train.build_optimizer(model, cfg, fused=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(train.lr_factor, cfg=cfg, total_steps=steps))
    hf = Interleaver(BareLoop(copy.deepcopy(model), cfg, steps), training_batches(task, datasets["train"], cfg))

    class Interleave(TrainerCallback):
        def on_step_end(self, targs, tstate, control, **kwargs):
            if tstate.global_step % window == 0:
                hf.turn(tstate.global_step)

    targs = TrainingArguments(
        output_dir=str(work / "hf"),
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=window,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=cfg.data.num_workers,
        dataloader_persistent_workers=cfg.data.num_workers > 0,
        dataloader_drop_last=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        seed=cfg.seed,
        use_cpu=True,
    )
    trainer = OurSampler(
        model=wrapped,
        args=targs,
        train_dataset=datasets["train"],
        data_collator=partial(task.collate, train=True),
        optimizers=(optimizer, scheduler),
        callbacks=[Interleave()],
    )
    trainer.train()
    return model, hf


# ----------------------------------------------------------------------------------------------------------------
# A bigger AVSD-format dataset at real feature sizes (synthetic text, random features), for data/eval/scaling


WORDS = [
    "the",
    "a",
    "person",
    "man",
    "woman",
    "room",
    "kitchen",
    "table",
    "cup",
    "book",
    "door",
    "walks",
    "picks",
    "up",
    "puts",
    "down",
    "looks",
    "at",
    "holds",
    "opens",
]


def sentence(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n)) + "."


def make_features(features: Path, n_videos: int, frames: int, seed: int = 0) -> None:
    from data import AVSD_STREAMS

    rng = np.random.default_rng(seed)
    for stream in AVSD_STREAMS:
        (features / stream).mkdir(parents=True, exist_ok=True)
    for i in range(n_videos):
        length = int(rng.integers(frames // 2, frames + 1))
        for stream, width in AVSD_STREAMS.items():
            n = length + (4 if stream == "vggish" else 0)  # vggish runs at a higher rate; aligned when read
            np.save(features / stream / f"v{i:05d}.npy", rng.standard_normal((n, width), dtype=np.float32))


def make_root(root: Path, features: Path, train_videos: int, val_videos: int, seed: int = 0) -> Path:
    """ROOT/annotations/{train,val}.json (10-turn dialogs) over the first videos of a shared feature directory."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    if not (root / "features").exists():
        (root / "features").symlink_to(features)

    def dialogs(ids):
        return {
            "dialogs": [
                {
                    "image_id": f"v{i:05d}",
                    "caption": sentence(rng, 8),
                    "summary": sentence(rng, 12),
                    "dialog": [{"question": sentence(rng, 7), "answer": sentence(rng, 6)} for _ in range(10)],
                }
                for i in ids
            ]
        }

    (root / "annotations" / "train.json").write_text(json.dumps(dialogs(range(train_videos))))
    (root / "annotations" / "val.json").write_text(json.dumps(dialogs(range(val_videos))))
    return root


def feature_dir(args, work: Path) -> Path:
    """Features at real AVSD sizes for 16x the 1x dataset's videos, generated once per bench run."""
    features = work / "features"
    if not features.is_dir():
        make_features(features, max(16 * args.videos, 80), args.frames)  # the loop's 64 + 16 at least
    return features


def real_size_root(args, work: Path) -> Path:
    """The loop's dataset at real AVSD sizes: 64 training videos (640 samples, 40 steps an epoch), 16 for val."""
    return make_root(work / "avsd-loop", feature_dir(args, work), 64, 16)


def child_rss(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """Run `cmd` under a fresh Python parent that reports the peak RSS (MiB) of the largest process in its tree."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr[-3000:]) if r.returncode else None\n"
        "print(r.stdout); print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
        " time.perf_counter() - t, r.returncode)\n"
    )
    result = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True)
    last = [line for line in result.stdout.splitlines() if line.startswith("RSS ")]
    if not last:
        raise RuntimeError(f"{cmd} failed:\n{result.stderr[-3000:]}")
    _, rss, wall, code = last[-1].split()
    if int(code) != 0:
        raise RuntimeError(f"{cmd} exited {code}:\n{result.stderr[-3000:]}")
    return result.stdout, float(rss), float(wall)


def loader_child(root: str, rounds: int = 3, chunk: int = 20, steps: int = 2) -> None:
    """(subprocess) The DataLoader train.py builds over `root`: batches/s it delivers vs training steps/s (bare
    loop) on its batches, measured in turns so that both see the same machine load; prints JSON."""
    import train

    task, datasets, model, cfg = build_side(["dialogue", "--data.root", root], Path(tempfile.mkdtemp()))
    dataset = datasets["train"]
    loader = train.build_loader(task, dataset, cfg, rank=0, world=1, train=True, pin_memory=False)

    def endless(loader):  # epoch after epoch, as training reads it
        for epoch in range(10**6):
            loader.sampler.set_epoch(epoch)
            yield from loader

    it = endless(loader)
    bare = BareLoop(model, cfg, rounds * steps + 1)
    bare.run([next(it)])  # warm-up
    prefetched = max(1, cfg.data.num_workers) * 2  # batches the workers got ahead while training ran
    deliver, consume = [], []
    for _ in range(rounds):
        for _ in range(prefetched):
            next(it)
        start = time.perf_counter()
        for _ in range(chunk):
            next(it)
        deliver.append(chunk / (time.perf_counter() - start))
        batches = [next(it) for _ in range(steps)]
        start = time.perf_counter()
        bare.run(batches)
        consume.append(steps / (time.perf_counter() - start))
    del it, loader
    ratio = median([d / c for d, c in zip(deliver, consume, strict=True)])
    print(json.dumps({"batches_per_s": median(deliver), "steps_per_s": median(consume), "ratio": ratio}))


def bench_data(args, work: Path, env: dict) -> dict:
    base = args.videos
    features = feature_dir(args, work)
    roots = {k: make_root(work / f"avsd-{k}x", features, k * base, 4) for k in (1, 4, 10, 16)}
    result = {"frames_max": args.frames, "videos_1x": base}

    for k in (1, 10):
        out, rss, _ = child_rss([sys.executable, __file__, "--loader-child", str(roots[k])], env)
        measured = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        result[f"loader_{k}x_batches_per_s"] = measured["batches_per_s"]
        result[f"train_{k}x_steps_per_s"] = measured["steps_per_s"]
        result[f"loader_vs_train_{k}x"] = measured["ratio"]
        result[f"loader_{k}x_peak_rss_mib"] = rss

    for k in (1, 4, 16):
        run_dir = work / f"epoch-{k}x"
        cmd = [*TRAIN, "dialogue", "--data.root", str(roots[k]), "--max-epochs", "1", "--output-dir", str(run_dir)]
        cmd += ["--overwrite", "--num-beams", "1", "--no-report-metric", "--log-every", "5", "--wandb.mode", "disabled"]
        _, rss, wall = child_rss(cmd, env)
        result[f"epoch_{k}x_s"] = train_seconds(run_dir)
        result[f"epoch_{k}x_steps"] = 10 * k * base // 16
        result[f"epoch_{k}x_peak_rss_mib"] = rss
        result[f"epoch_{k}x_wall_s"] = wall
    # Linear cost: the time per extra step from 4x to 16x (fixed costs cancel) vs the 16x average.
    extra_steps = result["epoch_16x_steps"] - result["epoch_4x_steps"]
    result["marginal_s_per_step"] = (result["epoch_16x_s"] - result["epoch_4x_s"]) / extra_steps
    return result


def train_seconds(run_dir: Path) -> float:
    """Training time (eval excluded) from metrics.jsonl: every window's samples / samples_per_s."""
    import yaml

    batch_size = yaml.safe_load((run_dir / "config.yaml").read_text())["batch_size"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    total, last_step = 0.0, 0
    for row in rows:
        if "train/samples_per_s" in row:
            total += (row["step"] - last_step) * batch_size / row["train/samples_per_s"]
            last_step = row["step"]
    return total


# ----------------------------------------------------------------------------------------------------------------
# 4: evaluation, 1 rank vs 2 ranks


def bench_eval(args, work: Path, env: dict) -> dict:
    root = make_root(work / "avsd-eval", feature_dir(args, work), 2, args.eval_samples)
    run = work / "eval-run"
    common = ["--data.root", str(root), "--wandb.mode", "disabled", "--eval-batch-size", str(args.eval_batch)]
    # A checkpoint to evaluate, made by train.py itself (one step; its own eval is greedy and unscored).
    cmd = [*TRAIN, "dialogue", *common, "--max-steps", "1", "--output-dir", str(run), "--overwrite"]
    subprocess.run([*cmd, "--num-beams", "1", "--no-report-metric"], env=env, check=True, capture_output=True)
    result = {"eval_samples": args.eval_samples, "num_beams": args.beams, "eval_batch": args.eval_batch}
    evaluate = ["dialogue", *common, "--evaluate", "--resume", str(run / "ckpt_last.pt"), "--no-report-metric"]
    evaluate += ["--num-beams", str(args.beams), "--min-len", "20", "--max-len", "20"]
    rates = {1: [], 2: []}
    for _ in range(args.repeats):
        for ranks in (1, 2):
            out = work / f"eval-{ranks}"
            launcher = [*TRAIN] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run"]
            if ranks > 1:
                launcher += ["--nproc-per-node", str(ranks), "--master-port", str(29500 + os.getpid() % 1000)]
                launcher += [str(HERE / "train.py")]
            (out / "metrics.jsonl").unlink(missing_ok=True)
            cmd = [*launcher, *evaluate, "--output-dir", str(out)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            rates[ranks].append(next(row["val/samples_per_s"] for row in rows if "val/samples_per_s" in row))
    result["rank1_samples_per_s"] = median(rates[1])
    result["rank2_samples_per_s"] = median(rates[2])
    result["rank2_vs_rank1"] = median([b / a for a, b in zip(rates[1], rates[2], strict=True)])
    return result


# ----------------------------------------------------------------------------------------------------------------
# 5: start-up


def bench_startup(args, work: Path, env: dict) -> dict:
    # In turns with `import torch` alone, the floor of any start-up that imports it.
    commands = {
        "import_torch": [sys.executable, "-c", "import torch"],
        "help": [*TRAIN, "--help"],
        "task_help": [*TRAIN, "dialogue", "--help"],
    }
    walls = {label: [] for label in commands}
    for _ in range(args.repeats + 2):
        for label, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            walls[label].append(time.perf_counter() - start)
    result = {f"{label}_s": median(times) for label, times in walls.items()}
    import data

    data.embedded_root(work / "cache", data.EMBEDDED_VERSION, data.make_embedded_avsd)  # not part of start-up
    firsts = []
    for i in range(args.repeats):
        out = work / f"first-step-{i}"
        metrics = out / "metrics.jsonl"
        cmd = [*TRAIN, "dialogue", "--max-steps", "2", "--log-every", "1", "--output-dir", str(out), "--overwrite"]
        cmd += ["--num-beams", "1", "--no-report-metric", "--wandb.mode", "disabled"]
        cmd += ["--data.cache-dir", str(work / "cache")]
        start = time.perf_counter()
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, **quiet)
        while not (metrics.is_file() and metrics.stat().st_size > 0):
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited {proc.returncode} before its first step")
            time.sleep(0.005)
        firsts.append(time.perf_counter() - start)
        os.killpg(proc.pid, signal.SIGKILL)  # train.py and its loader workers: nothing left running
        proc.wait()
    result["first_step_s"] = median(firsts)
    return result


# ----------------------------------------------------------------------------------------------------------------
# 6: pixels in: raw images through a vision tower


def make_images(root: Path, n_images: int, seed: int = 0) -> Path:
    """COCO-like: 640x480 JPEGs (shapes on a gradient, plus noise, so they decode at a real JPEG's cost) under
    ROOT/images/train2014/, a Karpathy-layout train split (one caption each) and 8 val images."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (root / "images" / "train2014").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    base = np.linspace(0, 255, 640 * 480 * 3).reshape(480, 640, 3)
    entries = []
    for i in range(n_images):
        pixels = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(np.roll(pixels, i * 17, axis=1))
        for _ in range(5):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            ImageDraw.Draw(image).ellipse((x, y, x + 80, y + 80), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        name = f"train2014/COCO_train2014_{i:012d}.jpg"
        image.save(root / "images" / name, "JPEG", quality=90)
        entries.append({"image": name, "image_id": f"{i:06d}", "caption": sentence(rng, 9)})
    (root / "annotations" / "train.json").write_text(json.dumps(entries))
    val = [{**e, "caption": [e["caption"]]} for e in entries[:8]]
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    return root


def make_tower(path: Path, size: str) -> Path:
    """A ViT-S/16 or ViT-B/16 CLIP vision tower at 224 px (random init) and CLIP's image processor, saved."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models import clip

    width, heads = {"s16": (384, 6), "b16": (768, 12)}[size]
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, patch_size=16)
    CLIPVisionModel(config).save_pretrained(path)
    (
        clip.CLIPImageProcessorPil if hasattr(clip, "CLIPImageProcessorPil") else clip.CLIPImageProcessor
    )().save_pretrained(path)
    return path


def bench_pixels(args, work: Path, env: dict) -> dict:
    """Four ratios, side by side in one run: (1) the loader's images/s (decode and training transform in the
    default workers) over the images/s training consumes, at 224 px, in turns; (2) train.py with a frozen tower
    (on-the-fly encoding) vs a bare loop running the same model on the same batches (interleaved, as `loop`); (3)
    the cache command (in process: dataset check, tower load, workers, writing files included) vs a bare
    `model(pixel_values)` loop over the same images, decoded beforehand; (4) peak RSS of the cache command (a
    subprocess) at 1x and 10x the images."""
    import torch

    import train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tower = make_tower(work / "tower", args.tower or ("b16" if device == "cuda" else "s16"))
    root = make_images(work / "pixels-1x", args.images)
    result = {"tower": args.tower or ("b16" if device == "cuda" else "s16"), "images_1x": args.images}
    argv = ["captioning", "--data.root", str(root), "--model.vision", str(tower), "--wandb.mode", "disabled"]
    argv += ["--num-beams", "1", "--max-len", "5", "--no-report-metric", "--batch-size", str(args.pixel_batch)]
    argv += ["--eval-batch-size", str(args.pixel_batch), "--model.dropout", "0"]

    # (1) loader vs training, in turns
    task, datasets, model, cfg = build_side(argv, work / "side")
    loader = train.build_loader(task, datasets["train"], cfg, 0, 1, train=True, pin_memory=device == "cuda")
    batches = iter(itertools.chain.from_iterable(itertools.repeat(loader)))
    bare = BareLoop(model.to(device), cfg, 100)
    move = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    bare.run([move(next(batches))])  # warm-up
    deliver, consume = [], []
    for _ in range(args.repeats):
        for _ in range(2 * max(1, cfg.data.num_workers)):  # what the workers prefetched while training ran
            next(batches)
        start = time.perf_counter()
        for _ in range(4):
            next(batches)
        deliver.append(4 * cfg.batch_size / (time.perf_counter() - start))
        ready = [move(next(batches)) for _ in range(2)]
        start = time.perf_counter()
        bare.run(ready)
        consume.append(2 * cfg.batch_size / (time.perf_counter() - start))
    del batches, loader
    result |= {"loader_images_per_s": median(deliver), "train_images_per_s": median(consume)}
    result["loader_vs_train"] = median([d / c for d, c in zip(deliver, consume, strict=True)])

    # (2) on-the-fly frozen encoding: train.py vs a bare loop, interleaved
    steps = args.pixel_steps
    loop_argv = [*argv, "--max-steps", str(steps), "--log-every", "1", "--eval-every", str(steps)]
    ours, _, _ = interleaved_train_main([*loop_argv, "--output-dir", str(work / "pixels-run")], work, steps)
    result |= {k: v for k, v in ours.summary(1, "fly").items() if not k.endswith("_pairs_wall_s")}

    # (3) the cache command vs a bare model(pixel_values) loop over the same images
    from models import VisionTower
    from tasks import TASKS

    _, cfg = train.parse_config([*argv, "--data.no-augment"])
    dataset = TASKS["captioning"][0](cfg).build_datasets()["train"]
    pixels = [torch.stack([dataset[i]["pixels"][0] for i in range(k, min(k + cfg.eval_batch_size, len(dataset)))])
              for k in range(0, len(dataset), cfg.eval_batch_size)]  # fmt: skip
    vision = VisionTower(cfg.model).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    vision.tower(pixel_values=pixels[0].to(device))  # warm-up
    for name in ("cache", "bare"):  # in turns, each twice
        result[f"{name}_s"] = []
    for k in range(2):
        start = time.perf_counter()
        train.main([*argv, "--cache-features", f"bench{k}"])
        result["cache_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            for batch in pixels:
                vision.tower(pixel_values=batch.to(device)).last_hidden_state.float().cpu()
        sync()
        result["bare_s"].append(time.perf_counter() - start)
    result["cache_vs_bare"] = min(result["bare_s"]) / min(result["cache_s"])
    result["cache_images_per_s"] = args.images / min(result["cache_s"])

    # (4) peak RSS of the cache command at 1x and 10x the images (the small tower: memory, not speed)
    for k in (1, 10):
        big = root if k == 1 else make_images(work / f"pixels-{k}x", k * args.images)
        cmd = [*TRAIN, "captioning", "--data.root", str(big), "--model.vision", "small", "--model.vision-size", "224"]
        _, rss, wall = child_rss([*cmd, "--cache-features", "rss", "--wandb.mode", "disabled"], env)
        result[f"cache_{k}x_peak_rss_mib"], result[f"cache_{k}x_s"] = rss, wall
    return result


# ----------------------------------------------------------------------------------------------------------------
# 7: one GPU: GPT-2 124M dialogue training, tokens/s and MFU in bf16, eager and --compile


def bench_gpu(args, work: Path) -> dict:
    """train.py (bf16 autocast, fused AdamW, pinned memory) training GPT-2 124M on AVSD-format data at real feature
    sizes, once eager and once with --compile: tokens/s and MFU as train.py logs them (medians of the windows after
    the first --gpu-warmup steps, which hold the compilation), peak GPU memory; then a bare loop on batches already
    on the GPU (the same step without the loader: what the model alone reaches), at the run's batch size and 4x."""
    import torch

    import train

    # 3200 training samples: 200 steps an epoch, so that the loader's restart at each epoch weighs little (a real
    # AVSD epoch is ~4800 steps); features generated as the loop's (150-300 frames cut to 200, 4224 floats a frame).
    features = work / "features-gpu"
    make_features(features, 324, args.frames)
    root = make_root(work / "avsd-gpu", features, 320, 4)
    lm_dir = work / "gpt2-124m"
    common = ["dialogue", "--data.root", str(root), "--data.num-workers", str(args.gpu_workers), "--no-report-metric"]
    common += ["--wandb.mode", "disabled", "--num-beams", "1", "--max-len", "5", *shlex.split(args.gpu_flags)]
    save_gpt2_124m(common, lm_dir)
    common += ["--model.name", str(lm_dir)]
    task, datasets, model, cfg = build_side(common, work / "gpu-side")
    # build_causal_lm only grows the embeddings for added tokens: the small tokenizer leaves GPT-2's 50257 rows
    # (padded to 50304 by models.pad_vocabulary).
    rows = model.lm.config.unpadded_vocab_size, model.lm.get_input_embeddings().num_embeddings
    if rows != (50257, 50304):
        raise RuntimeError(f"GPT-2 124M has {rows[0]} vocabulary rows (padded: {rows[1]}), not 50257 (50304)")
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "lm_parameters": sum(p.numel() for p in model.lm.parameters()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": cfg.batch_size,
        "workers": cfg.data.num_workers,
        "steps": args.gpu_steps,
        "warmup_steps": args.gpu_warmup,
        "peak_bf16_flops": train.peak_bf16_flops(torch.device("cuda")),
    }
    for compiled in (False, True):
        mode = "compile" if compiled else "eager"
        out = work / f"gpu-{mode}"
        argv = [*common, "--max-steps", str(args.gpu_steps), "--max-epochs", "1000", "--log-every"]
        argv += [str(args.gpu_log_every), "--eval-every", str(args.gpu_steps), "--output-dir", str(out), "--overwrite"]
        argv += ["--compile"] if compiled else []
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            train_main(argv)
        except (Exception, SystemExit) as e:  # the other mode's figures still count
            result[f"{mode}_error"] = f"{type(e).__name__}: {e}"[-2000:]
            print(f"gpu: {mode} run failed: {result[f'{mode}_error']}", file=sys.stderr, flush=True)
            continue
        result[f"{mode}_wall_s"] = time.perf_counter() - started
        result[f"{mode}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logged = [m for m in logged if "train/tokens_per_s" in m]
        kept = [m for m in logged if m["step"] > args.gpu_warmup]
        for key in ("tokens_per_s", "samples_per_s", "mfu"):
            values = [m[f"train/{key}"] for m in kept if f"train/{key}" in m]
            result[f"{mode}_{key}"] = median(values) if values else None
        if kept:
            result[f"{mode}_tokens_per_sample"] = median(
                [m["train/tokens_per_s"] / m["train/samples_per_s"] for m in kept]
            )
        result[f"{mode}_windows"] = [[m["step"], m["train/tokens_per_s"], m.get("train/mfu")] for m in logged]
    for scale in (1, 4):
        try:
            result.update(gpu_bare(model, task, datasets, cfg, scale))
        except Exception as e:  # out of memory, say: the runs' figures still count
            result[f"bare_x{scale}_error"] = f"{type(e).__name__}: {e}"[-2000:]
            print(f"gpu: bare loop x{scale} failed: {result[f'bare_x{scale}_error']}", file=sys.stderr, flush=True)
    return result


def save_gpt2_124m(argv: list[str], directory: Path) -> Path:
    """GPT-2 124M as GPT2Config() makes it (12 layers, width 768, 12 heads, 1024 positions, 50257 embeddings), random
    init, saved with save_pretrained beside a byte-level BPE trained on the run's training text (1000 tokens,
    GPT-2's <|endoftext|> as bos and eos): nothing is downloaded."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import models
    import train
    from tasks import TASKS

    name, cfg = train.parse_config(argv)
    task = TASKS[name][0](cfg)
    tokenizer = models.train_tokenizer(task.training_texts(task.build_datasets()["train"]), 1000, ["<|endoftext|>"])
    tokenizer.bos_token = tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos)).save_pretrained(directory)
    return directory


def gpu_bare(model, task, datasets, cfg, scale: int, batches: int = 6, rounds: int = 5) -> dict:
    """train.py's step (bf16 autocast, fused AdamW, clipping, schedule) by hand on `batches` batches of `scale` x
    the run's batch size, moved to the GPU before the clock: tokens/s and MFU of the model alone (no loader)."""
    import dataclasses

    import torch

    import train

    device = torch.device("cuda")
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * scale)
    data = itertools.islice(training_batches(task, datasets["train"], cfg), batches)
    data = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in data]
    bare = BareLoop(
        model.to(device), cfg, (rounds + 1) * batches, fused=True, autocast=torch.autocast("cuda", torch.bfloat16)
    )
    bare.run(data)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(rounds):
        bare.run(data)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tokens = rounds * sum(b["attention_mask"].sum().item() for b in data)
    samples = rounds * sum(len(b["ids"]) for b in data)
    peak = train.peak_bf16_flops(device)
    flops = train.train_flops_per_token(model, tokens / samples) * tokens / elapsed
    key = f"bare_b{cfg.batch_size}"
    del bare, data
    torch.cuda.empty_cache()
    return {
        f"{key}_tokens_per_s": tokens / elapsed,
        f"{key}_mfu": flops / peak if peak else None,
        f"{key}_tokens_per_sample": tokens / samples,
    }


# ----------------------------------------------------------------------------------------------------------------


def cpu_ratios(r: dict, name: str) -> str:
    return f"{r[name + '_vs_bare_main_cpu']:.3f} ({r[name + '_vs_bare_cpu']:.3f})"


def ratio_row(r: dict, name: str) -> str:
    low, high = r[name + "_vs_bare_quartiles"]
    return f"{r[name + '_vs_bare']:.3f} ({low:.2f}-{high:.2f}, {r[name + '_windows']} pairs)"


def loop_rows(r: dict, key: str) -> list[tuple[str, str, str]]:
    p = f"{key} ({r['parameters'] / 1e6:.2f}M {r['lm']})" if "lm" in r else key
    return [
        (f"{p}: train.py steps/s", f"{r['ours_steps_per_s']:.2f}", ""),
        (f"{p}: bare loop steps/s (beside train.py)", f"{r['bare_ours_steps_per_s']:.2f}", ""),
        (f"{p}: train.py / bare: wall (quartiles of the window pairs)", ratio_row(r, "ours"), ">= 0.97"),
        (f"{p}: train.py / bare: CPU, main process (+ workers)", cpu_ratios(r, "ours"), ""),
        (f"{p}: HF Trainer steps/s", f"{r['hf_steps_per_s']:.2f}", ""),
        (f"{p}: bare loop steps/s (beside HF)", f"{r['bare_hf_steps_per_s']:.2f}", ""),
        (f"{p}: HF Trainer / bare: wall (quartiles of the window pairs)", ratio_row(r, "hf"), ""),
        (f"{p}: HF Trainer / bare: CPU, main process (+ workers)", cpu_ratios(r, "hf"), ""),
        (f"{p}: train.py / HF: wall (CPU + workers)", f"{r['ours_vs_hf']:.3f} ({r['ours_vs_hf_cpu']:.3f})", ">= 1"),
        (
            f"{p}: val loss after {r['steps']} steps",
            " ".join(f"{k} {r['loss_' + k]:.5f}" for k in ("ours", "bare", "hf", "bare_hf")),
            "equal",
        ),
    ]


def gpu_rows(r: dict) -> list[tuple[str, str, str]]:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    p = f"gpu ({r['device']}, GPT-2 {r['lm_parameters'] / 1e6:.1f}M, batch {r['batch_size']})"
    rows = []
    for mode in ("eager", "compile"):
        if f"{mode}_error" in r:
            rows.append((f"{p}: train.py {mode}", "failed", r[f"{mode}_error"].splitlines()[-1][:80]))
        elif f"{mode}_tokens_per_s" in r:
            value = f"{r[f'{mode}_tokens_per_s']:,.0f} tokens/s, MFU {pct(r[f'{mode}_mfu'])}"
            peak = f"{r[f'{mode}_peak_gib']:.1f} GiB peak, {r.get(f'{mode}_tokens_per_sample', 0):.0f} tokens/sample"
            rows.append((f"{p}: train.py {mode}", value, peak))
    for key in [k.removesuffix("_tokens_per_s") for k in r if k.startswith("bare_b") and k.endswith("_tokens_per_s")]:
        rows.append(
            (
                f"{p}: bare loop, no loader, batch {key[6:]}",
                f"{r[key + '_tokens_per_s']:,.0f} tokens/s, MFU {pct(r[key + '_mfu'])}",
                "",
            )
        )
    return rows


def table(results: dict) -> str:
    rows = []
    for key in ("loop", "loop-llama"):
        if key in results:
            rows += loop_rows(results[key], key)
    if "data" in results:
        r = results["data"]
        rows += [
            ("data: loader batches/s (10x)", f"{r['loader_10x_batches_per_s']:.1f}", ""),
            ("data: training steps/s (same batches, in turns)", f"{r['train_10x_steps_per_s']:.2f}", ""),
            (
                "data: loader / training, 1x; 10x",
                f"{r['loader_vs_train_1x']:.1f}; {r['loader_vs_train_10x']:.1f}",
                ">= 10",
            ),
            (
                "data: peak RSS 1x / 10x (MiB)",
                f"{r['loader_1x_peak_rss_mib']:.0f} / {r['loader_10x_peak_rss_mib']:.0f}",
                "flat",
            ),
        ]
        for k in (1, 4, 16):
            rows.append(
                (
                    f"scale {k}x: epoch s ({r[f'epoch_{k}x_steps']} steps), s/step, peak RSS MiB",
                    f"{r[f'epoch_{k}x_s']:.1f}, {r[f'epoch_{k}x_s'] / r[f'epoch_{k}x_steps']:.3f}, "
                    f"{r[f'epoch_{k}x_peak_rss_mib']:.0f}",
                    "linear, flat",
                )
            )
        rows.append(("scale: s per extra step from 4x to 16x", f"{r['marginal_s_per_step']:.3f}", "linear"))
    if "gpu" in results:
        rows += gpu_rows(results["gpu"])
    if "eval" in results:
        r = results["eval"]
        rows += [
            ("eval: 1 rank samples/s", f"{r['rank1_samples_per_s']:.2f}", ""),
            ("eval: 2 ranks samples/s", f"{r['rank2_samples_per_s']:.2f}", ""),
            ("eval: 2 ranks / 1 rank", f"{r['rank2_vs_rank1']:.2f}", ">= 1.7"),
        ]
    if "pixels" in results:
        r = results["pixels"]
        rows += [
            (
                f"pixels: loader / training images/s, 224 px, {r['tower']} frozen",
                f"{r['loader_vs_train']:.1f} ({r['loader_images_per_s']:.0f} / {r['train_images_per_s']:.1f})",
                ">= 2",
            ),
            ("pixels: train.py (frozen tower, on the fly) / bare loop: wall", ratio_row(r, "fly"), ">= 1/1.05"),
            (
                "pixels: cache command / bare model(pixel_values): images/s",
                f"{r['cache_vs_bare']:.3f} ({r['cache_images_per_s']:.1f} images/s)",
                ">= 0.9",
            ),
            (
                "pixels: cache command peak RSS 1x / 10x images (MiB)",
                f"{r['cache_1x_peak_rss_mib']:.0f} / {r['cache_10x_peak_rss_mib']:.0f}",
                "flat",
            ),
        ]
    if "startup" in results:
        r = results["startup"]
        rows += [
            ("startup: import torch alone s", f"{r['import_torch_s']:.2f}", ""),
            ("startup: train.py --help s", f"{r['help_s']:.2f}", "<= 2.5"),
            ("startup: train.py dialogue --help s", f"{r['task_help_s']:.2f}", "<= 2.5"),
            ("startup: launch to first step s", f"{r['first_step_s']:.2f}", ""),
        ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>{vwidth}}  {c}" for a, b, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["startup", "loop", "loop-llama", "data", "eval", "pixels", "gpu"],
        default=["startup", "loop", "loop-llama", "data", "eval", "pixels", "gpu"],
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) everywhere")
    parser.add_argument("--steps", type=int, default=120, help="loop: training steps per contender")
    parser.add_argument(
        "--window",
        type=int,
        default=1,
        help="loop: steps per interleaved timing window (short: a shared VM's speed drifts by 10%% within seconds)",
    )
    parser.add_argument(
        "--loop-data",
        choices=["real", "embedded"],
        default="real",
        help="loop: AVSD-format data at real feature sizes (default) or the embedded dataset (11 frames, fast steps)",
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="loop: 0 so losses can be compared exactly")
    parser.add_argument("--videos", type=int, default=8, help="data: videos (10 dialog turns each) at 1x")
    parser.add_argument("--frames", type=int, default=300, help="data: longest video, frames (cut to 200 on load)")
    parser.add_argument("--eval-samples", type=int, default=64, help="eval: dialogs evaluated")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="eval/startup: runs per measurement (median)")
    parser.add_argument("--images", type=int, default=128, help="pixels: 640x480 JPEGs at 1x")
    parser.add_argument("--tower", choices=["s16", "b16"], help="pixels: ViT-S/16 or ViT-B/16 (default: B on GPU)")
    parser.add_argument("--pixel-batch", type=int, default=8, help="pixels: images per batch")
    parser.add_argument("--pixel-steps", type=int, default=40, help="pixels: train.py steps beside the bare loop")
    parser.add_argument("--train-flags", default="", help="loop: extra train.py flags, e.g. --train-flags=--compile")
    parser.add_argument("--gpu-steps", type=int, default=600, help="gpu: training steps per run (eager, compile)")
    parser.add_argument("--gpu-log-every", type=int, default=25, help="gpu: steps per logged window")
    parser.add_argument("--gpu-warmup", type=int, default=100, help="gpu: first steps left out (warm-up, compiling)")
    parser.add_argument(
        "--gpu-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="gpu: DataLoader workers (a batch at real feature sizes is 54 MB: 2 cannot feed a GPU)",
    )
    parser.add_argument("--gpu-flags", default="", help="gpu: extra train.py flags, e.g. --gpu-flags='--batch-size 32'")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--loader-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.loader_child:
        import torch

        torch.set_num_threads(args.threads)
        loader_child(args.loader_child)
        return

    import torch

    torch.set_num_threads(args.threads)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="vltasks-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "xdg"), "PYTHONUNBUFFERED": "1"}
        os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
        sections = {
            "startup": lambda: bench_startup(args, work, env),
            "loop": lambda: bench_loop(args, work),
            "loop-llama": lambda: bench_loop(args, work, "llama"),
            "data": lambda: bench_data(args, work, env),
            "eval": lambda: bench_eval(args, work, env),
            "pixels": lambda: bench_pixels(args, work, env),
            "gpu": lambda: bench_gpu(args, work),
        }
        for name in args.only:
            if name == "gpu" and not torch.cuda.is_available():
                print("[gpu: skipped] no GPU: torch.cuda.is_available() is False", flush=True)
                continue
            started = time.perf_counter()
            results[name] = sections[name]()
            scalars = {k: v for k, v in results[name].items() if not k.endswith("_pairs_wall_s")}
            print(f"[{name}: {time.perf_counter() - started:.0f} s] {json.dumps(scalars)}", flush=True)
    if set(results) - {"date", "cpus"}:
        print(f"\n{results['date']}, {results['cpus']} CPUs, {args.threads} thread(s)\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
