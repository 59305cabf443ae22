"""Train and evaluate any task in tasks.py: one process (`python train.py TASK`) or DDP (`torchrun ... train.py TASK`).

Reads top to bottom: parse the config, set up distributed, build task/data/model/optimizer, resume, then one loop
that trains, evaluates, logs and checkpoints. Everything a task decides lives in tasks.py.
"""

import gc
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import models
from data import InputError, ResumableSampler, collate_in_worker
from models import LoadError
from tasks import TASKS, TaskConfig, config_to_dict, load_preset, unknown_task_message

# ----------------------------------------------------------------------------------------------------------------
# Command line, run directory, checkpoints, logging


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


def agree(rank: int, decide):
    """Run `decide()` on rank 0 and return its result on every rank; an InputError it raises is raised on every
    rank, so bad input stops all ranks with the same message instead of leaving the others waiting at a collective."""
    outcome = None
    if rank == 0:
        try:
            outcome = (True, decide())
        except InputError as e:
            outcome = (False, str(e))
    if dist.is_initialized():
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if not outcome[0]:
        raise InputError(outcome[1])
    return outcome[1]


def choose_run_dir(task: str, cfg: TaskConfig) -> Path:
    """The run directory. One that already holds a run is refused unless resuming it (same task) or --overwrite is
    given. Only checks: nothing is created or removed before the data and checkpoint have been read (start_run)."""
    import yaml

    run_dir = cfg.output_dir or Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    held = run_dir / "config.yaml"
    if held.is_file() and cfg.resume is None and not cfg.overwrite:
        how = "pass --resume auto to continue it, --overwrite to replace it, or another --output-dir"
        raise InputError(f"{run_dir} already holds a run: {how}")
    if held.is_file() and cfg.resume is not None:
        try:
            held_task = (yaml.safe_load(held.read_text()) or {}).get("task")
        except (yaml.YAMLError, AttributeError):
            held_task = None
        if held_task != task:
            raise InputError(f"{run_dir} holds a run of task {held_task!r}, not {task!r}: it cannot be resumed as one")
    return run_dir


def start_run(run_dir: Path, task: str, cfg: TaskConfig) -> None:
    """Rank 0, once the inputs are known to be good: replace the old run (--overwrite), create the directory and
    write config.yaml, the resolved config that `--config RUN/config.yaml` reruns."""
    import yaml

    if cfg.overwrite and cfg.resume is None and (run_dir / "config.yaml").is_file():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.evaluate:
        saved = {"task": task, **config_to_dict(cfg)}
        saved.update(output_dir=str(run_dir), resume=None, config=None, overwrite=False)
        write_atomically(run_dir / "config.yaml", lambda f: f.write(yaml.safe_dump(saved, sort_keys=False).encode()))


def find_checkpoint(cfg: TaskConfig, run_dir: Path) -> Path | None:
    """The checkpoint to start from: a file (`.pt`), or a directory (`.dcp`) of sharded weights with --fsdp."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":  # the last checkpoint of either kind (the wrong one is refused below, saying why)
        path = next((p for p in (run_dir / "ckpt_last.pt", run_dir / "ckpt_last.dcp") if p.is_symlink()), None)
        if path is None:
            return None
        if not path.exists():
            raise InputError(f"{path} points to {os.readlink(path)}, which is missing")
    else:
        path = Path(cfg.resume)
        if not path.exists():
            raise InputError(f"--resume checkpoint not found: {path}")
    if path.is_dir() != cfg.fsdp:
        how = "with" if path.is_dir() else "without"
        raise InputError(f"{path} was written {how} --fsdp: resume or evaluate it {how} --fsdp")
    return path


RESUME_KEYS = ("model", "optimizer", "scheduler", "step", "best", "window", "rng")


def load_checkpoint(path: Path, task: str, needs: tuple[str, ...] = RESUME_KEYS) -> dict:
    """The checkpoint's contents; for a sharded one (a directory) all but the weights and optimizer state, which
    stay on disk until each rank reads its shards (load_state)."""
    try:
        ckpt = torch.load(path / "state.pt" if path.is_dir() else path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint at all, a pickled object weights_only refuses, ...
        # One line (train.py prints an error's last line): torch's weights_only message wraps its reason in advice.
        reason = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation of torch.load")[0]
        reason = f"{type(e).__name__}: {' '.join(reason.split()).rstrip('.')}"
        why = "(a corrupt file, or not one torch.load(weights_only=True) accepts)"
        raise InputError(f"cannot read checkpoint {path}: {reason} {why}") from None
    if not isinstance(ckpt, dict) or ckpt.get("task") != task:
        other = ckpt.get("task") if isinstance(ckpt, dict) else None
        raise InputError(f"{path} is a checkpoint of task {other!r}, not {task!r}")
    missing = [k for k in needs if k not in ckpt and not (path.is_dir() and k in ("model", "optimizer"))]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: not a checkpoint this version can use")
    return ckpt


def write_atomically(path: Path, write) -> None:
    """`write(f)` to a binary file beside `path`, then renamed over it: a crash (even SIGKILL or power loss) leaves
    the old file or the new one, never a half-written one under the real name. Every file the runs write whole
    (configs, checkpoints, cached features) is written this way."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def point(link: Path, target: str) -> None:
    """Atomically make `link` a relative symlink to `target` (a file beside it)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, run_dir: Path, is_best: bool, keep_last: int, sharded: bool = False) -> None:
    """ckpt_step{N}.pt, then the ckpt_last.pt (and ckpt_best.pt) symlinks move to it: they only ever point to a
    complete file, so `--resume auto` never picks a checkpoint it cannot read. Keeps the newest `keep_last` step
    checkpoints plus the best one. `sharded` (--fsdp): `state` joins the shards all ranks wrote into
    ckpt_step{N}.dcp.tmp (TrainState.save), renamed ckpt_step{N}.dcp then; pointers ckpt_last.dcp, ckpt_best.dcp."""
    suffix = ".dcp" if sharded else ".pt"
    path = run_dir / f"ckpt_step{state['step']:08d}{suffix}"
    if sharded:
        tmp = path.with_name(path.name + ".tmp")
        write_atomically(tmp / "state.pt", lambda f: torch.save(state, f))
        fsync_dir(tmp)
        if path.exists():  # steps run again from an older checkpoint of this run
            shutil.rmtree(path)
        os.replace(tmp, path)
    else:
        write_atomically(path, lambda f: torch.save(state, f))
    fsync_dir(run_dir)  # the rename itself must be on disk before a pointer names the checkpoint
    point(run_dir / f"ckpt_last{suffix}", path.name)
    best = run_dir / f"ckpt_best{suffix}"
    if is_best:
        point(best, path.name)
    kept = {best.resolve().name} if best.exists() else set()
    for old in sorted(run_dir.glob(f"ckpt_step*{suffix}"))[:-keep_last]:
        if old.name not in kept:
            shutil.rmtree(old) if sharded else old.unlink()


def frozen_digest(model: torch.nn.Module, frozen: set[str]) -> str | None:
    """sha256 over the frozen parameters' names, dtypes, shapes and bytes: what checkpoints hold instead of them."""
    import hashlib

    digest, weights = hashlib.sha256(), model.state_dict()
    for name in sorted(frozen):
        digest.update(f"{name} {weights[name].dtype} {tuple(weights[name].shape)};".encode())
        digest.update(weights[name].detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest() if frozen else None


def check_fits(path: Path, ckpt: dict, model: torch.nn.Module, frozen: set[str], digest: str | None) -> None:
    """A checkpoint holds every weight and buffer of the model but the frozen parameters, which must be the ones it
    was trained with (their digest): anything else would train or score another model than the one saved."""
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(path).read_metadata().state_dict_metadata
        saved = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    else:
        saved = set(ckpt["model"])
    expected = set(model.state_dict()) - frozen
    if saved != expected:
        lacks, unexpected = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
        raise InputError(f"{path} does not fit this model (other flags?): lacks {lacks}, has unexpected {unexpected}")
    if ckpt.get("frozen_sha256") != digest:
        raise InputError(
            f"{path}: frozen weights from --model.name/--model.vision differ from those it was trained with"
        )


def load_state(model: torch.nn.Module, path: Path, frozen: set[str], ckpt: dict | None = None, optimizer=None):
    """From a checkpoint file whole, or a sharded directory (--fsdp) each rank its shards: the model's weights (all
    but the frozen parameters; check_fits), or with `optimizer`, the optimizer's state."""
    if not path.is_dir():
        ckpt = ckpt or torch.load(path, map_location="cpu", weights_only=True)
        if optimizer is None:
            return model.load_state_dict(ckpt["model"], strict=False)
        return optimizer.load_state_dict(ckpt["optimizer"])
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint import state_dict as sd

    if optimizer is None:
        state = {k: v for k, v in sd.get_model_state_dict(model).items() if k not in frozen}
        load({"model": state}, checkpoint_id=path)
        return sd.set_model_state_dict(model, state, options=sd.StateDictOptions(strict=False))
    state = sd.get_optimizer_state_dict(model, optimizer)
    load({"optimizer": state}, checkpoint_id=path)
    return sd.set_optimizer_state_dict(model, optimizer, state)


def rng_state() -> dict:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts (tensors, lists, numbers)."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    np_state = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    state = {"python": [version, list(mt_state), gauss], "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Logger:
    """metrics.jsonl (one JSON object per event, with `step`) and wandb, both from rank 0 only."""

    def __init__(
        self, cfg: TaskConfig, task: str, run_dir: Path, rank: int, wandb_id: str | None, resumed_step: int | None
    ):
        self.enabled = rank == 0
        path = run_dir / "metrics.jsonl"
        if self.enabled and resumed_step is not None and path.is_file():
            # Steps after the checkpoint being resumed will be run (and logged) again: drop their old lines, so
            # metrics.jsonl reads as if the run had never been interrupted.
            lines = path.read_text().splitlines(True)
            kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= resumed_step]
            write_atomically(path, lambda f: f.write("".join(kept).encode()))
        self.file = open(path, "a") if self.enabled else None  # noqa: SIM115
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
    import netrc

    try:
        return bool(os.environ.get("WANDB_API_KEY")) or netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(cfg: TaskConfig, task: str, run_dir: Path, run_id: str | None):
    """Never blocks: no credentials → offline (said so); online that cannot connect in time → offline."""
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if mode in ("disabled", "disable"):
        return None
    import wandb

    if mode == "online" and not wandb_credentials():
        why = "no credentials (WANDB_API_KEY or `wandb login`)"
        print(f"wandb: {why}: logging offline to {run_dir}/wandb; upload later with `wandb sync`", file=sys.stderr)
        mode = "offline"
    run = dict(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or run_dir.name, id=run_id)
    run |= dict(dir=str(run_dir), config={"task": task, **config_to_dict(cfg)}, resume="allow")
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=30, silent=True), **run)
    except Exception as e:  # wandb raises its own error types on connection problems
        print(f"wandb: online init failed ({e}); logging offline", file=sys.stderr)
        return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **run)


def export(task, model: torch.nn.Module, cfg: TaskConfig) -> None:
    """--export DIR: the checkpoint's model as plain transformers code loads it (the task's `export`)."""
    if cfg.export.exists() and any(cfg.export.iterdir()) and not cfg.overwrite:
        raise InputError(f"--export {cfg.export} is not empty: pass another directory or --overwrite")
    print(f"exported {cfg.resume} to {cfg.export}: {task.export(model, cfg.export)}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data loading, optimizer, schedule; model FLOPs utilisation (GPU)


def part_of(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) → the name of the pretrained part it belongs to (`model.parts()`: "lm", "vision")."""
    return {id(p): name for name, module in model.parts().items() for p in module.parameters()}


def build_optimizer(model: torch.nn.Module, cfg: TaskConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over the parameters that train: a frozen one is not in it at all (weight decay would still move it).
    Weight decay on matrices (linear/embedding weights) only, not on biases and norm scales. The parts the model
    declares (`parts()`) have their own learning rates; the rest (projector, new embeddings, heads): --lr."""
    rates, parts = {"lm": cfg.model.lm_rate(cfg.lr), "vision": cfg.model.vision_lr}, part_of(model)
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            lr = rates.get(parts.get(id(p))) or cfg.lr
            groups.setdefault((lr, cfg.weight_decay if p.dim() >= 2 else 0.0), []).append(p)
    groups = [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)


def lr_factor(step: int, cfg: TaskConfig, total_steps: int) -> float:
    """Per-step linear warmup to --lr, then cosine decay to --min-lr at the last step (as a factor of --lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
PEAK_BF16_FLOPS |= {"L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        print(f"train/mfu not logged: no peak FLOP/s known for {name} (add it to PEAK_BF16_FLOPS)", file=sys.stderr)
    return peak


def train_flops_per_token(model: torch.nn.Module, seq_len: float, head_share: float = 1.0) -> float:
    """Training FLOPs per token (PaLM, appendix B), matmuls only: a weight costs 2 FLOPs forward, 2 for its input's
    gradient, 2 for its own: 6 per trainable weight, 4 per frozen one that gradients pass through (a frozen LM under a
    trainable projector), 2 per frozen weight of the visual front end (the `vision` part: forward only). Embedding
    tables are lookups (no FLOPs) unless tied to the output head (GPT-2's). The LM's output head runs on `head_share`
    of the tokens (the loss runs it on the labelled ones only). Attention scores and values: 12 x layers x width x
    sequence length, from the LM's config (else the first with num_hidden_layers and hidden_size). The feature
    projection is counted for every token (it runs on the video positions only)."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matmuls = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Embedding) for p in m.parameters(False)}
    parts, lm = part_of(model), model.parts()["lm"]
    head = getattr(lm, "get_output_embeddings", lambda: None)()
    head = {id(p) for p in head.parameters()} if head is not None else set()
    weights = sum(
        p.numel()
        * (6 if p.requires_grad else 2 if parts.get(id(p)) == "vision" else 4)
        * (head_share if id(p) in head else 1)
        for p in model.parameters()
        if id(p) not in lookups or id(p) in matmuls
    )
    configs = (getattr(m, "config", None) for m in [lm, *model.modules()])
    config = next((c for c in configs if hasattr(c, "num_hidden_layers") and hasattr(c, "hidden_size")), None)
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len if config is not None else 0
    return weights + attention


def build_loader(task, dataset, cfg: TaskConfig, rank: int, world: int, train: bool, pin_memory: bool) -> DataLoader:
    """This rank's shard of `dataset`, batches assembled by the task's collate in --data.num-workers processes."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        sampler=ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=cfg.seed),
        collate_fn=partial(collate_in_worker, task.collate, train=train),
        num_workers=cfg.data.num_workers,
        drop_last=train,
        pin_memory=pin_memory,
        persistent_workers=train and cfg.data.num_workers > 0,
        # Its own generator (worker seeds): starting an iterator must not draw from the global RNG, or where a run
        # was resumed would change its dropout masks.
        generator=torch.Generator().manual_seed(cfg.seed + rank),
    )


# ----------------------------------------------------------------------------------------------------------------
# Distributed: processes, FSDP (--fsdp)


def setup_distributed(cfg: TaskConfig) -> tuple[int, int, torch.device]:
    """This process's rank, the number of ranks and its device. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without
    them this is one plain process. A rank that dies makes the others fail at their next collective (at once when its
    sockets close, else after --dist-timeout), and torchrun stops the rest: the job fails instead of hanging."""
    rank, world = 0, 1
    if "RANK" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        timeout = timedelta(seconds=cfg.dist_timeout)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun --max-restarts keeps its store across restarts: without a per-attempt prefix the new workers
        # find the dead ones' addresses there and fail to connect.
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    elif cfg.fsdp:
        raise InputError("--fsdp shards over the ranks torchrun starts: launch with torchrun (--nproc-per-node 1 too)")
    return rank, world, torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")


def place_model(model, cfg: TaskConfig, device, bf16: bool, ckpt_path: Path | None, ckpt: dict | None, frozen):
    """`model` on the device, sharded (--fsdp), with the checkpoint's weights; and what trains it: wrapped in DDP (when
    distributed without --fsdp), compiled (--compile). Generation and checkpoints use `model` itself."""
    model = model.to(device)
    if cfg.fsdp:
        shard_model(model, bf16)
    if ckpt:
        load_state(model, ckpt_path, frozen, ckpt)
    trained = model
    if dist.is_initialized() and not cfg.fsdp:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # Every dimension symbolic from the first compilation: sequence, visual and label lengths vary between batches, and
    # a dimension compiled static recompiles when it first changes, late in the run for a rarely changing one.
    return model, torch.compile(trained, dynamic=True) if cfg.compile else trained


def compilations() -> int:
    """Graphs torch.compile has compiled in this process so far (--compile: constant once warmed up)."""
    from torch._dynamo.utils import counters  # torch has no public counter of them; its own tests read this one

    return counters["stats"]["unique_graphs"]


def shard_model(model: torch.nn.Module, bf16: bool) -> None:
    """FSDP2, in place: every repeated block of each transformers model inside (of a class its `_no_split_modules`
    names: layers of the LM, of a text encoder, of a vision tower) is one unit, all-gathered only for its own forward
    and backward; the root unit holds the rest (embeddings, projector, heads). `bf16`: weights are gathered and used
    in bf16, gradients reduced in fp32 (in place of autocast)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    classes = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    # Only the repeated blocks (items of a ModuleList): embeddings, named there by some models too, are called outside
    # their module's forward (to build inputs_embeds), which an FSDP unit's weights cannot be. A block holding a named
    # class is one too (Idefics3 names its vision attention, not its vision layer).
    blocks = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2].isdigit()]
    units = [m for n, m in blocks if any(type(inner).__name__ in classes for inner in m.modules())]
    for module in [*reversed(units), model]:  # inner units before the ones around them
        fully_shard(module, mp_policy=policy)


def gather_weights(model: torch.nn.Module, gathered: bool) -> None:
    """FSDP: all-gather every unit's weights (`gathered`), the same collectives in the same order on every rank, and
    keep them until `gathered` is False. For evaluation: ranks generate different numbers of tokens, so a forward
    must not be a collective. Without FSDP nothing happens."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units and gathered:
        # FSDP2 makes the first module it sees run forward its root; generation may run blocks before the root ever
        # ran forward (--evaluate), so initialise it as root now.
        model._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(not gathered and unit is not model, recurse=False)  # FSDP2's defaults
        unit.unshard() if gathered else unit.reshard()


# ----------------------------------------------------------------------------------------------------------------
# --cache-features: the frozen tower run once over a dataset's images or videos


def cache_features(name: str, cfg: TaskConfig, rank: int, world: int, device: torch.device) -> None:
    """Every image or video of every split (each feature id once) through the frozen tower with the evaluation
    transform, written to ROOT/features/NAME/{id}.npy as (frames x tokens, width) float32, each file atomically
    (temp file, rename): files already there are skipped, so a killed run continues where it stopped. Rank r takes
    every world-th id from the r-th. ROOT/features/NAME/tower.json records what the tokens depend on; a directory
    written with other settings is refused."""
    import dataclasses

    from torch.utils.data import ConcatDataset, Subset
    from tqdm import tqdm

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=False, shuffle_features=False))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, freeze_vision=True))
    datasets = TASKS[name][0](cfg).build_datasets()
    first = {}  # feature id → (split, index of its first sample)
    for split, dataset in datasets.items():
        for index, sample in enumerate(dataset.samples):
            first.setdefault(sample["image_id"], (split, index))
    train_set, out = datasets["train"], datasets["train"].root / "features" / cfg.cache_features
    settings = {"vision": cfg.model.vision, "tokens": cfg.model.vision_tokens, "frames": train_set.frames}
    small = [cfg.model.vision_width, cfg.model.vision_layers, cfg.seed]  # what `small` is built from
    settings |= {"size": list(train_set.pixels.size), "small": small if cfg.model.vision == "small" else None}

    def claim() -> None:
        held = out / "tower.json"
        if held.is_file() and json.loads(held.read_text()) != settings:
            raise InputError(f"{out} holds features made with {held.read_text().strip()}: choose another NAME")
        out.mkdir(parents=True, exist_ok=True)
        held.write_text(json.dumps(settings))

    agree(rank, claim)
    mine = [i for i in sorted(first)[rank::world] if not (out / f"{i}.npy").is_file()]
    subsets = [Subset(d, [first[i][1] for i in mine if first[i][0] == split]) for split, d in datasets.items()]
    workers = {"num_workers": cfg.data.num_workers, "pin_memory": device.type == "cuda"}
    loader = DataLoader(ConcatDataset(subsets), cfg.eval_batch_size, collate_fn=pixels_batch, **workers)
    batches = iter(loader)  # the workers start decoding while the tower loads
    vision = models.VisionTower(cfg.model, cfg.seed).to(device).eval()
    for ids, pixels in tqdm(batches, total=len(loader), disable=rank != 0, desc=f"rank 0: {len(mine)} files"):
        tokens = vision({"pixels": pixels.to(device, non_blocking=True)})[0].cpu().numpy() if ids else []
        for feature_id, array in zip(ids, tokens, strict=True):
            write_atomically(out / f"{feature_id}.npy", partial(np.save, arr=array))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        print(f"{out}: {len(list(out.glob('*.npy')))} feature files of {len(first)} ids", flush=True)


def pixels_batch(samples: list[dict | None]) -> tuple[list[str], torch.Tensor | None]:
    from data import stack_pixels

    kept = [s for s in samples if s is not None]  # files that failed, skipped with --data.skip-bad-files
    return [s["image_id"] for s in kept], stack_pixels([s["pixels"] for s in kept]) if kept else None


# ----------------------------------------------------------------------------------------------------------------
# Faults: stop signals, flags every rank acts on together


class StepFlags:
    """Per-step decisions every rank must take together — stop (a SIGTERM/SIGUSR1 reached some rank) and non-finite
    loss — ride on the all-reduced step statistics, so all ranks hold the same values. Reading them on the host would
    cost a sync per step on GPU; instead the flags of step t are copied to the host asynchronously and read once step
    t+1 has been queued (`read(wait=False)` keeps the newest step pending), or all at once at a sync point. The signals
    (preemption; SLURM's warning signal) are only noted in `signals`: every rank stops at the same step, saved."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending = []  # (step, host tensor, copy-done event)
        self.signals = []  # the names of the stop signals this rank received
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: self.signals.append(signal.Signals(signum).name))

    def push(self, step: int, flags: torch.Tensor) -> None:
        host = torch.empty(flags.shape, pin_memory=self.cuda)
        host.copy_(flags, non_blocking=self.cuda)
        event = torch.cuda.Event() if self.cuda else None
        if event is not None:
            event.record()
        self.pending.append((step, host, event))

    def read(self, wait: bool, nan_policy: str, rank: int) -> bool:
        """Whether some rank was asked to stop, by the flags read. A non-finite loss with --nan-policy stop exits 1."""
        stop = False
        while len(self.pending) > (0 if wait else 1):
            step, host, event = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            nonfinite, stop_flag = host.tolist()
            if nonfinite and nan_policy == "stop":
                why = f"non-finite loss at step {step}: run stopped, nothing after step {step - 1} saved"
                if rank == 0:
                    print(f"error: {why} (lower --lr, or --nan-policy skip)", file=sys.stderr, flush=True)
                sys.exit(1)
            stop |= stop_flag > 0
        return stop


# ----------------------------------------------------------------------------------------------------------------
# Training: evaluation, the step, the state a step changes and a checkpoint holds; main


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def evaluate_split(task, model, datasets, loader, device, autocast, run_dir: Path, logger: Logger, rank, split, step):
    """Every rank generates on its shard; rank 0 scores, writes results/SPLIT_stepN.json, logs; all ranks get the
    metrics. `model` is the unwrapped one (no DDP, no torch.compile); `loader(dataset, train)`: build_loader's."""
    from tqdm import tqdm

    model.eval()
    gather_weights(model, True)
    started = time.perf_counter()
    # Rank 0's batches counted on a bar of their own (below training's), gone when the split is done.
    batches = loader(datasets[split], train=False)
    batches = tqdm(batches, f"eval {split}", leave=False, disable=rank != 0, dynamic_ncols=True, mininterval=1.0)
    with autocast:
        results = task.evaluation(model, batches, partial(to_device, device=device))
    speed = {f"{split}/samples_per_s": len(results) / (time.perf_counter() - started)}
    gather_weights(model, False)
    model.train()

    def score() -> dict[str, float]:
        (run_dir / "results").mkdir(exist_ok=True)
        (run_dir / "results" / f"{split}_step{step}.json").write_text(json.dumps(results, indent=1))
        metrics = task.after_evaluation(results, split)
        logger.log(step, {f"{split}/{k}": v for k, v in metrics.items()} | speed)
        logger.table(step, f"{split}/examples", results)
        print(f"step {step} {split}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        return metrics

    return agree(rank, score)


def forward_backward(model, task, batches, cfg: TaskConfig, autocast, device: torch.device, signals: list):
    """One step's --grad-accum micro-batches, forward and backward: their gradients add up (all-reduced on the last
    one only). Returns the step's sums over all ranks: loss, loss count, tokens, samples, ranks asked to stop."""
    stats = torch.zeros(5, device=device)
    distributed = dist.is_initialized()
    for micro in range(cfg.grad_accum):
        batch = to_device(next(batches), device)
        sync = micro == cfg.grad_accum - 1 or not distributed
        if cfg.fsdp:
            model.set_requires_gradient_sync(sync)
        with nullcontext() if sync or cfg.fsdp else model.no_sync(), autocast:
            loss_sum, count = task.train_step(model, batch)
        loss_sum.backward()
        tokens = batch["attention_mask"].sum() if "attention_mask" in batch else count
        stats[:3] += torch.stack([loss_sum.detach().float(), count.float(), tokens.float()])
        stats[3] += len(batch["ids"])  # a Python number: no host-to-device copy (that would wait on the GPU)
    stats[4] = float(bool(signals))
    if distributed:
        dist.all_reduce(stats)
    return stats


class TrainState:
    """What a training step changes and a checkpoint holds (RESUME_KEYS, and `saved`: task, wandb id, the frozen
    weights' digest): the optimizer and schedule of `model`'s trained weights, the best --best-metric value, and the
    window: running sums on the device (loss, count, tokens, samples), read (one host sync) every --log-every steps."""

    def __init__(self, cfg: TaskConfig, model, total_steps: int, device, run_dir: Path, frozen, rank, world, saved):
        self.optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
        factor = partial(lr_factor, cfg=cfg, total_steps=total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.window = torch.zeros(4, device=device)
        self.grad_norm = torch.zeros((), device=device)  # logged as is if the first steps all skip (--nan-policy skip)
        self.cfg, self.model, self.total_steps, self.run_dir, self.frozen = cfg, model, total_steps, run_dir, frozen
        self.rank, self.world, self.best = rank, world, None
        self.saved = saved | {"config": config_to_dict(cfg) | {"output_dir": str(run_dir)}}

    def resume(self, path: Path, ckpt: dict) -> int:
        """All but the weights (place_model loads them) from `ckpt`; returns the step it was saved at."""
        load_state(self.model, path, self.frozen, ckpt, self.optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.best = ckpt["best"]
        self.window.copy_(ckpt["window"])
        if len(ckpt["rng"]) == self.world:
            set_rng_state(ckpt["rng"][self.rank])
        elif self.rank == 0:
            print(f"warning: resuming {len(ckpt['rng'])} rank(s) on {self.world}: random draws will differ", flush=True)
        return ckpt["step"]

    def update(self, stats: torch.Tensor, step: int) -> torch.Tensor:
        """Step `step` from the accumulated gradients and the step's `stats` (forward_backward); returns whether its
        loss was non-finite, on the device."""
        cfg = self.cfg
        nonfinite = ~torch.isfinite(stats[0])
        if cfg.nan_policy == "skip" and nonfinite.item():  # decided before the update: a host sync per step
            if self.rank == 0:
                print(f"step {step}: non-finite loss, update skipped (--nan-policy skip)", flush=True)
        else:
            # Gradients hold sum(loss) (DDP, FSDP: averaged over ranks); make them the mean over the global batch and
            # clip them in one pass over the gradients, as a bare loop's clip_grad_norm_ does.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            scale = self.world / stats[1].clamp(min=1)
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.get_total_norm(grads)
                if cfg.fsdp:  # a DTensor: FSDP's gradients are shards
                    norm = norm.full_tensor()
                self.grad_norm = norm * scale
                scale = scale * (cfg.max_grad_norm / (self.grad_norm + 1e-6)).clamp(max=1)
            for grad in grads:  # the scale stays on the device: no host sync
                grad.mul_(scale)
            self.optimizer.step()
            self.window += stats[:4]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return nonfinite

    def train_metrics(self, step: int, steps_per_epoch: int, elapsed: float, peak_flops: float | None) -> dict:
        """The --log-every line from the window, which starts again (`peak_flops`: of one GPU, for train/mfu)."""
        loss_total, count_total, tokens_total, samples_total = self.window.tolist()
        self.window.zero_()
        lr = self.cfg.lr * lr_factor(step, self.cfg, self.total_steps)
        metrics = {"train/lr": lr, "train/epoch": step / steps_per_epoch}
        metrics |= {"train/samples_per_s": samples_total / elapsed, "train/tokens_per_s": tokens_total / elapsed}
        if count_total > 0:  # else every step since the last log was skipped (--nan-policy skip)
            metrics["train/loss"] = loss_total / count_total
        if peak_flops:
            share = count_total / max(tokens_total, 1)  # labelled tokens: where the output head runs
            per_token = train_flops_per_token(self.model, tokens_total / max(samples_total, 1), share)
            metrics["train/mfu"] = per_token * tokens_total / elapsed / (peak_flops * self.world)
        if self.cfg.max_grad_norm > 0:
            metrics["train/grad_norm"] = self.grad_norm.item()
        if self.cfg.compile:
            metrics["train/compilations"] = compilations()
        return metrics

    def save(self, step: int, metrics: dict[str, float]) -> None:
        """Every rank: all but the frozen weights. --fsdp: each rank's shards into STEP.dcp.tmp (files of a save killed
        midway are overwritten), rank 0 the rest beside them; else rank 0 writes it all to a file (save_checkpoint).
        `metrics`: the evaluation's, empty if none ran."""
        cfg, best, value = self.cfg, self.best, metrics.get(self.cfg.best_metric, math.nan)
        improved = math.isfinite(value) and (best is None or (value > best if cfg.best_mode == "max" else value < best))
        self.best = value if improved else best
        rng = [rng_state()]
        if dist.is_initialized():
            rng = [None] * self.world if self.rank == 0 else None
            dist.gather_object(rng_state(), rng, dst=0)
        if cfg.fsdp:
            from torch.distributed.checkpoint import save
            from torch.distributed.checkpoint.state_dict import get_state_dict

            weights, optimizer = get_state_dict(self.model, self.optimizer)
        else:
            weights, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        tensors = {"model": {k: v for k, v in weights.items() if k not in self.frozen}, "optimizer": optimizer}
        if cfg.fsdp:
            save(tensors, checkpoint_id=self.run_dir / f"ckpt_step{step:08d}.dcp.tmp")
        if self.rank == 0:
            state = {"scheduler": self.scheduler.state_dict(), "step": step, "best": self.best}
            state |= {"window": self.window.cpu(), "rng": rng, **self.saved}
            if not cfg.fsdp:
                state |= tensors
            save_checkpoint(state, self.run_dir, improved, cfg.keep_last, sharded=cfg.fsdp)

    def load_best(self) -> None:
        """The best checkpoint's weights, once every rank has saved (none: the last weights stay)."""
        path = self.run_dir / f"ckpt_best{'.dcp' if self.cfg.fsdp else '.pt'}"
        if dist.is_initialized():
            dist.barrier()
        if path.exists():
            load_state(self.model, path, self.frozen)


def build(name: str, cfg: TaskConfig, tokenizer_dir: Path):
    """(task, its datasets, its initial model) as every run builds them: the same weights on every rank."""
    task = TASKS[name][0](cfg)
    datasets = task.build_datasets()
    torch.manual_seed(cfg.seed)
    return task, datasets, task.build_model(datasets["train"], tokenizer_dir)


def main(argv: list[str]) -> None:
    name, cfg = parse_config(argv)
    rank, world, device = setup_distributed(cfg)
    bf16 = device.type == "cuda" and cfg.bf16
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    # --fsdp trains in bf16 by FSDP's policy (shard_model), which casts forward's inputs only: evaluation, which calls
    # other methods (generate, embed_*), keeps autocast.
    train_autocast = nullcontext() if cfg.fsdp else autocast
    peak_flops = peak_bf16_flops(device) if bf16 else None
    if cfg.cache_features is not None:
        return cache_features(name, cfg, rank, world, device)

    # Every input is read and checked before anything in the run directory is created, replaced or overwritten.
    run_dir = agree(rank, partial(choose_run_dir, name, cfg))
    ckpt_path = find_checkpoint(cfg, run_dir)
    needs = ("model", "step") if cfg.evaluate or cfg.export else RESUME_KEYS
    ckpt = load_checkpoint(ckpt_path, name, needs) if ckpt_path else None
    if cfg.evaluate and ckpt is None:
        raise InputError(f"--evaluate: no checkpoint to evaluate in {run_dir}")
    tokenizer_dir = (ckpt_path.parent if ckpt_path else run_dir) / "tokenizer"
    try:
        task, datasets, model = build(name, cfg, tokenizer_dir)
    except LoadError as e:
        if cfg.config is None or _flag_value(argv, f"--model.{e.field}"):
            raise
        raise InputError(f"{cfg.config}: model.{e.field} {e.name}: {e.reason}") from None  # the --config file's name
    # Frozen parameters are not saved: checkpoints hold their digest, and they must match it on loading.
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    digest = frozen_digest(model, frozen) if rank == 0 else None
    if ckpt:
        agree(rank, partial(check_fits, ckpt_path, ckpt, model, frozen, digest))
    if cfg.export is not None:
        if ckpt:
            load_state(model, ckpt_path, frozen, ckpt)
        return export(task, model, cfg) if rank == 0 else None
    agree(rank, partial(start_run, run_dir, name, cfg))
    if rank == 0 and not (tokenizer_dir / "tokenizer.json").is_file() and task.tokenizer is not None:
        task.tokenizer.save_pretrained(tokenizer_dir)

    raw_model, model = place_model(model, cfg, device, bf16, ckpt_path, ckpt, frozen)
    # From here on each rank draws its own random numbers (dropout): identical masks on every rank would correlate.
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    loader = partial(build_loader, task, cfg=cfg, rank=rank, world=world, pin_memory=device.type == "cuda")
    resumed_step = None if cfg.evaluate else ckpt["step"] if ckpt else 0  # training continues after this step
    logger = Logger(cfg, name, run_dir, rank, ckpt.get("wandb_id") if ckpt else None, resumed_step)
    evaluate = partial(evaluate_split, task, raw_model, datasets, loader, device, autocast, run_dir, logger, rank)
    if cfg.evaluate:
        for split in [s for s in ("val", "test") if s in datasets]:
            evaluate(split, ckpt["step"])
        logger.close()
        return

    train_loader = loader(datasets["train"], train=True)
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise InputError(f"the train split ({len(datasets['train'])} samples) is smaller than one global batch")
    total_steps = min(cfg.max_steps, cfg.max_epochs * steps_per_epoch)
    saved = {"task": name, "wandb_id": getattr(logger.wandb, "id", None), "frozen_sha256": digest}
    state = TrainState(cfg, raw_model, total_steps, device, run_dir, frozen, rank, world, saved)
    step = state.resume(ckpt_path, ckpt) if ckpt else 0
    flags = StepFlags(device)  # from here on a stop signal stops the run at the end of a step
    if rank == 0:
        params = sum(p.numel() for p in raw_model.parameters()) / 1e6
        sizes = f"{steps_per_epoch} steps/epoch, {total_steps} steps | {params:.2f}M parameters"
        resumed = f" | resumed at step {step}" if ckpt else ""
        print(f"run dir {run_dir} | {world} rank(s) on {device} | {sizes}{resumed}", flush=True)

    from tqdm import tqdm

    # Redrawn at most once a second: each redraw is a terminal write, a cost per step when steps are fast.
    progress = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, mininterval=1.0)
    model.train()
    window_start = time.perf_counter()
    stopping = False
    while step < total_steps and not stopping:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        train_loader.sampler.set_epoch(epoch)
        train_loader.sampler.skip = done_in_epoch * cfg.grad_accum * cfg.batch_size
        train_loader.generator.manual_seed(cfg.seed + rank + 1000 * epoch)  # worker seeds: a function of the epoch
        batches = iter(train_loader)
        for _ in range(done_in_epoch, steps_per_epoch):
            stats = forward_backward(model, task, batches, cfg, train_autocast, device, flags.signals)
            step += 1
            nonfinite = state.update(stats, step)
            progress.update()

            log_now = step % cfg.log_every == 0 or step == total_steps
            end_of_epoch = step % steps_per_epoch == 0 and cfg.eval_every == 0
            eval_now = end_of_epoch or (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps
            save_now = eval_now or (cfg.save_every and step % cfg.save_every == 0)
            flags.push(step, torch.stack([nonfinite.float(), stats[4]]))
            stopping |= flags.read(wait=log_now or save_now, nan_policy=cfg.nan_policy, rank=rank)
            if log_now:
                metrics = state.train_metrics(step, steps_per_epoch, time.perf_counter() - window_start, peak_flops)
                if "train/loss" in metrics:
                    progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
                logger.log(step, metrics)
                window_start = time.perf_counter()
            if eval_now:
                state.save(step, evaluate("val", step))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            elif save_now or stopping:
                state.save(step, {})
            if step == total_steps or stopping:
                break
    progress.close()
    if stopping:
        by = flags.signals[0] if flags.signals else "a signal to another rank"
        how = f"continue with --resume auto --output-dir {run_dir}"
        if rank == 0:
            print(f"stopped by {by} after step {step}; checkpoint saved: {how}", flush=True)
    elif "test" in datasets:
        state.load_best()  # test scores are the best checkpoint's (the last one's if no metric ever improved)
        evaluate("test", step)
    logger.close()


def run(argv: list[str]) -> None:
    """main(argv) as a command: bad input is one `error:` line and exit 2; the process group is torn down."""
    try:
        main(argv)
    except InputError as e:
        # Raised in a DataLoader worker, the message carries the worker's traceback; its last line is ours.
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('data.InputError: ')}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            # DDP's reducer (kept alive by reference cycles) holds gloo work; freed during interpreter teardown
            # instead, it aborts the process ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1:])
