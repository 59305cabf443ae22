"""Tasks: what a model is, what data it reads, what a train and a validation step are, and how results become metrics.

A task is three things next to each other in this file: a frozen config dataclass (its fields are the CLI flags,
their docstrings the `--help`), a task class, and one entry in `TASKS`. `train.py` knows nothing else about tasks.
"""

import dataclasses
import difflib
import shutil
import sys
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
from data import InputError
from models import ModelConfig

# ----------------------------------------------------------------------------------------------------------------
# Config shared by every task


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
    """Ablation: give every sample the features of another video. A grounded model must score clearly worse."""

    def __post_init__(self):
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"--data.root {self.root} is not a directory")
        if self.num_workers < 0 or self.max_feature_len < 1:
            raise ValueError("--data.num-workers must be >= 0 and --data.max-feature-len >= 1")


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
    log_every: int = 10
    """Log training metrics every N steps."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    compile: bool = False
    """torch.compile the model for training (GPU; the first steps are slow while it compiles)."""
    best_metric: str = "agg_metrics"
    """Validation metric that picks the best checkpoint."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a higher or lower --best-metric is better."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    wandb: WandbConfig = WandbConfig()

    def __post_init__(self):
        positive = ["max_steps", "max_epochs", "batch_size", "eval_batch_size", "grad_accum", "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.evaluate and self.resume is None:
            raise ValueError("--evaluate needs a checkpoint: pass --resume PATH (or --resume auto with --output-dir)")
        if self.resume == "auto" and self.output_dir is None:
            raise ValueError("--resume auto needs --output-dir (the run to continue)")


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
        if self.num_beams < 1:
            raise ValueError(f"--num-beams must be >= 1, got {self.num_beams}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"need 0 <= --min-len <= --max-len, got --min-len {self.min_len} --max-len {self.max_len}")


# ----------------------------------------------------------------------------------------------------------------
# The base task


class BaseTask:
    """The contract train.py relies on. Results are lists of dicts with a unique `id`."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def build_datasets(self) -> dict[str, Dataset]:
        """{"train": ..., "val": ..., optionally "test": ...}."""
        raise NotImplementedError

    def build_model(self, train_set: Dataset, tokenizer_dir: Path) -> nn.Module:
        """The model; `tokenizer_dir` holds the run's tokenizer (loaded if there, else built and saved there)."""
        raise NotImplementedError

    def collate(self, samples: list[dict], train: bool) -> dict:
        """Samples → batch (runs in DataLoader workers). Tensors go to the device; everything else stays as is."""
        raise NotImplementedError

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
        if dist.is_initialized():
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, results)
            results = [r for shard in shards for r in shard]
        return sorted({r["id"]: r for r in results}.values(), key=lambda r: r["id"])

    def after_evaluation(self, results: list[dict], split: str) -> dict[str, float]:
        """Results → metrics (rank 0 only). Must include the config's `best_metric` when metrics are reported."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# Caption metrics (captioning, dialogue): the COCO caption scorer, ground truth built from the split itself


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Bleu_1..4, METEOR, ROUGE_L, CIDEr with pycocoevalcap. The PTB tokenizer and METEOR need Java; without it
    the text is tokenized in Python and METEOR is skipped (said on stderr), so numbers stay comparable otherwise."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
        gts = tokenizer.tokenize({i: [{"caption": r} for r in references[i]] for i in ids})
        scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"])]
    else:
        print("warning: java not found: Python tokenizer instead of PTB, METEOR skipped", file=sys.stderr)
        res = {i: [simple_tokenize(predictions[i])] for i in ids}
        gts = {i: [simple_tokenize(r) for r in references[i]] for i in ids}
        scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    scorers += [(Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    metrics = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(gts, res)
        metrics.update(zip(names, score if isinstance(score, list) else [score], strict=True))
    return {k: float(v) for k, v in metrics.items()}


def simple_tokenize(text: str) -> str:
    """Fallback for the PTB tokenizer: lower case, punctuation removed (what PTB + COCO's filter amount to)."""
    kept = "".join(c if c.isalnum() or c.isspace() or c == "'" else " " for c in text.lower())
    return " ".join(kept.split())


# ----------------------------------------------------------------------------------------------------------------
# Video-grounded dialogue (AVSD)


@dataclass(frozen=True)
class DialogueConfig(GenerationConfig):
    num_beams: int = 5
    max_len: int = 20
    min_len: int = 1
    max_turns: int = 3
    """Earlier question/answer pairs kept as history."""
    use_caption: bool = True
    """Put the video's caption and summary in front of the dialog."""
    features: tuple[Literal["i3d_flow", "i3d_rgb", "vggish"], ...] = ("i3d_flow", "i3d_rgb", "vggish")
    """Feature streams to use (concatenated along the feature axis)."""


class DialogueTask(BaseTask):
    """Video-grounded dialogue (AVSD): answer the last question about a video, given caption and dialog history."""

    SPECIAL: typing.ClassVar[dict] = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<speaker1>", "<speaker2>", "<video>", "<cap>"],
    }

    cfg: DialogueConfig

    def build_datasets(self) -> dict[str, Dataset]:
        cfg = self.cfg
        root = cfg.data.root or data.embedded_root(cfg.data.cache_dir, data.EMBEDDED_VERSION, data.make_embedded_avsd)
        streams = {s: data.AVSD_STREAMS[s] for s in cfg.features}
        store = data.FeatureStore(root / "features", streams, cfg.data.max_feature_len)
        datasets = {}
        for split in ["train", "val", "test"]:
            path = root / "annotations" / f"{split}.json"
            if split == "test" and not path.exists():
                continue
            samples = data.load_avsd(path, train=split == "train", max_turns=cfg.max_turns)
            datasets[split] = data.FeatureDataset(samples, store, "image_id", cfg.data.shuffle_features)
        return datasets

    def build_model(self, train_set: Dataset, tokenizer_dir: Path) -> nn.Module:
        import models

        cfg = self.cfg.model
        if cfg.name is not None:
            self.tokenizer = models.load_tokenizer(cfg.name, self.SPECIAL)
        elif (tokenizer_dir / "tokenizer.json").is_file():
            self.tokenizer = models.load_tokenizer(tokenizer_dir, self.SPECIAL)
        else:
            texts = [t for s in train_set.samples for t in (s["caption"], s["summary"], s["question"], s["answer"])]
            specials = [self.SPECIAL[k] for k in ("bos_token", "eos_token", "pad_token")]
            specials += self.SPECIAL["additional_special_tokens"]
            self.tokenizer = models.train_tokenizer(texts, cfg.vocab_size, specials)
            self.tokenizer.add_special_tokens(self.SPECIAL)
        if not (tokenizer_dir / "tokenizer.json").is_file() and (not dist.is_initialized() or dist.get_rank() == 0):
            self.tokenizer.save_pretrained(tokenizer_dir)
        self.token = {t: self.tokenizer.convert_tokens_to_ids(t) for t in self.tokenizer.all_special_tokens}
        lm = models.build_gpt2(cfg, self.tokenizer)
        self.max_positions = lm.config.n_positions
        return models.FeatureGPT2(lm, train_set.features.dim, cfg.video_loss_weight)

    def collate(self, samples: list[dict], train: bool) -> dict:
        """Packs [video frames | caption | history | question | <speaker2> answer] per sample; token types are
        <video>, <cap>, <speaker1> (questions), <speaker2> (answers). Train: right-padded, labels only on the
        answer and its <eos>. Eval: the prompt up to <speaker2>, left-padded so beam search continues each row."""
        tok, eos = self.token, self.token["<eos>"]
        texts = [
            [s["caption"] + " " + s["summary"], *(t for qa in s["history"] for t in qa), s["question"]] for s in samples
        ]
        # The Rust tokenizer directly: the transformers wrapper around it costs as much again, in every batch.
        encoded = self.tokenizer.backend_tokenizer.encode_batch(
            [t for ts in texts for t in ts] + [s["answer"] for s in samples], add_special_tokens=False
        )
        encoded = [e.ids for e in encoded]
        answers = encoded[-len(samples) :]
        rows = []
        offset = 0
        for s, ts, answer in zip(samples, texts, answers, strict=True):
            parts = encoded[offset : offset + len(ts)]
            offset += len(ts)
            caption, history, question = parts[0], parts[1:-1], parts[-1]
            frames = len(s["features"])
            budget = self.max_positions - frames - 1 - (len(answer) + 1 if train else self.cfg.max_len)
            while True:
                segments = [(tok["<cap>"], caption)] if self.cfg.use_caption else []
                segments += [(tok["<speaker1>"] if i % 2 == 0 else tok["<speaker2>"], t) for i, t in enumerate(history)]
                segments.append((tok["<speaker1>"], question))
                if not history or sum(len(t) + 2 for _, t in segments) <= budget:
                    break
                history = history[2:]  # drop the oldest question/answer pair
            ids, types = [], []
            for speaker, t in segments:
                ids += [speaker, *t, eos]
                types += [speaker] * (len(t) + 2)
            ids, types = ids[-budget:], types[-budget:]  # still too long: cut the caption from the left
            ids.append(tok["<speaker2>"])
            labels = [-100] * (frames + len(ids))
            if train:
                ids += [*answer, eos]
                labels += [*answer, eos]
            types += [tok["<speaker2>"]] * (len(ids) - len(types))
            rows.append((frames, ids, [tok["<video>"]] * frames + types, labels))
        batch = pack_features_and_text(rows, samples, pad_id=tok["<pad>"], left=not train)
        if train:
            batch["labels"] = data.pad([r[3] for r in rows], -100, left=False)
        else:
            batch["references"] = [[s["answer"]] for s in samples]
        batch["ids"] = [s["id"] for s in samples]
        return batch

    def valid_step(self, model: nn.Module, batch: dict) -> list[dict]:
        cfg = self.cfg
        eos, pad_id = self.token["<eos>"], self.token["<pad>"]
        generated = model.generate(batch, cfg.num_beams, cfg.max_len, cfg.min_len, eos, pad_id)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [
            {"id": i, "prediction": t.strip(), "references": r}
            for i, t, r in zip(batch["ids"], texts, batch["references"], strict=True)
        ]

    def after_evaluation(self, results: list[dict], split: str) -> dict[str, float]:
        if not self.cfg.report_metric:
            return {}
        metrics = caption_metrics(
            {r["id"]: r["prediction"] for r in results}, {r["id"]: r["references"] for r in results}
        )
        return metrics


def pack_features_and_text(rows, samples, pad_id: int, left: bool) -> dict:
    """rows = (n_frames, text_ids, token_types) per sample → one packed, padded sequence per sample, laid out as
    [frames | text]: `is_visual`/`visual_index` say which positions take which feature frame (see FeatureGPT2)."""
    features, _ = data.stack_features([s["features"] for s in samples])
    seqs = [[pad_id] * frames + ids for frames, ids, _, _ in rows]
    visual = [[1] * frames + [0] * len(ids) for frames, ids, _, _ in rows]
    return {
        "features": features,
        "input_ids": data.pad(seqs, pad_id, left),
        "token_type_ids": data.pad([types for _, _, types, _ in rows], pad_id, left),
        "attention_mask": data.pad([[1] * len(s) for s in seqs], 0, left),
        "is_visual": data.pad(visual, 0, left).bool(),
        "visual_index": data.pad([list(range(frames)) + [0] * len(ids) for frames, ids, _, _ in rows], 0, left),
    }


# ----------------------------------------------------------------------------------------------------------------
# The registry: task name → (task class, default config). Variants are dataclasses.replace of a default.

TASKS: dict[str, tuple[type[BaseTask], TaskConfig]] = {
    "dialogue": (DialogueTask, DialogueConfig()),
}


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
