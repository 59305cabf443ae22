"""Train and evaluate any task in tasks.py: one process (`python train.py TASK`) or DDP (`torchrun ... train.py TASK`).

Reads top to bottom: parse the config, set up distributed, build task/data/model/optimizer, resume, then one loop
that trains, evaluates, logs and checkpoints. Everything a task decides lives in tasks.py.
"""

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data import InputError, ResumableSampler
from tasks import TASKS, TaskConfig, config_to_dict, load_preset, unknown_task_message

# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_config(argv: list[str]) -> tuple[str, TaskConfig]:
    """`TASK [flags]` → (task name, config). A --config preset becomes the defaults that the flags override."""
    import tyro

    name = next((a for a in argv if not a.startswith("-")), None)
    if name is not None and name not in TASKS:
        raise InputError(unknown_task_message(name))
    defaults = {n: (task.__doc__ or n, cfg) for n, (task, cfg) in TASKS.items()}
    preset = _flag_value(argv, "--config")
    if name is not None and preset is not None:
        defaults[name] = (defaults[name][0], load_preset(Path(preset), name, TASKS[name][1]))
    try:
        cfg = tyro.extras.overridable_config_cli(defaults, prog="train.py", args=argv)
    except ValueError as e:  # raised by a config's __post_init__
        raise InputError(str(e)) from None
    return name, cfg


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Run directory, checkpoints, logging


def prepare_run_dir(task: str, cfg: TaskConfig, rank: int) -> Path:
    """Decide the run directory (same on every rank) and, on rank 0, write config.yaml into it. A directory that
    already holds a run is refused unless resuming it or --overwrite is given: nothing is silently replaced."""
    import yaml

    run_dir = cfg.output_dir or Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.is_initialized():  # rank 0's clock decides the default name
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    if rank == 0:
        held = (run_dir / "config.yaml").is_file()
        if held and cfg.overwrite and cfg.resume is None:
            shutil.rmtree(run_dir)
        elif held and cfg.resume is None:
            raise InputError(
                f"{run_dir} already holds a run: pass --resume auto to continue it, --overwrite to "
                "replace it, or another --output-dir"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.evaluate:
            saved = {"task": task, **config_to_dict(cfg)}
            saved.update(output_dir=str(run_dir), resume=None, config=None, overwrite=False)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return run_dir


def find_checkpoint(cfg: TaskConfig, run_dir: Path) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = run_dir / "ckpt_last.pt"
        return last if last.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise InputError(f"--resume checkpoint not found: {path}")
    return path


def load_checkpoint(path: Path, task: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint at all, ...
        raise InputError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("task") != task:
        other = ckpt.get("task") if isinstance(ckpt, dict) else None
        raise InputError(f"{path} is a checkpoint of task {other!r}, not {task!r}")
    return ckpt


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomic: a crash mid-save leaves the previous file intact, never a half-written one under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class Logger:
    """metrics.jsonl (one JSON object per event, with `step`) and wandb, both from rank 0 only."""

    def __init__(self, cfg: TaskConfig, task: str, run_dir: Path, rank: int, wandb_id: str | None):
        self.enabled = rank == 0
        self.file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None  # noqa: SIM115
        self.wandb = init_wandb(cfg, task, run_dir, wandb_id) if self.enabled else None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def table(self, step: int, key: str, results: list[dict], rows: int = 50) -> None:
        if self.wandb is not None and results:
            import wandb

            columns = list(results[0])
            data = [[json.dumps(r[c]) if isinstance(r[c], list | dict) else r[c] for c in columns] for r in results]
            self.wandb.log({key: wandb.Table(columns=columns, data=data[:rows])}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(cfg: TaskConfig, task: str, run_dir: Path, run_id: str | None):
    """Never blocks: no credentials → offline (said so); online that cannot connect in time → offline."""
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if mode in ("disabled", "disable"):
        return None
    import wandb

    if mode == "online" and not wandb_credentials():
        print(
            f"wandb: no credentials (WANDB_API_KEY or `wandb login`): logging offline to {run_dir}/wandb; "
            "upload later with `wandb sync`",
            file=sys.stderr,
        )
        mode = "offline"
    kwargs = dict(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        name=cfg.wandb.name or run_dir.name,
        dir=str(run_dir),
        config={"task": task, **config_to_dict(cfg)},
        id=run_id,
        resume="allow",
    )
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=30, silent=True), **kwargs)
    except Exception as e:  # wandb raises its own error types on connection problems
        print(f"wandb: online init failed ({e}); logging offline", file=sys.stderr)
        return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(model: torch.nn.Module, cfg: TaskConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linear/embedding weights) only, not on biases and norm scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)


def lr_factor(step: int, cfg: TaskConfig, total_steps: int) -> float:
    """Per-step linear warmup to --lr, then cosine decay to --min-lr at the last step (as a factor of --lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Model FLOPs utilisation (GPU)

# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
]


def peak_bf16_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    if peak is None:
        print(f"train/mfu not logged: no peak FLOP/s known for {name} (add it to PEAK_BF16_FLOPS)", file=sys.stderr)
    return peak


def train_flops_per_token(model: torch.nn.Module, seq_len: float) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6 per weight used in a matmul (2 forward, 4 backward), plus
    attention scores and values, 12 x layers x width x sequence length. Position embeddings are lookups, not
    matmuls; the feature projection is counted for every token (it only runs on the video positions: a slight
    overestimate)."""
    weights = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    config = getattr(getattr(model, "lm", model), "config", None)
    attention = 12 * config.n_layer * config.n_embd * seq_len if hasattr(config, "n_layer") else 0
    return 6 * weights + attention


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str]) -> None:
    name, cfg = parse_config(argv)

    # Distributed setup: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one plain process.
    distributed = "RANK" in os.environ
    if distributed:
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16 else nullcontext()
    peak_flops = peak_bf16_flops(device) if device.type == "cuda" and cfg.bf16 else None

    run_dir = prepare_run_dir(name, cfg, rank)
    if distributed:
        dist.barrier()  # rank 0 has checked and created the run dir
    ckpt_path = find_checkpoint(cfg, run_dir)
    ckpt = load_checkpoint(ckpt_path, name) if ckpt_path else None
    if cfg.evaluate and ckpt is None:
        raise InputError(f"--evaluate: no checkpoint to evaluate in {run_dir}")

    torch.manual_seed(cfg.seed)
    task = TASKS[name][0](cfg)
    datasets = task.build_datasets()
    tokenizer_dir = (ckpt_path.parent if ckpt_path else run_dir) / "tokenizer"
    model = task.build_model(datasets["train"], tokenizer_dir).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    raw_model = model
    if distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # training forward/backward only; generation and checkpoints use raw_model
        model = torch.compile(model)

    def loader(split: str, train: bool) -> DataLoader:
        dataset = datasets[split]
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=cfg.seed)
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            sampler=sampler,
            collate_fn=partial(task.collate, train=train),
            num_workers=cfg.data.num_workers,
            drop_last=train,
            pin_memory=device.type == "cuda",
            persistent_workers=train and cfg.data.num_workers > 0,
        )

    def move(batch: dict) -> dict:
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    logger = Logger(cfg, name, run_dir, rank, ckpt.get("wandb_id") if ckpt else None)

    def evaluate(split: str, step: int) -> dict[str, float]:
        """Every rank generates on its shard; rank 0 scores, writes results, logs; all ranks get the metrics."""
        raw_model.eval()
        started = time.perf_counter()
        with autocast:
            results = task.evaluation(raw_model, loader(split, train=False), move)
        speed = {f"{split}/samples_per_s": len(results) / (time.perf_counter() - started)}
        raw_model.train()
        metrics = {}
        if rank == 0:
            (run_dir / "results").mkdir(exist_ok=True)
            (run_dir / "results" / f"{split}_step{step}.json").write_text(json.dumps(results, indent=1))
            metrics = task.after_evaluation(results, split)
            logger.log(step, {f"{split}/{k}": v for k, v in metrics.items()} | speed)
            logger.table(step, f"{split}/examples", results)
            print(f"step {step} {split}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if distributed:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    if cfg.evaluate:
        for split in [s for s in ("val", "test") if s in datasets]:
            evaluate(split, ckpt["step"])
        logger.close()
        return

    # Optimizer, schedule, and where the run stands (fresh or resumed).
    train_loader = loader("train", train=True)
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise InputError(f"the train split ({len(datasets['train'])} samples) is smaller than one global batch")
    total_steps = min(cfg.max_steps, cfg.max_epochs * steps_per_epoch)
    optimizer = build_optimizer(raw_model, cfg, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg, total_steps=total_steps))
    step, best = 0, None
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, best = ckpt["step"], ckpt["best"]
    wandb_id = logger.wandb.id if logger.wandb is not None else None

    def checkpoint(metrics: dict[str, float]) -> None:
        nonlocal best
        value = metrics.get(cfg.best_metric)
        improved = (
            value is not None
            and math.isfinite(value)
            and (best is None or (value > best if cfg.best_mode == "max" else value < best))
        )
        if improved:
            best = value
        if rank == 0:
            state = {
                "task": name,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "best": best,
                "wandb_id": wandb_id,
                "config": config_to_dict(cfg) | {"output_dir": str(run_dir)},
            }
            save_checkpoint(state, run_dir / "ckpt_last.pt")
            if improved:
                shutil.copyfile(run_dir / "ckpt_last.pt", run_dir / "ckpt_best.pt.tmp")
                os.replace(run_dir / "ckpt_best.pt.tmp", run_dir / "ckpt_best.pt")

    if rank == 0:
        print(
            f"run dir {run_dir} | {world} rank(s) on {device} | {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps | {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters",
            flush=True,
        )
    from tqdm import tqdm

    progress = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    model.train()
    # Running sums on the device, read (one host sync) only every --log-every steps: loss, count, tokens, samples.
    window = torch.zeros(4, device=device)
    window_start = time.perf_counter()
    metrics = {}
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        train_loader.sampler.set_epoch(epoch)
        train_loader.sampler.skip = done_in_epoch * cfg.grad_accum * cfg.batch_size
        batches = iter(train_loader)
        for _ in range(done_in_epoch, steps_per_epoch):
            stats = torch.zeros(4, device=device)
            for micro in range(cfg.grad_accum):
                batch = move(next(batches))
                # Gradients are all-reduced only on the last micro-batch of the step.
                sync = micro == cfg.grad_accum - 1 or not distributed
                with nullcontext() if sync else model.no_sync(), autocast:
                    loss_sum, count = task.train_step(model, batch)
                loss_sum.backward()
                tokens = batch["attention_mask"].sum() if "attention_mask" in batch else count
                stats[:3] += torch.stack([loss_sum.detach().float(), count.float(), tokens.float()])
                stats[3] += len(batch["ids"])  # a Python number: no host-to-device copy (that would wait on the GPU)
            if distributed:
                dist.all_reduce(stats)
            # Gradients hold sum(loss) (DDP: averaged over ranks); make them the mean over the global batch.
            grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, world / stats[1].clamp(min=1))
            if cfg.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window += stats
            progress.update()

            if step % cfg.log_every == 0 or step == total_steps:
                loss_total, count_total, tokens_total, samples_total = window.tolist()
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": loss_total / max(count_total, 1),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": step / steps_per_epoch,
                    "train/samples_per_s": samples_total / elapsed,
                    "train/tokens_per_s": tokens_total / elapsed,
                }
                if peak_flops:
                    per_token = train_flops_per_token(raw_model, tokens_total / max(samples_total, 1))
                    metrics["train/mfu"] = per_token * tokens_total / elapsed / (peak_flops * world)
                if cfg.max_grad_norm > 0:
                    metrics["train/grad_norm"] = grad_norm.item()
                logger.log(step, metrics)
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
                window.zero_()
                window_start = time.perf_counter()
            end_of_epoch = step % steps_per_epoch == 0 and cfg.eval_every == 0
            if end_of_epoch or (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
                checkpoint(evaluate("val", step))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if step == total_steps:
                break
    progress.close()

    # The test split is scored with the best checkpoint's weights (the last ones if no metric ever improved).
    if "test" in datasets:
        best_path = run_dir / "ckpt_best.pt"
        if distributed:
            dist.barrier()
        if best_path.is_file():
            raw_model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["model"])
        evaluate("test", step)
    logger.close()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
