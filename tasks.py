"""Tasks: what a model is, what data it reads, what a train and a validation step are, and how results become metrics.

A task is three things next to each other in this file: a frozen config dataclass (its fields are the CLI flags,
their docstrings the `--help`), a task class, and one entry in `TASKS`. `train.py` knows nothing else about tasks.
"""

import collections
import dataclasses
import difflib
import functools
import itertools
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

import data
import embedded
import metrics
import models
from data import InputError
from models import LMBatch, ModelConfig, labelled_positions

# ----------------------------------------------------------------------------------------------------------------
# Config shared by every task


def at_least(cfg, group: str = "", **minimums: int) -> None:
    """For a config's __post_init__: each named field >= its minimum, else a ValueError naming the flag."""
    for name, minimum in minimums.items():
        if getattr(cfg, name) < minimum:
            raise ValueError(f"--{group}{name.replace('_', '-')} must be >= {minimum}, got {getattr(cfg, name)}")


@dataclass(frozen=True)
class DataConfig:
    root: Path | None = None
    """Dataset root in the task's real layout. Unset: the embedded dataset, generated once into --data.cache-dir."""
    cache_dir: Path | None = None
    """Where embedded datasets are generated and reused. Unset: $XDG_CACHE_HOME/vltasks (~/.cache/vltasks)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (batches are assembled in them, not in the training process)."""
    max_feature_len: int = 200
    """Frames kept per video (after aligning the feature streams to the shortest)."""
    shuffle_features: bool = False
    """Ablation: give every sample another one's features (or image, video). A grounded model scores clearly worse."""
    features: str | None = None
    """Image tasks: read the features from ROOT/features/NAME/ (e.g. a cache written by --cache-features NAME), their
    width from the files. Unset: ROOT/features/. (Dialogue names its streams with --features.)"""
    num_frames: int = 8
    """Videos (--model.vision): frames sampled per video, at the centres of equal segments (training: anywhere
    within each, unless --data.no-augment)."""
    augment: bool = True
    """Pixels (--model.vision), training only: random resized crop (scale 0.5-1, ratio 3/4-4/3) and horizontal flip,
    video frames jittered within their segments. Off: training reads pixels exactly as evaluation does."""
    skip_bad_files: bool = False
    """Pixels: skip (and count, on stderr) the samples whose image or video is missing, corrupt or undecodable,
    instead of stopping at the first one with an error naming it."""

    def __post_init__(self):
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"--data.root {self.root} is not a directory")
        at_least(self, "data.", num_workers=0, max_feature_len=1, num_frames=1)


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "online"
    """online needs credentials (WANDB_API_KEY or `wandb login`); without them the run logs offline and says so."""
    project: str = "vltasks"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); unset: your default."""
    name: str | None = None
    """Run name; unset: the output directory's name."""


@dataclass(frozen=True)
class TaskConfig:
    """Run settings every task has. Task configs subclass this and add their own flat flags."""

    output_dir: Path | None = None
    """Run directory (config.yaml, metrics.jsonl, checkpoints, results). Unset: runs/TASK-DATE-TIME."""
    overwrite: bool = False
    """Replace a run already in --output-dir instead of refusing."""
    resume: str | None = None
    """`auto`: continue from the last checkpoint in --output-dir (fresh start if there is none), or a checkpoint."""
    config: Path | None = None
    """A YAML preset (configs/, or a run's config.yaml); flags on the command line override it."""
    evaluate: bool = False
    """Only evaluate (val and test splits) the checkpoint given by --resume."""
    export: Path | None = None
    """Generative tasks: write the checkpoint given by --resume to this directory as plain transformers loads it
    (the LM with LoRA merged, its tokenizer) plus visual_prefix.pt (see models.load_visual_prefix), then stop. A
    pretrained VLM (--model.name): the whole model, LoRA merged, and its processor (AutoModelForImageTextToText)."""
    cache_features: str | None = None
    """Instead of training: run the frozen --model.vision tower once over every image or video of every split and
    write ROOT/features/NAME/{id}.npy, (frames x tokens, width). Resumable (files already written are kept), shared
    across ranks under torchrun. Then train on it with --data.features NAME (dialogue: --features NAME ...)."""
    seed: int = 42
    """Seed for model init, data order and dropout."""
    max_steps: int = 1_000_000
    """Stop after this many optimizer steps (or --max-epochs, whichever comes first)."""
    max_epochs: int = 10
    """Stop after this many epochs (or --max-steps, whichever comes first)."""
    batch_size: int = 16
    """Training samples per rank per micro-batch (global batch = this x ranks x --grad-accum)."""
    eval_batch_size: int = 32
    """Samples per rank per evaluation batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 50
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = 0.05
    """AdamW weight decay (matrices only; biases and norms are not decayed)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    eval_every: int = 0
    """Evaluate and checkpoint every N steps; 0: at the end of every epoch."""
    save_every: int = 0
    """Also checkpoint (without evaluating) every N steps, so a preempted run loses little; 0: only when evaluating."""
    keep_last: int = 2
    """Step checkpoints kept on disk: the newest N, plus the best one."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """Non-finite loss: `stop` the run naming the step (nothing after it is saved), or `skip` that step's update."""
    dist_timeout: int = 600
    """Seconds a collective waits for the other ranks before the run fails (a hung rank must not hang the job)."""
    log_every: int = 10
    """Log training metrics every N steps."""
    bf16: bool = True
    """bf16 on GPU (ignored on CPU): autocast; with --fsdp, weights gathered and used in bf16, gradients in fp32."""
    compile: bool = False
    """torch.compile the model for training (GPU; the first steps are slow while it compiles)."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state over the ranks (FSDP2) instead of replicating them (DDP): for
    models whose training state does not fit one GPU. Needs torchrun; checkpoints become sharded directories."""
    best_metric: str = "agg_metrics"
    """Validation metric that picks the best checkpoint."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a higher or lower --best-metric is better."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    wandb: WandbConfig = WandbConfig()

    def __post_init__(self):
        at_least(self, max_steps=1, max_epochs=1, batch_size=1, eval_batch_size=1, grad_accum=1, log_every=1)
        at_least(self, keep_last=1, dist_timeout=1, eval_every=0, save_every=0)
        if self.evaluate and self.resume is None:
            raise ValueError("--evaluate needs a checkpoint: pass --resume PATH (or --resume auto with --output-dir)")
        if self.export is not None and (self.resume is None or self.evaluate):
            raise ValueError("--export needs a checkpoint (--resume PATH) and no --evaluate")
        if self.resume == "auto" and self.output_dir is None:
            raise ValueError("--resume auto needs --output-dir (the run to continue)")
        if self.fsdp and self.compile:
            raise ValueError("--compile does not combine with --fsdp (not supported): drop one of them")
        plain_name = re.fullmatch(r"[\w.-]+", self.cache_features or "")
        if self.cache_features is not None and not (plain_name and self.model.vision):
            raise ValueError("--cache-features NAME needs --model.vision (the tower) and a plain NAME (a directory)")
        if self.model.vision and self.data.features:
            raise ValueError("--data.features reads cached features, --model.vision encodes pixels: choose one")


@dataclass(frozen=True)
class GenerationConfig(TaskConfig):
    """Tasks whose validation step generates text with beam search."""

    num_beams: int = 5
    """Beam width at evaluation."""
    max_len: int = 30
    """Most tokens generated per answer."""
    min_len: int = 1
    """Fewest tokens generated per answer (before <eos> is allowed)."""
    report_metric: bool = True
    """Score the generated text; off for splits with no references (predictions are still written)."""
    best_metric: str = "CIDEr"

    def __post_init__(self):
        super().__post_init__()
        at_least(self, num_beams=1)
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"need 0 <= --min-len <= --max-len, got --min-len {self.min_len} --max-len {self.max_len}")


# ----------------------------------------------------------------------------------------------------------------
# The base task, and the registry: task name → (task class, default config). Each task adds its entry right after its
# class; a variant of a task is another entry with `dataclasses.replace` of its default config.

TASKS: dict[str, tuple[type["BaseTask"], TaskConfig]] = {}


class BaseTask:
    """The contract train.py relies on. Results are lists of dicts with a unique `id`."""

    tokenizer = None
    """The run's tokenizer once build_model made or loaded it (a transformers tokenizer); train.py saves it with the
    run. None: the task has none."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def build_datasets(self) -> dict[str, Dataset]:
        """{"train": ..., "val": ..., optionally "test": ...}."""
        raise NotImplementedError

    def build_model(self, train_set: Dataset, tokenizer_dir: Path) -> nn.Module:
        """The model; `tokenizer_dir` holds the run's tokenizer if it has one yet (else build one: train.py saves
        `self.tokenizer` there once the run starts). Nothing is written here: bad input stops the run first."""
        raise NotImplementedError

    def collate(self, samples: list[dict], train: bool) -> dict:
        """Samples → batch (runs in DataLoader workers). Tensors go to the device; everything else stays as is."""
        raise NotImplementedError

    def build_vision(self, train_set: Dataset) -> nn.Module:
        """The visual front end: the dataset's features (models.FeatureInput, standardised with the training split's
        statistics unless --model.no-feature-norm), or with --model.vision its images or videos through the tower
        (models.VisionTower: its tokens as they are, extra feature streams such as VGGish standardised)."""
        if self.cfg.model.vision is None:
            refuse(self.cfg.model, "there is no vision tower (--model.vision)", models.VISION[:2])
            stats = train_set.feature_stats() if self.cfg.model.feature_norm else None
            return models.FeatureInput(train_set.features.dim, stats)
        extra = train_set.features.dim if train_set.features is not None else 0
        stats = train_set.feature_stats() if extra and self.cfg.model.feature_norm else None
        vision = models.VisionTower(self.cfg.model, self.cfg.seed, extra, stats)
        self.frame_tokens = vision.tokens_per_image(train_set.pixels.size)
        if train_set.frames * self.frame_tokens > self.cfg.data.max_feature_len:
            raise InputError(
                f"{train_set.frames} frame(s) x {self.frame_tokens} tokens exceed --data.max-feature-len "
                f"{self.cfg.data.max_feature_len}: raise it, or pool with --model.vision-tokens"
            )
        if extra and self.frame_tokens != 1:  # streams align frame by frame (to the shorter): one token a frame
            raise InputError("feature streams beside a vision tower align with its frames: add --model.vision-tokens 1")
        return vision

    def visual_len(self, sample: dict) -> int:
        """How many visual tokens the front end makes of this sample (positions in a packed sequence)."""
        if "pixels" not in sample:
            return len(sample["features"])
        tokens = len(sample["pixels"]) * self.frame_tokens
        return min(tokens, len(sample["features"])) if "features" in sample else tokens

    def visual_batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """The front end's input: features padded to the longest, with their mask; pixels stacked."""
        batch = {}
        if "features" in samples[0]:
            batch["features"], batch["feature_mask"] = data.stack_features([s["features"] for s in samples])
        if "pixels" in samples[0]:
            batch["pixels"] = data.stack_pixels([s["pixels"] for s in samples])
        return batch

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of loss terms). The loop divides by the count over the whole global batch, so the
        loss and gradients are exact means whatever the split into ranks and micro-batches."""
        return model(batch)

    def valid_step(self, model: nn.Module, batch: dict) -> list[dict]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluation(self, model: nn.Module, loader, move) -> list[dict]:
        """valid_step over this rank's shard, then every rank's results gathered and de-duplicated by `id`
        (DistributedSampler pads the last batch with repeats; counting them twice would skew the metric)."""
        results = []
        for batch in loader:
            results += self.valid_step(model, move(batch))
        return gather_results(results)

    def after_evaluation(self, results: list[dict], split: str) -> dict[str, float]:
        """Results → metrics (rank 0 only). Must include the config's `best_metric` when metrics are reported."""
        raise NotImplementedError

    def export(self, model: nn.Module, directory: Path) -> None:
        """--export: `model` saved where plain transformers code loads it. Tasks whose model has no such form refuse."""
        raise InputError(f"--export: {type(self).__name__}'s model has no export; the generative tasks' models do")


def refuse(cfg: ModelConfig, why: str, fields: tuple[str, ...]) -> None:
    """models.refuse_set where the model is built: a flag given where it does not apply is one error line."""
    try:
        models.refuse_set(cfg, {why: fields}, "--model.")
    except ValueError as e:
        raise InputError(str(e)) from None


def gather_results(results: list[dict]) -> list[dict]:
    """Every rank's results on every rank, de-duplicated by `id` and sorted by it."""
    if dist.is_initialized():
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, results)
        results = [r for shard in shards for r in shard]
    return sorted({r["id"]: r for r in results}.values(), key=lambda r: r["id"])


# ----------------------------------------------------------------------------------------------------------------
# What the generative tasks (dialogue, captioning, generative VQA) share: models.VisualPrefixLM, its tokenizer,
# packing, generation


# Training batches list their labelled positions (`loss_index`) in multiples of this many: the output head's GEMM gets
# whole tiles and few distinct sizes.
LOSS_ROWS_MULTIPLE = 64


class LMTask(BaseTask):
    """A task whose model is models.VisualPrefixLM: visual tokens in front of a text prompt, then the target text.

    A subclass names its marker tokens (`MARKERS`, added to the tokenizer; `VISUAL` is the type of the visual
    positions), the text a new tokenizer is trained on (`training_texts`) and how a sample becomes a prompt
    (`collate`, through `pack`). `self.token` maps the markers and "<eos>", "<pad>" to ids: a pretrained
    tokenizer keeps its own eos (what its LM learned to end text with) and pad (its eos where it has none: only
    ever at masked, unlabelled positions), and every sequence starts with its bos, if it has one (prompt_tokens).
    `self.separator` ends a segment inside a prompt (a dialogue turn): <eos>, as in LAVIS's dialogue; nothing in a
    chat template's user turn, which an end-of-turn token would end.
    """

    MARKERS: typing.ClassVar[tuple[str, ...]]
    VISUAL: typing.ClassVar[str]
    cfg: GenerationConfig

    def training_texts(self, train_set: Dataset) -> list[str]:
        raise NotImplementedError

    SCORED: typing.ClassVar[dict[str, str]] = {"references": "references"}
    """What evaluation scores a prediction against: batch key → sample key (eval batches of a VLM carry them)."""

    @functools.cached_property
    def vlm(self) -> bool:
        """--model.name is a pretrained vision-language model (models.vlm_config): its own vision side reads the
        images or frames, and its processor writes the batches (`conversation`, models.ChatFormat)."""
        if models.vlm_config(self.cfg.model.name) is None:
            return False
        why = f"--model.name {self.cfg.model.name} is a vision-language model (its own vision side and chat template)"
        refuse(self.cfg.model, why, ("vision", "projector", "video_loss_weight", "chat_template", "feature_norm"))
        if self.cfg.data.features or getattr(self.cfg, "features", None):
            raise InputError(f"{why}: it reads images or video frames, not features")
        return True

    def conversation(self, sample: dict, train: bool) -> models.Conversation:
        """What a pretrained VLM is asked about `sample` (its images, the turns, the answer to learn in training)."""
        raise NotImplementedError

    def vlm_batch(self, samples: list[dict], train: bool) -> dict:
        conversations = [self.conversation(s, train) for s in samples]
        batch = {**self.chat(conversations, train), "ids": [s["id"] for s in samples]}
        if not train:
            batch |= {k: [s[key] for s in samples] for k, key in self.SCORED.items() if key in samples[0]}
            batch["conversations"] = conversations
        return batch

    def build_model(self, train_set: Dataset, tokenizer_dir: Path) -> nn.Module:
        cfg = self.cfg.model
        if self.vlm:
            model = models.VLM(cfg)
            self.chat, self.tokenizer = model.format, model.format.tokenizer
            self.token = {"<eos>": model.format.end_id, "<pad>": model.format.pad_id}
            return model
        specials = {"eos_token": "<eos>", "pad_token": "<pad>", "additional_special_tokens": list(self.MARKERS)}
        texts = functools.partial(self.training_texts, train_set)
        self.tokenizer = tok = models.build_tokenizer(cfg, tokenizer_dir, specials, texts)
        self.front, self.back, eos = models.prompt_tokens(tok, cfg.chat_template)
        if eos is None:
            raise InputError(f"the tokenizer of {cfg.name} has no eos token to end a generated text with")
        pad = eos if tok.pad_token_id is None else tok.pad_token_id
        self.token = {t: tok.convert_tokens_to_ids(t) for t in self.MARKERS} | {"<eos>": eos, "<pad>": pad}
        self.separator = [] if cfg.chat_template else [eos]
        lm = models.build_causal_lm(cfg, tok, eos, pad)
        self.max_positions = lm.config.max_position_embeddings - len(self.front) - len(self.back)
        markers = [self.token[t] for t in self.MARKERS]
        types = cfg.name is None if cfg.token_types is None else cfg.token_types
        return models.VisualPrefixLM(
            lm, self.build_vision(train_set), markers, cfg.projector, cfg.video_loss_weight, types, cfg.name is not None
        )

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens, from the Rust tokenizer directly: the transformers wrapper around it
        costs as much again, in every batch (collate runs in the loader workers, which share the CPU with training)."""
        return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def pack(self, samples: list[dict], prompts: list[tuple[list[int], list[int]]], targets, train: bool) -> LMBatch:
        """prompts = (token ids, token types) per sample, placed after its visual tokens, the two between `self.front`
        and `self.back`; targets = token ids to learn (train only; they and their <eos> take the type of the prompt's
        last token, and are the only labelled positions). One sequence per sample, [front | visual | text]: a
        pretrained LM sees its bos first, where it always saw it, and a chat template's user turn holds the image.
        `is_visual` and `visual_index` say which positions take which visual token (VisualPrefixLM). Train:
        right-padded with labels and the positions that predict them (`loss_index`, see
        VisualPrefixLM.token_losses). Eval: the prompt alone, left-padded for generation, and the samples'
        references if they have any."""
        eos, pad_id, left, lead = self.token["<eos>"], self.token["<pad>"], not train, len(self.front)
        ids, types, visual, labels = [], [], [], []
        for sample, (prompt, kinds), target in zip(samples, prompts, targets, strict=True):
            frames = self.visual_len(sample)
            prompt = [*self.front, *prompt, *self.back]
            kinds = [kinds[0]] * len(self.front) + kinds + [kinds[-1]] * len(self.back)
            labels.append([models.IGNORE] * (frames + len(prompt)) + [*target, eos])
            if train:
                prompt, kinds = [*prompt, *target, eos], kinds + [kinds[-1]] * (len(target) + 1)
            ids.append([*prompt[:lead], *[pad_id] * frames, *prompt[lead:]])
            types.append([*kinds[:lead], *[self.token[self.VISUAL]] * frames, *kinds[lead:]])
            visual.append([0] * lead + [1] * frames + [0] * (len(prompt) - lead))
        visual = data.pad(visual, 0, left)
        batch = {
            **self.visual_batch(samples),
            "input_ids": data.pad(ids, pad_id, left),
            "token_type_ids": data.pad(types, pad_id, left),
            "attention_mask": data.pad([[1] * len(row) for row in ids], 0, left),
            "is_visual": visual.bool(),
            "visual_index": (visual.cumsum(1) - 1) * visual,  # the k-th visual position takes visual token k
        }
        if train:
            batch["labels"] = data.pad(labels, models.IGNORE, left=False)
            batch["loss_index"] = labelled_positions(batch["labels"], LOSS_ROWS_MULTIPLE)
            batch["right_padded"] = True  # the model runs without a padding mask (VisualPrefixLM.hidden_states)
        elif "references" in samples[0]:
            batch["references"] = [s["references"] for s in samples]
        batch["ids"] = [s["id"] for s in samples]
        return batch

    def export(self, model: nn.Module, directory: Path) -> str:
        """Writes the model; returns how to load it."""
        if self.vlm:
            models.save_vlm(model, directory)
            return f"AutoModelForImageTextToText and AutoProcessor .from_pretrained({str(directory)!r})"
        models.save_visual_prefix(model, self.tokenizer, directory)
        return f"models.load_visual_prefix({str(directory)!r})"

    def generate(self, model: nn.Module, batch: dict) -> list[str]:
        cfg = self.cfg
        eos, pad_id = self.token["<eos>"], self.token["<pad>"]
        generated = model.generate(batch, cfg.num_beams, cfg.max_len, cfg.min_len, eos, pad_id)
        return [t.strip() for t in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def valid_step(self, model: nn.Module, batch: dict) -> list[dict]:
        rows = zip(batch["ids"], self.generate(model, batch), batch["references"], strict=True)
        return [{"id": i, "prediction": t, "references": r} for i, t, r in rows]

    def after_evaluation(self, results: list[dict], split: str) -> dict[str, float]:
        """The generated text scored against its references with the COCO caption metrics."""
        if not self.cfg.report_metric:
            return {}
        return metrics.caption_metrics(
            {r["id"]: r["prediction"] for r in results}, {r["id"]: r["references"] for r in results}
        )


def load_splits(cfg: TaskConfig, root: Path, store, load, media=None, vlm: bool = False) -> dict[str, Dataset]:
    """ROOT/annotations/{train,val[,test]}.json read by `load(path, train=...)`, joined with their features, or with
    --model.vision (or a `vlm`, as decoded images) with their image or video (`media(sample)`: its file) and the extra
    streams of `store`."""
    datasets, shuffle = {}, cfg.data.shuffle_features
    if cfg.model.vision is not None or vlm:
        processor = None if vlm else models.load_vision(cfg.model, processor_only=True)[1]
        pixels = data.Pixels(processor, cfg.data.num_frames)
    for split in ["train", "val", "test"]:
        path = root / "annotations" / f"{split}.json"
        if split == "test" and not path.exists():
            continue
        samples = load(path, train=split == "train")
        if cfg.model.vision is None and not vlm:
            datasets[split] = data.FeatureDataset(samples, store, shuffle, root)
        else:
            files, train = {s["image_id"]: media(s) for s in samples}, split == "train" and cfg.data.augment
            skip_bad = cfg.data.skip_bad_files
            datasets[split] = data.MediaDataset(samples, store, shuffle, root, files, pixels, skip_bad, train, cfg.seed)
    return datasets


# ----------------------------------------------------------------------------------------------------------------
# Video-grounded dialogue (AVSD)


@dataclass(frozen=True)
class DialogueConfig(GenerationConfig):
    max_len: int = 20
    max_turns: int = 3
    """Earlier question/answer pairs kept as history."""
    use_caption: bool = True
    """Put the video's caption and summary in front of the dialog."""
    features: tuple[str, ...] | None = None
    """Feature streams ROOT/features/NAME/ to use, concatenated along the feature axis (widths read from the files;
    a cache written by --cache-features NAME is one). Unset: i3d_flow i3d_rgb vggish; with --model.vision none
    (`--features vggish --model.vision-tokens 1` adds the audio beside the frames, frame by frame)."""


class DialogueTask(LMTask):
    """Video-grounded dialogue (AVSD): answer the last question about a video, given caption and dialog history."""

    MARKERS = ("<speaker1>", "<speaker2>", "<video>", "<cap>")
    VISUAL = "<video>"

    cfg: DialogueConfig

    def build_datasets(self) -> dict[str, Dataset]:
        """Features, or with --model.vision ROOT/videos/{image_id}.{mp4,webm,avi,mkv}. The embedded default has
        videos (and vggish features) with --model.vision or a stream that is not AVSD's (a cache)."""
        cfg = self.cfg
        if cfg.data.features:
            raise InputError("dialogue reads its feature streams from --features (e.g. --features NAME vggish)")
        pixels_only = cfg.model.vision or self.vlm
        streams = cfg.features if cfg.features is not None else () if pixels_only else tuple(data.AVSD_STREAMS)
        pixels = cfg.model.vision is not None or self.vlm or not set(streams) <= set(data.AVSD_STREAMS)
        make = embedded.make_embedded_avsd
        root = cfg.data.root or embedded.embedded_root(cfg.data.cache_dir, embedded.EMBEDDED_VERSION, make, pixels)
        widths = {s: data.AVSD_STREAMS.get(s) for s in streams}
        store = data.FeatureStore(root / "features", widths, cfg.data.max_feature_len) if streams else None
        load = functools.partial(data.load_avsd, max_turns=cfg.max_turns)
        return load_splits(cfg, root, store, load, functools.partial(data.video_file, root), self.vlm)

    def training_texts(self, train_set: Dataset) -> list[str]:
        return [t for s in train_set.samples for t in (s["caption"], s["summary"], s["question"], s["answer"])]

    def conversation(self, sample: dict, train: bool) -> models.Conversation:
        """The video's frames; the dialog so far as turns, the caption and summary in front of the first question."""
        turns = [*itertools.chain(*sample["history"]), sample["question"]]
        if self.cfg.use_caption:
            turns[0] = f"{sample['caption']} {sample['summary']}\n{turns[0]}"
        return models.Conversation(sample["pixels"], turns, sample["answer"] if train else None, video=True)

    def collate(self, samples: list[dict], train: bool) -> dict:
        """Packs [video frames | caption | history | question | <speaker2> answer] per sample; token types are
        <video>, <cap>, <speaker1> (questions), <speaker2> (answers). Train: right-padded, labels only on the
        answer and its <eos>. Eval: the prompt up to <speaker2>, left-padded so beam search continues each row."""
        if self.vlm:
            return self.vlm_batch(samples, train)
        tok, sep = self.token, self.separator
        texts = [[s["caption"] + " " + s["summary"], *itertools.chain(*s["history"]), s["question"]] for s in samples]
        encoded = self.token_ids([t for ts in texts for t in ts] + [s["answer"] for s in samples])
        answers, parts = encoded[-len(samples) :], iter(encoded)
        prompts = []
        for s, ts, answer in zip(samples, texts, answers, strict=True):
            caption, *history, question = itertools.islice(parts, len(ts))
            frames = self.visual_len(s)
            budget = self.max_positions - frames - 1 - (len(answer) + 1 if train else self.cfg.max_len)
            if budget < 1:
                raise InputError(
                    f"sample {s['id']}: {frames} feature frames leave no room for text in the model's "
                    f"{self.max_positions} positions: lower --data.max-feature-len"
                )
            while True:
                segments = [(tok["<cap>"], caption)] if self.cfg.use_caption else []
                segments += [(tok["<speaker1>"] if i % 2 == 0 else tok["<speaker2>"], t) for i, t in enumerate(history)]
                segments.append((tok["<speaker1>"], question))
                if not history or sum(len(t) + 1 + len(sep) for _, t in segments) <= budget:
                    break
                history = history[2:]  # drop the oldest question/answer pair
            ids, types = [], []
            for speaker, t in segments:
                ids += [speaker, *t, *sep]
                types += [speaker] * (len(t) + 1 + len(sep))
            ids, types = ids[-budget:], types[-budget:]  # still too long: cut the caption from the left
            prompts.append(([*ids, tok["<speaker2>"]], [*types, tok["<speaker2>"]]))
        return self.pack(samples, prompts, answers, train)


TASKS["dialogue"] = (DialogueTask, DialogueConfig())


# ----------------------------------------------------------------------------------------------------------------
# Image captioning (COCO Karpathy) and VQA (VQAv2): image features in front of the text


@dataclass(frozen=True)
class ImageGenerationConfig(GenerationConfig):
    feature_dim: int = data.IMAGE_FEATURE_DIM
    """Width D of the image features in ROOT/features/{image_id}.npy, (D,) pooled or (T, D) grid: 768 for ViT-B
    (CLIP, BLIP), 1024 for ViT-L. Keep --data.max-feature-len >= T for grid features (it truncates them)."""
    best_metric: str = "agg_metrics"

    def __post_init__(self):
        super().__post_init__()
        at_least(self, feature_dim=1)


def image_datasets(cfg: ImageGenerationConfig, version: str, make_embedded, load, vlm=False) -> dict[str, Dataset]:
    """Features ROOT/features/{id}.npy (--data.features NAME: ROOT/features/NAME/{id}.npy), or with --model.vision
    (or a `vlm`) images ROOT/images/{entry's "image"}. The embedded default has images with either of those flags."""
    pixels = cfg.model.vision is not None or cfg.data.features is not None or vlm
    root = cfg.data.root or embedded.embedded_root(cfg.data.cache_dir, version, make_embedded, pixels)
    store = None
    if cfg.data.features:
        store = data.FeatureStore(root / "features", {cfg.data.features: None}, cfg.data.max_feature_len)
    elif cfg.model.vision is None and not vlm:
        store = data.FeatureStore(root, {"features": cfg.feature_dim}, cfg.data.max_feature_len)
    return load_splits(cfg, root, store, load, functools.partial(data.image_file, root), vlm)


@dataclass(frozen=True)
class CaptioningConfig(ImageGenerationConfig):
    """Image captioning: GenerationConfig's beam search settings as they are."""


class CaptioningTask(LMTask):
    """Image captioning (COCO Karpathy): describe an image; Bleu, METEOR, ROUGE_L, CIDEr against its references."""

    MARKERS = ("<image>", "<cap>")
    VISUAL = "<image>"

    cfg: CaptioningConfig

    def build_datasets(self) -> dict[str, Dataset]:
        make = embedded.make_embedded_captions
        return image_datasets(self.cfg, embedded.CAPTIONS_VERSION, make, data.load_captions, self.vlm)

    def training_texts(self, train_set: Dataset) -> list[str]:
        return [s["caption"] for s in train_set.samples]

    PROMPT = "Provide a one-sentence caption for the provided image."  # LLaVA-1.5's COCO caption prompt

    def conversation(self, sample: dict, train: bool) -> models.Conversation:
        return models.Conversation(sample["pixels"], [self.PROMPT], sample["caption"] if train else None)

    def collate(self, samples: list[dict], train: bool) -> dict:
        """[image | <cap> caption <eos>], token types <image> and <cap>; eval prompts end at <cap>."""
        if self.vlm:
            return self.vlm_batch(samples, train)
        cap = self.token["<cap>"]
        captions = self.token_ids([s["caption"] for s in samples]) if train else [[] for _ in samples]
        captions = [c[: self.max_positions - self.visual_len(s) - 2] for s, c in zip(samples, captions, strict=True)]
        return self.pack(samples, [([cap], [cap]) for _ in samples], captions, train)

    def after_evaluation(self, results: list[dict], split: str) -> dict[str, float]:
        metrics = super().after_evaluation(results, split)
        if metrics:
            metrics["agg_metrics"] = metrics["CIDEr"] + metrics["Bleu_4"]  # LAVIS's checkpoint selection
        return metrics


TASKS["captioning"] = (CaptioningTask, CaptioningConfig())


@dataclass(frozen=True)
class VQAConfig(ImageGenerationConfig):
    num_beams: int = 3
    max_len: int = 10
    inference_method: Literal["generate", "rank"] = "generate"
    """generate: beam search (--num-beams --max-len --min-len). rank: of the answer list, the candidate with the
    highest log-likelihood after the question (summed over its tokens and <eos>)."""
    answer_list: Path | None = None
    """rank: a JSON list of candidate answers. Unset: the --num-answers most frequent training answers."""
    num_answers: int = 3128
    """rank without --answer-list: how many of the most frequent (normalised) training answers are candidates."""
    num_ans_candidates: int = 128
    """rank: candidates per question scored in full, picked by the probability of their first token (LAVIS's
    shortlist: scoring thousands of answers per question in full is too slow); 0: score every candidate."""
    rank_batch_size: int = 1024
    """rank: (question, candidate answer) pairs scored per forward pass."""

    def __post_init__(self):
        super().__post_init__()
        at_least(self, num_answers=1, rank_batch_size=1, num_ans_candidates=0)
        if self.answer_list is not None and not self.answer_list.is_file():
            raise ValueError(f"--answer-list file not found: {self.answer_list}")


class VQATask(LMTask):
    """Visual question answering (VQAv2): answer a question about an image; VQA accuracy, overall and per type."""

    MARKERS = ("<image>", "<question>", "<answer>")
    VISUAL = "<image>"

    cfg: VQAConfig

    def build_datasets(self) -> dict[str, Dataset]:
        return image_datasets(self.cfg, embedded.VQA_VERSION, embedded.make_embedded_vqa, data.load_vqa, self.vlm)

    def training_texts(self, train_set: Dataset) -> list[str]:
        return [t for s in train_set.samples for t in (s["question"], metrics.consensus_answer(s["answers"]))]

    SCORED: typing.ClassVar[dict[str, str]] = {"answers": "answers", "answer_types": "answer_type"}
    PROMPT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's VQAv2 prompt, after the question

    def conversation(self, sample: dict, train: bool) -> models.Conversation:
        answer = metrics.consensus_answer(sample["answers"]) if train else None
        return models.Conversation(sample["pixels"], [sample["question"] + self.PROMPT], answer)

    def build_model(self, train_set: Dataset, tokenizer_dir: Path) -> nn.Module:
        model = super().build_model(train_set, tokenizer_dir)
        if self.cfg.inference_method == "rank":
            self.candidates = self.answer_candidates(train_set)
            if self.vlm:
                return model
            answers = [[*a, self.token["<eos>"]] for a in self.token_ids(self.candidates)]
            self.candidate_ids = data.pad(answers, self.token["<pad>"])
            self.candidate_mask = data.pad([[1] * len(a) for a in answers], 0).bool()
        return model

    def answer_candidates(self, train_set: Dataset) -> list[str]:
        if self.cfg.answer_list is None:
            counts = collections.Counter(metrics.consensus_answer(s["answers"]) for s in train_set.samples)
            return [a for a, _ in counts.most_common(self.cfg.num_answers) if a]  # "a" normalises to nothing
        answers = data.read_json(self.cfg.answer_list)
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise InputError(f"--answer-list {self.cfg.answer_list}: expected a non-empty JSON list of answers")
        return answers

    def collate(self, samples: list[dict], train: bool) -> dict:
        """[image | question <answer> answer <eos>], token types <image>, <question>, <answer>; eval prompts end at
        <answer>. Training learns the most common of the human answers (normalised)."""
        if self.vlm:
            return self.vlm_batch(samples, train)
        tok = self.token
        questions = self.token_ids([s["question"] for s in samples])
        answers = (
            self.token_ids([metrics.consensus_answer(s["answers"]) for s in samples])
            if train
            else [[] for _ in samples]
        )
        prompts = []
        for s, question, answer in zip(samples, questions, answers, strict=True):
            question = question[: self.max_positions - self.visual_len(s) - 2 - max(len(answer), self.cfg.max_len)]
            prompts.append(([*question, tok["<answer>"]], [tok["<question>"]] * len(question) + [tok["<answer>"]]))
        batch = self.pack(samples, prompts, answers, train)
        if not train:
            batch["answers"] = [s["answers"] for s in samples]
            batch["answer_types"] = [s["answer_type"] for s in samples]
        return batch

    def valid_step(self, model: nn.Module, batch: dict) -> list[dict]:
        rank = self.rank_conversations if self.vlm else self.rank
        predictions = (self.generate if self.cfg.inference_method == "generate" else rank)(model, batch)
        rows = zip(batch["ids"], predictions, batch["answers"], batch["answer_types"], strict=True)
        return [{"id": i, "prediction": p, "answers": a, "answer_type": t} for i, p, a, t in rows]

    @torch.no_grad()
    def rank(self, model: nn.Module, batch: dict) -> list[str]:
        """Shortlists --num-ans-candidates answers per question by their first token's probability after the
        prompt, then scores each (question, answer) pair in full: the left-padded prompt row followed by the
        answer's tokens (right-padded, masked), labelled on the answer only; --rank-batch-size pairs per pass."""
        device = batch["input_ids"].device
        candidates, candidate_mask = self.candidate_ids.to(device), self.candidate_mask.to(device)
        n_questions, n_candidates = len(batch["ids"]), len(self.candidates)
        shortlist = torch.arange(n_candidates, device=device).expand(n_questions, -1)
        if 0 < self.cfg.num_ans_candidates < n_candidates:
            first_token = model.run_lm(batch).logits[:, -1].float().log_softmax(-1)[:, candidates[:, 0]]
            shortlist = first_token.topk(self.cfg.num_ans_candidates, dim=1).indices
        scores = torch.empty(shortlist.numel(), device=device)
        # Each image encoded once (a tower would run per pair otherwise); the pairs carry its tokens.
        visual = dict(zip(("features", "feature_mask"), model.vision(batch), strict=True))
        prompts = {**batch, "labels": torch.full_like(batch["input_ids"], models.IGNORE)}
        for pairs in torch.arange(len(scores), device=device).split(self.cfg.rank_batch_size):
            question, answer = pairs // shortlist.shape[1], shortlist.flatten()[pairs]
            answer_ids, answer_mask = candidates[answer], candidate_mask[answer]
            appended = {
                "input_ids": answer_ids,
                "token_type_ids": torch.full_like(answer_ids, self.token["<answer>"]),
                "attention_mask": answer_mask.long(),
                "is_visual": torch.zeros_like(answer_mask),
                "visual_index": torch.zeros_like(answer_ids),
                "labels": answer_ids.masked_fill(~answer_mask, models.IGNORE),
            }
            rows = {k: v[question] for k, v in visual.items()}
            rows |= {k: torch.cat([prompts[k][question], v], 1) for k, v in appended.items()}
            scores[pairs] = model.log_likelihood(rows).float()
        best = shortlist.gather(1, scores.view(shortlist.shape).argmax(1, keepdim=True))
        return [self.candidates[i] for i in best.flatten().tolist()]

    @torch.no_grad()
    def rank_conversations(self, model: nn.Module, batch: dict) -> list[str]:
        """rank with a pretrained VLM: the shortlist as `rank` makes it, then each (question, candidate) conversation
        scored whole as training writes it (models.ChatFormat), its images included: --rank-batch-size per pass."""
        device = batch["input_ids"].device
        questions, n_candidates = batch["conversations"], len(self.candidates)
        shortlist = torch.arange(n_candidates).expand(len(questions), -1)
        if 0 < self.cfg.num_ans_candidates < n_candidates:
            prompt = self.chat.prompt(questions[0])  # how an answer starts after the generation prompt
            first = torch.tensor([self.chat.answer_ids(prompt, a)[0] for a in self.candidates])
            first_token = model.next_token_logits(batch).cpu().log_softmax(-1)[:, first]
            shortlist = first_token.topk(self.cfg.num_ans_candidates, dim=1).indices
        scores = torch.empty(shortlist.numel())
        for pairs in torch.arange(len(scores)).split(self.cfg.rank_batch_size):
            pairs_of = [(questions[p // shortlist.shape[1]], shortlist.flatten()[p]) for p in pairs.tolist()]
            scored = self.chat([dataclasses.replace(q, answer=self.candidates[a]) for q, a in pairs_of], train=True)
            scored = {k: v.to(device) if torch.is_tensor(v) else v for k, v in scored.items()}
            scores[pairs] = model.log_likelihood(scored).float().cpu()
        best = shortlist.gather(1, scores.view(shortlist.shape).argmax(1, keepdim=True))
        return [self.candidates[i] for i in best.flatten().tolist()]

    def after_evaluation(self, results: list[dict], split: str) -> dict[str, float]:
        if not self.cfg.report_metric or not any(r["answers"] for r in results):
            return {}  # a split without answers (VQAv2 test-dev): predictions are written, nothing to score
        scores = metrics.vqa_accuracy(results)
        return scores | {"agg_metrics": scores["accuracy"]}


TASKS["vqa"] = (VQATask, VQAConfig())


# ----------------------------------------------------------------------------------------------------------------
# Encoder tasks (retrieval, classification): image features next to a BERT-like text encoder


@dataclass(frozen=True)
class EncoderConfig(TaskConfig):
    """Tasks that read images' features and encode text with a BERT-like encoder."""

    feature_dim: int = data.IMAGE_FEATURE_DIM
    """Width D of the image features in ROOT/features/{image_id}.npy, (D,) pooled or (T, D) grid: 768 for ViT-B
    (CLIP, BLIP), 1024 for ViT-L. Keep --data.max-feature-len >= T for grid features (it truncates them)."""
    max_text_len: int = 40
    """Most tokens per text, [CLS] and [SEP] included (longer texts are cut)."""

    def __post_init__(self):
        super().__post_init__()
        at_least(self, feature_dim=1, max_text_len=3)
        why = "retrieval and classification have no LM to feed (it is for dialogue, captioning, vqa)"
        models.refuse_set(self.model, {why: ("projector", "video_loss_weight", "chat_template")}, "--model.")


class EncoderTask(BaseTask):
    """Shared by the encoder tasks: the tokenizer (BERT's special tokens), text encoding and image batches."""

    SPECIAL: typing.ClassVar[dict] = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}

    cfg: EncoderConfig

    def text_encoder(self, texts, tokenizer_dir: Path) -> nn.Module:
        """The tokenizer (trained on `texts()` unless pretrained or saved) and the text encoder."""
        cfg = self.cfg.model
        self.tokenizer = models.build_tokenizer(cfg, tokenizer_dir, self.SPECIAL, texts, "[CLS] $A [SEP]")
        return models.build_text_encoder(cfg, self.tokenizer)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts framed as the tokenizer frames one ([CLS] text [SEP], <s> text </s>), cut to --max-text-len, padded."""
        out = self.tokenizer(
            texts, truncation=True, max_length=self.cfg.max_text_len, padding=True, padding_side="right"
        )
        return {k: torch.tensor(out[k]) for k in ("input_ids", "attention_mask")}


# ----------------------------------------------------------------------------------------------------------------
# Image-text retrieval (COCO, Flickr30k)


@dataclass(frozen=True)
class RetrievalConfig(EncoderConfig):
    embed_dim: int = 256
    """Width of the shared image-text embedding space."""
    temperature: float = 0.07
    """Initial temperature of the contrastive loss (learned; 1/temperature is clamped to [1, 100])."""

    def __post_init__(self):
        super().__post_init__()
        at_least(self, embed_dim=1)
        if not 0.01 <= self.temperature <= 1:
            raise ValueError(f"--temperature must be in [0.01, 1], got {self.temperature}")


class RetrievalTask(EncoderTask):
    """Image-text retrieval (COCO/Flickr style): a dual encoder trained contrastively, scored by recall@1/5/10."""

    cfg: RetrievalConfig
    TOP_K = 5  # gallery ids kept per query in the results file (the ranks give the recalls)
    CHUNK = 1024  # queries scored at a time: a 25k x 5k evaluation never holds the whole similarity matrix

    def build_datasets(self) -> dict[str, Dataset]:
        """The captioning layout and its embedded default (COCO/Flickr retrieval annotations have the same shape)."""
        return image_datasets(self.cfg, embedded.CAPTIONS_VERSION, embedded.make_embedded_captions, self.load)

    @staticmethod
    def load(path: Path, train: bool) -> list[dict]:
        """Captions as for captioning, plus `image_index` numbering the split's images (its captions are positives)."""
        samples = data.load_captions(path, train)
        index = {}
        for sample in samples:
            sample["image_index"] = index.setdefault(sample["image_id"], len(index))
        return samples

    def build_model(self, train_set: Dataset, tokenizer_dir: Path) -> nn.Module:
        encoder = self.text_encoder(lambda: (s["caption"] for s in train_set.samples), tokenizer_dir)
        return models.DualEncoder(encoder, self.build_vision(train_set), self.cfg.embed_dim, self.cfg.temperature)

    def collate(self, samples: list[dict], train: bool) -> dict:
        """Train: matching (image, caption) pairs. Eval: images with all their captions (`text_owner` says whose)."""
        batch = {**self.visual_batch(samples), "ids": [s["id"] for s in samples]}
        if train:
            batch.update(self.encode([s["caption"] for s in samples]))
            batch["image_index"] = torch.tensor([s["image_index"] for s in samples])
        else:
            batch.update(self.encode([c for s in samples for c in s["references"]]))
            batch["text_owner"] = torch.tensor([i for i, s in enumerate(samples) for _ in s["references"]])
        return batch

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE (image→text and text→image, averaged) of this rank's pairs against the whole global
        batch: embeddings are all-gathered with a differentiable gather, whose backward sums every rank's gradient
        into the embeddings it came from. So the per-rank sums add up to the one-process loss on the global batch,
        and the loop's normalisation (x world / global count after DDP's mean) gives its exact gradient. Captions
        of the same image are all positives (LAVIS's soft targets over `image_index`). With --grad-accum > 1 the
        negatives are those of one micro-batch on all ranks: a contrastive loss does not split over micro-batches."""
        images, texts, scale = model(batch)
        groups = batch["image_index"]
        all_images, all_texts, all_groups = gather_batch(images), gather_batch(texts), gather_batch(groups)
        positives = (groups[:, None] == all_groups[None, :]).float()
        targets = positives / positives.sum(1, keepdim=True)
        image_to_text = nn.functional.cross_entropy(scale * images @ all_texts.T, targets, reduction="sum")
        text_to_image = nn.functional.cross_entropy(scale * texts @ all_images.T, targets, reduction="sum")
        return (image_to_text + text_to_image) / 2, torch.tensor(len(groups), device=groups.device)

    def valid_step(self, model: nn.Module, batch: dict) -> list[dict]:
        images = model.embed_images(batch).cpu()
        texts = model.embed_texts(batch["input_ids"], batch["attention_mask"]).cpu()
        owner = batch["text_owner"].cpu()
        return [{"id": i, "image": images[n], "texts": texts[owner == n]} for n, i in enumerate(batch["ids"])]

    @torch.no_grad()
    def evaluation(self, model: nn.Module, loader, move) -> list[dict]:
        """Every rank embeds its shard of images and their captions; the embeddings are gathered, each rank ranks
        the gallery for its share of the queries (in chunks), and only ranks and top ids are gathered back."""
        encoded = super().evaluation(model, loader, move)
        images = torch.stack([e["image"] for e in encoded])
        texts = torch.cat([e["texts"] for e in encoded])
        text_owner = torch.tensor([n for n, e in enumerate(encoded) for _ in range(len(e["texts"]))])
        image_ids = [e["id"] for e in encoded]
        text_ids = [f"{e['id']}#{k}" for e in encoded for k in range(len(e["texts"]))]
        image_owner = torch.arange(len(images))  # an image query's positives: the texts it owns
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        results = []
        for kind, queries, owner, query_ids, gallery, gallery_owner, gallery_ids in (
            ("image", images, image_owner, image_ids, texts, text_owner, text_ids),
            ("text", texts, text_owner, text_ids, images, image_owner, image_ids),
        ):
            mine = torch.arange(len(queries))[rank::world]
            ranks, top = metrics.retrieval_ranks(
                queries[mine], owner[mine], gallery, gallery_owner, self.TOP_K, self.CHUNK
            )
            for q, r, t in zip(mine.tolist(), ranks.tolist(), top.tolist(), strict=True):
                results.append({"id": f"{kind} {query_ids[q]}", "rank": r, "top": [gallery_ids[i] for i in t]})
        return gather_results(results)

    def after_evaluation(self, results: list[dict], split: str) -> dict[str, float]:
        ranks = {kind: [r["rank"] for r in results if r["id"].startswith(kind + " ")] for kind in ("image", "text")}
        return metrics.recall_metrics(ranks["image"], ranks["text"])


TASKS["retrieval"] = (RetrievalTask, RetrievalConfig())


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` (same shape) concatenated on dim 0, differentiable: each part's gradient returns to its rank."""
    if not dist.is_initialized():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


# ----------------------------------------------------------------------------------------------------------------
# Multimodal classification (SNLI-VE): does the image entail, contradict or leave open the sentence?


@dataclass(frozen=True)
class ClassificationConfig(EncoderConfig):
    """Visual entailment: the image and the sentence through one encoder, three classes."""


class ClassificationTask(EncoderTask):
    """Multimodal classification (SNLI-VE style): entailment / neutral / contradiction, scored by accuracy."""

    cfg: ClassificationConfig
    LABELS = data.SNLI_VE_LABELS

    def build_datasets(self) -> dict[str, Dataset]:
        return image_datasets(
            self.cfg, embedded.SNLI_VE_VERSION, embedded.make_embedded_snli_ve, lambda p, train: data.load_snli_ve(p)
        )

    def build_model(self, train_set: Dataset, tokenizer_dir: Path) -> nn.Module:
        encoder = self.text_encoder(lambda: (s["sentence"] for s in train_set.samples), tokenizer_dir)
        return models.FusionClassifier(encoder, self.build_vision(train_set), len(self.LABELS))

    def collate(self, samples: list[dict], train: bool) -> dict:
        batch = {**self.visual_batch(samples), **self.encode([s["sentence"] for s in samples])}
        return {**batch, "labels": torch.tensor([s["label"] for s in samples]), "ids": [s["id"] for s in samples]}

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss = nn.functional.cross_entropy(model(batch), batch["labels"], reduction="sum")
        return loss, torch.tensor(len(batch["ids"]), device=loss.device)

    def valid_step(self, model: nn.Module, batch: dict) -> list[dict]:
        rows = zip(batch["ids"], batch["labels"].tolist(), model(batch).argmax(-1).tolist(), strict=True)
        return [{"id": i, "label": self.LABELS[y], "prediction": self.LABELS[p]} for i, y, p in rows]

    def after_evaluation(self, results: list[dict], split: str) -> dict[str, float]:
        return metrics.accuracy_metrics([r["prediction"] for r in results], [r["label"] for r in results], self.LABELS)


TASKS["classification"] = (ClassificationTask, ClassificationConfig())


# ----------------------------------------------------------------------------------------------------------------
# Configs ↔ YAML (presets in configs/, config.yaml in every run dir). Plain data only: safe_load, no tags.


def config_to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_from_dict(default, values: dict, where: str):
    """`default` with `values` applied; unknown keys and wrong types are errors that name the key."""
    if not isinstance(values, dict):
        raise InputError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(default)}
    hints = typing.get_type_hints(type(default))
    changes = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(f"{where}: unknown key {key!r}{hint}")
        current = getattr(default, key)
        if dataclasses.is_dataclass(current):
            changes[key] = config_from_dict(current, value or {}, f"{where}: {key}")
        else:
            changes[key] = _coerce(value, hints[key], f"{where}: {key}")
    try:
        return dataclasses.replace(default, **changes)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


def _coerce(value, hint, where: str):
    """YAML scalars/lists → the field's type (Path, tuple, Literal, int/float/bool/str, optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(value, hint, where)
    if origin is Literal:
        if value not in args:
            raise InputError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise InputError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def load_preset(path: Path, task: str, default: TaskConfig) -> TaskConfig:
    import yaml

    if not path.is_file():
        raise InputError(f"--config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"malformed YAML in {path}: {e}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a mapping of config keys")
    values = dict(values)
    preset_task = values.pop("task", task)
    if preset_task != task:
        raise InputError(f"{path} is a preset for task {preset_task!r}, not {task!r}")
    return config_from_dict(default, values, str(path))


def unknown_task_message(name: str) -> str:
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown task {name!r}{hint} (tasks: {', '.join(TASKS)})"
