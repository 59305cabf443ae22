"""Models and tokenizers, all from transformers (imported lazily: `train.py --help` must not pay for them).

`ModelConfig.name` unset builds a small GPT-2 (generative tasks) or BERT (encoder tasks) from a config and a BPE
tokenizer trained on the training text, so the default runs with no download; set, it is any causal LM
(`AutoModelForCausalLM`) or text encoder (`AutoModel`), by hub name or local directory, with its own tokenizer.
"""

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Literal, TypedDict, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from data import InputError


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = None
    """Pretrained model and its tokenizer: a hub name or a local directory saved with save_pretrained. Generative
    tasks: any causal LM (GPT-2, OPT, Llama, Qwen2, Mistral, Phi, SmolLM), or a pretrained vision-language model
    with its processor (AutoModelForImageTextToText: LLaVA, SmolVLM/Idefics3, Qwen2-VL, PaliGemma, BLIP-2), which reads
    the images or video frames itself; retrieval and classification: a text encoder (BERT, RoBERTa, DistilBERT,
    MiniLM; CLIP's text tower for retrieval). Unset: a small model built from the fields below and a tokenizer trained
    on the training split, so nothing is downloaded."""
    n_layer: int = 2
    """Layers of the small model (not with --model.name)."""
    n_head: int = 4
    """Attention heads of the small model (not with --model.name)."""
    n_embd: int = 128
    """Width of the small model (not with --model.name)."""
    n_positions: int = 512
    """Longest sequence (video frames + text tokens) of the small model (not with --model.name)."""
    vocab_size: int = 1000
    """BPE vocabulary trained for the small model (not with --model.name)."""
    dropout: float = 0.0
    """Dropout of the small model (not with --model.name). 0 by default: with 0.1 the small model reads its
    visual input later and less (the embedded AVSD's main job: from epoch 4 instead of 3)."""
    video_loss_weight: float = 0.0
    """Weight of LAVIS's auxiliary loss that regresses the next video frame from the hidden states; 0 turns it off."""
    projector: Literal["linear", "mlp"] = "linear"
    """How visual tokens enter the LM (generative tasks): `linear` (Linear, LayerNorm) or `mlp` (Linear, GELU,
    Linear, LayerNorm: the 2-layer MLP of LLaVA-1.5 and nanoVLM)."""
    freeze_lm: bool = False
    """Keep the pretrained language model (or text encoder) bitwise as loaded, as BLIP-2 does: only the visual
    side, the projector and the task's own embeddings (marker tokens, heads) train."""
    lora_r: int = 0
    """LoRA rank on the language model (or text encoder) through peft; 0: off. Only the adapters train in it."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA adapters' input."""
    lora_targets: tuple[str, ...] = ()
    """Module names LoRA adapts (e.g. q_proj v_proj); empty: every linear layer of the model's blocks, whatever
    the family calls them (peft's all-linear; the output head excluded), the QLoRA choice."""
    lm_lr: float | None = None
    """Peak learning rate of the language model or text encoder (its LoRA adapters with --model.lora-r), beside --lr,
    the rate of the new projector, embeddings and heads (nanoVLM, LLaVA: higher than the backbones'). Unset: for
    pretrained weights trained in full (--model.name, no --model.lora-r) the lower of --lr and 1e-4, a fine-tuning
    rate (docs/pretrained_lms.md); else --lr (the small model; LoRA's adapters, new weights too). Scales --min-lr."""
    grad_checkpointing: bool = False
    """Recompute the language model's activations in the backward pass: less memory, about a third more compute."""
    token_types: bool | None = None
    """Generative tasks: add each segment's marker embedding to every token of it and the visual marker's to the
    visual tokens (GPT-2's token types, as LAVIS's dialogue model adds them). Unset: on for the small model, off with
    --model.name, where the marker tokens alone delimit the segments: a pretrained LM never saw such a shift (with
    it, every input of a frozen LM is off what it learned). `--model.token-types True` adds them to any LM."""
    chat_template: bool = False
    """Generative tasks: wrap the visual tokens and every prompt in the tokenizer's chat template as one user turn,
    the target being the assistant's reply, ended by the template's end-of-turn token. Pass it for an
    instruction-tuned LM: in the format it was tuned on it reads the image far sooner (docs/pretrained_lms.md). Off
    by default: a base LM's tokenizer may carry a template whose tokens its LM never trained."""
    vision: str | None = None
    """Read raw images/videos through this vision tower instead of pre-extracted features: a transformers vision model
    (CLIP, SigLIP/SigLIP2, ViT, DINOv2, ...; of a CLIP/SigLIP checkpoint its vision half) and its image processor, by
    hub name or local directory; `small`: a random SigLIP-style tower (--model.vision-size, -width, -layers), no
    download. Images: ROOT/images/{entry's "image"}; videos: ROOT/videos/{image_id}.{mp4,webm,avi,mkv}."""
    freeze_vision: bool = True
    """Frozen tower (as BLIP-2; a pretrained VLM's own too): eval mode, no gradients, bf16 on GPU, not in the
    optimizer; checkpoints hold its digest, not its weights (README: lean checkpoints). --model.no-freeze-vision
    fine-tunes it at --model.vision-lr."""
    vision_lr: float | None = None
    """Peak learning rate of the tower when fine-tuned; unset: --lr."""
    vision_tokens: int = 0
    """Tokens per image (per frame): the tower's patch grid average-pooled to this many (a square: 1, 4, 9, ...); 0:
    every patch token. The CLS (and register) tokens are not used."""
    vision_size: int = 32
    """Input size in pixels of --model.vision small (patches of a quarter of it)."""
    vision_width: int = 128
    """Width of --model.vision small (a head per 32)."""
    vision_layers: int = 2
    """Layers of --model.vision small."""
    feature_norm: bool = True
    """Standardise each feature dimension with the mean and standard deviation of the training split's features
    (computed when the model is built, from up to 256 videos or images; kept in checkpoints). Real features have a
    large shared mean and dimensions of very different scales (I3D ~0.4, VGGish 0..255) that otherwise hide what
    varies between videos from the projector. Off: features enter as they are."""

    def lm_rate(self, lr: float) -> float:
        """The language model's (or text encoder's) peak learning rate when --lr is `lr` (see lm_lr)."""
        if self.lm_lr is not None:
            return self.lm_lr
        return min(lr, 1e-4) if self.name is not None and not self.lora_r else lr

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"--model.n-embd ({self.n_embd}) must be divisible by --model.n-head ({self.n_head})")
        if self.lora_r < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("need --model.lora-r >= 0 and 0 <= --model.lora-dropout < 1")
        if self.freeze_lm and self.lora_r:
            raise ValueError("--model.freeze-lm and --model.lora-r exclude each other (LoRA freezes the rest itself)")
        if self.vision_tokens < 0 or math.isqrt(self.vision_tokens) ** 2 != self.vision_tokens:
            raise ValueError(f"--model.vision-tokens must be 0 or a square (1, 4, 9, ...), got {self.vision_tokens}")
        if self.vision_size < 4 or self.vision_size % 4 or self.vision_width % 32:
            raise ValueError("--model.vision-size must be a multiple of 4, --model.vision-width one of 32")
        unused = {
            "the pretrained model has its own (--model.name)": SMALL_MODEL if self.name else (),
            "LoRA is off (--model.lora-r 0)": () if self.lora_r else ("lora_alpha", "lora_dropout", "lora_targets"),
            # a pretrained VLM (--model.name) has a tower of its own: the task refuses these where --model.name has none
            "there is no vision tower (--model.vision)": VISION[2 if self.name else 0 :] if self.vision is None else (),
            "the tower is frozen (--model.freeze-vision)": ("vision_lr",) if self.freeze_vision else (),
            "--model.vision is not small": VISION[-3:] if self.vision not in (None, "small") else (),
        }
        refuse_set(self, unused, "--model.")


SMALL_MODEL = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "dropout")
VISION = ("freeze_vision", "vision_lr", "vision_tokens", "vision_size", "vision_width", "vision_layers")


def refuse_set(cfg, unused: dict[str, tuple[str, ...]], prefix: str) -> None:
    """A field given a value (other than its default) where it does not apply is an error, never ignored: `unused`
    maps why it does not apply to the fields."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for why, names in unused.items():
        for name in names:
            if getattr(cfg, name) != defaults[name]:
                raise ValueError(f"{prefix}{name.replace('_', '-')} does not apply: {why}")


# ----------------------------------------------------------------------------------------------------------------
# Loading pretrained models; tokenizers


class LoadError(InputError):
    """What --model.`field` names (name, vision) cannot be loaded: one line that starts with the flag (train.py names
    the --config file instead when the name came from it)."""

    def __init__(self, field: str, name: str, reason: str):
        super().__init__(f"--model.{field} {name}: {reason}")
        self.field, self.name, self.reason = field, name, reason


def pretrained(load: Callable, name: str, what: str, field: str = "name"):
    """`load(name)`; failing, one line saying what could not be loaded and what to pass instead."""
    local = Path(name).expanduser()
    if not local.is_dir() and name.startswith((".", "/", "~")):
        raise LoadError(field, name, f"cannot load the {what}: no directory {local}")
    try:
        return load(str(local) if local.is_dir() else name)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        hub = "not a local directory, and not on the hub or in its cache (offline? a mistyped name?)"
        reason = str(e).strip().splitlines()[0] if local.is_dir() else hub
        reason = f"cannot load the {what}: {reason}; pass a directory saved with save_pretrained"
        raise LoadError(field, name, reason) from None


def quiet_transformers() -> None:
    """transformers' load reports, resize notices and progress bars off for the run (its errors stay): the checks
    here say what matters, and stderr keeps the run's own progress bars."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_weights(auto, name: str, field: str = "name", spare: Callable = lambda model: set(), **kwargs):
    """`auto.from_pretrained(name)`, in float32 unless `kwargs` say. A checkpoint that lacks weights of the model its
    config describes (another architecture, a broken save) is an error naming them, never a silently re-initialised
    model, unless `spare(model)` names them (weights the output does not depend on); weights it has beyond the model
    are fine (heads left out: BERT's MLM head, CLIP's image tower). Weights of another shape make transformers refuse
    the checkpoint (its wording varies by release): then the report comes from the files' headers (`unfit_weights`)."""
    quiet_transformers()
    kwargs = dict(output_loading_info=True, dtype=torch.float32) | kwargs
    try:
        model, info = pretrained(partial(auto.from_pretrained, **kwargs), name, "model", field)
    except LoadError:
        report = unfit_weights(auto, name, kwargs) if Path(name).expanduser().is_dir() else None
        if report is None or not report[1]:  # no weight missing or misshapen: another reason, said as it is
            raise
        described, missing, unexpected = report
    else:
        described, missing = type(model).__name__, set(info["missing_keys"])
        missing, unexpected = sorted(missing - spare(model)) if missing else [], sorted(info["unexpected_keys"])
    if missing:
        reason = (
            f"its checkpoint does not fit {described}, the model its config.json describes: "
            f"{len(missing)} weights missing or of another shape ({', '.join(missing[:2])}, ...), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:2])}, ...)"
        )
        raise LoadError(field, name, reason)
    return model


def checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a save_pretrained directory, from the file headers (nothing is loaded)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            shapes |= {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
    for file in sorted(directory.glob("pytorch_model*.bin")):
        state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
        shapes |= {key: tuple(value.shape) for key, value in state.items()}
    return shapes


def unfit_weights(auto, name: str, kwargs: dict) -> tuple[str, list[str], list[str]] | None:
    """(model class, its weights the checkpoint lacks or has in another shape, checkpoint tensors the model lacks),
    comparing the model that the directory's config builds, on the meta device, with the checkpoint's headers;
    names are compared without the model's base prefix (`transformer.`, `bert.`), as transformers loads them. Tied
    weights count once. None when the directory holds no readable checkpoint or config."""
    from transformers import AutoConfig

    directory = Path(name).expanduser()
    try:
        shapes = checkpoint_shapes(directory)
        config = kwargs.get("config") or AutoConfig.from_pretrained(directory)
        extra = {k: v for k, v in kwargs.items() if k not in ("config", "dtype", "output_loading_info")}
        with torch.device("meta"):
            model = auto.from_config(config, **extra) if hasattr(auto, "from_config") else auto(config, **extra)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    prefix = f"{model.base_model_prefix}."

    def bare(key: str) -> str:
        return key.removeprefix(prefix)

    found = {bare(key): shape for key, shape in shapes.items()}
    names = {}  # a tied weight (GPT-2's lm_head and wte) is one tensor under several names: any one of them will do
    for key, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), (tuple(tensor.shape), []))[1].append(bare(key))
    missing = sorted(keys[0] for shape, keys in names.values() if all(found.get(key) != shape for key in keys))
    known = {key for _, keys in names.values() for key in keys}
    return type(model).__name__, missing, sorted(key for key in found if key not in known)


def adapt(model, cfg: ModelConfig, tokenizer):
    """Embeddings grown for added tokens (a causal LM's padded, see pad_vocabulary); --model.freeze-lm, --model.lora-r
    (peft), --model.grad-checkpointing."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.get_output_embeddings() is not None:  # a causal LM (a text encoder has no output head here)
        pad_vocabulary(model)
        if not output_logits_match(model):
            reason = "its forward changes its output head's logits in a way the loss here does not (output_logits)"
            raise LoadError("name", str(cfg.name), reason)
    if cfg.grad_checkpointing:
        checkpoint_activations(model)
    if cfg.freeze_lm:
        model.requires_grad_(False)
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        targets = list(cfg.lora_targets) or "all-linear"
        lora = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
        try:
            model = get_peft_model(model, LoraConfig(**lora, target_modules=targets))
        except ValueError as e:  # target modules not found
            raise InputError(f"--model.lora-targets {' '.join(cfg.lora_targets)}: {e}") from None
    return model


# What this file relies on that transformers has renamed within the supported range: one named function each.


def checkpoint_activations(model) -> None:
    """Recompute the model's activations in the backward pass (non-reentrant): activation_checkpointing_enable from
    transformers 5.2x, gradient_checkpointing_enable before."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def pil_image_processor(name: str):
    """The image processor class `name` (SiglipImageProcessor, CLIPImageProcessor, ...) that works on PIL images,
    with the same numbers whether torchvision is installed or not: `{name}Pil` where transformers has it (5.5 on),
    `name` itself before (PIL only then)."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


# A causal LM's vocabulary is padded to a multiple of this many rows: the output head's GEMM then runs on whole
# tensor-core tiles (GPT-2's 50,257 rows do not: nanoGPT pads them to 50,304).
VOCAB_MULTIPLE = 64
# Rows of the output head computed at once in the loss, which runs it on the labelled positions only: at most this
# many x V float32 logits exist at a time (0.6 GB with Qwen2's 151,936-row vocabulary, where all of a batch-64 step's
# logits take 11.7 GB), and a GEMM of 1024 rows already fills a GPU's tensor cores. A dialogue step of batch 16 has
# about 150 labelled tokens: one chunk.
LOSS_CHUNK = 1024


def pad_vocabulary(lm) -> None:
    """`lm`'s vocabulary padded to a multiple of VOCAB_MULTIPLE rows. The padded rows are zero and no token's:
    `config.unpadded_vocab_size` says where they start, VisualPrefixLM gives them no probability (the loss, beam
    search) and an export leaves them out. The RNG is forked around the resize: the weights initialised after it are
    those of an unpadded LM."""
    rows = lm.get_input_embeddings().num_embeddings
    if rows % VOCAB_MULTIPLE == 0:
        return
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        lm.resize_token_embeddings(rows, pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=False)
        for table in (lm.get_input_embeddings(), lm.get_output_embeddings()):
            table.weight[rows:] = 0
            if getattr(table, "bias", None) is not None:  # Phi's head has one
                table.bias[rows:] = 0
    lm.config.unpadded_vocab_size = rows


def without_padded_rows(lm, logits: torch.Tensor) -> torch.Tensor:
    """`logits` (..., V) with -inf in the columns of the rows pad_vocabulary added: they get no probability."""
    vocab = getattr(lm.config, "unpadded_vocab_size", None)
    if vocab is None:
        return logits
    return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab, -math.inf)


def lm_backbone(lm):
    """The causal LM without its output head (transformers' `base_model`; of a peft model, of the LM it wraps)."""
    return (lm.get_base_model() if hasattr(lm, "get_base_model") else lm).base_model


def output_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the LM's last hidden states as its own forward makes them: the output head, then what some
    families do beyond it, each read off its config (Gemma 2/3's soft-capping, Cohere's and Granite's scales,
    Falcon-H1's multiplier). adapt checks this against the LM's own logits."""
    config = lm.config
    logits = lm.get_output_embeddings()(hidden)
    if (scale := getattr(config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (scale := getattr(config, "logits_scaling", None)) is not None:
        logits = logits / scale
    if (scale := getattr(config, "lm_head_multiplier", None)) is not None:
        logits = logits * scale
    if cap := getattr(config, "final_logit_softcapping", None):
        logits = cap * torch.tanh(logits / cap)
    return logits


def output_logits_match(lm) -> bool:
    """Whether output_logits on lm_backbone's states gives the LM's own logits (the loss computes them so, on the
    labelled positions only): a family whose forward does more is refused, not trained on other logits. One 4-token
    forward in eval mode (no dropout, no random draw)."""
    training = lm.training
    ids = torch.arange(4, device=lm.device).unsqueeze(0) % lm.get_input_embeddings().num_embeddings
    with torch.no_grad():
        own = lm.eval()(input_ids=ids, use_cache=False).logits
        ours = output_logits(lm, lm_backbone(lm)(input_ids=ids, use_cache=False).last_hidden_state)
    lm.train(training)
    return torch.allclose(own, ours, rtol=1e-4, atol=1e-5)


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: list[str], template: str | None = None):
    """A byte-level BPE trained on the given text: deterministic for the same text, no download. `template`: what
    encoding a text adds around it (`[CLS] $A [SEP]`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    if template is not None:
        specials = [(t, tok.token_to_id(t)) for t in special_tokens if t in template]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def build_tokenizer(cfg: ModelConfig, tokenizer_dir: Path, specials: dict, texts: Callable, template=None):
    """The run's tokenizer: pretrained (`cfg.name`), the run's own (`tokenizer_dir`, resuming), or a BPE trained on
    `texts()` with `specials` (and `template`, see train_tokenizer). A loaded tokenizer keeps its own special tokens
    (bos, eos, pad: its LM was trained with them) and gets only the task's `additional_special_tokens`."""
    from transformers import AutoTokenizer

    added = specials.get("additional_special_tokens", [])
    if cfg.name is not None or (tokenizer_dir / "tokenizer.json").is_file():
        name = cfg.name if cfg.name is not None else str(tokenizer_dir)
        tokenizer = pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
    else:
        roles = {k: v for k, v in specials.items() if k != "additional_special_tokens"}
        tokenizer = train_tokenizer(texts(), cfg.vocab_size, [*roles.values(), *added], template)
        tokenizer.add_special_tokens(roles)
    tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    return tokenizer


def prompt_tokens(tokenizer, chat_template: bool) -> tuple[list[int], list[int], int]:
    """(ids that start every sequence, before its visual tokens and prompt; ids after the prompt; the id that ends a
    target). Plain: what the tokenizer puts in front of a text (Llama's <s>, OPT's </s>), else its bos (GPT-2's
    <|endoftext|>, SmolLM2's; nothing for Qwen2, which has none): a pretrained LM gives its first token much of its
    attention and little of what it reads there (an attention sink), so a visual token must not come first.
    Nothing after; its eos. Chat template: the template's text before the user's message, its end of the user turn
    and assistant header after the prompt, and its end-of-turn token (Qwen's <|im_end|>), read off the template
    rendered around placeholders."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    mark, reply = "PROMPT_7f3a", "REPLY_7f3a"
    if not chat_template:
        plain, full = ids(mark), tokenizer(mark)["input_ids"]
        front = full[: next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return front or bos, [], tokenizer.eos_token_id
    if not tokenizer.chat_template:
        raise InputError(f"--model.chat-template: the tokenizer of {tokenizer.name_or_path} has no chat template")
    turns = [{"role": "user", "content": mark}, {"role": "assistant", "content": reply}]
    user = tokenizer.apply_chat_template(turns[:1], add_generation_prompt=True, tokenize=False)
    end = ids(tokenizer.apply_chat_template(turns, tokenize=False).split(reply, 1)[1])
    before, after = user.split(mark)
    return ids(before), ids(after), end[0] if end else tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------------------
# The visual front end: every model reads its visual input through one, then projects it (`projector`) into its own
# width. Parameter names follow the split: `vision.*` (front end), `projector.*`, the rest is the language side.


class FeatureInput(nn.Module):
    """Pre-extracted features: `batch["features"]` (B, T, D), `batch["feature_mask"]` (B, T) True on real frames,
    standardised per dimension with `stats` (the training split's mean and std: buffers, so checkpoints hold them).
    Every front end (VisionTower too) has this interface: `dim` and `forward(batch) -> (tokens, mask)`."""

    def __init__(self, dim: int, stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.dim = dim
        mean, std = stats or (None, None)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        features = batch["features"].float()  # the files' dtype up to here (float16 crosses at half the bytes)
        if self.mean is not None:
            features = (features - self.mean) / self.std
        return features, batch["feature_mask"]


def load_vision(cfg: ModelConfig, seed: int = 0, processor_only: bool = False):
    """(tower, image processor) of --model.vision, the tower built without touching the global RNG (the rest of the
    model initialises as it would without it; `small` from `seed`). Loud: a directory that is not a vision model,
    or lacks weights the patch tokens depend on, is one LoadError line. Weights they do not depend on (CLIP's
    post_layernorm, pooling heads) are frozen: a fine-tuned tower leaves DDP no gradless weights."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, SiglipVisionConfig

    from data import Pixels

    def unused(tower) -> set[str]:  # the weights the patch tokens do not depend on: a backward pass on a blank image
        tower.eval()(pixel_values=torch.zeros(1, 3, *Pixels(processor, 1).size)).last_hidden_state.sum().backward()
        return {name for name, p in tower.named_parameters() if p.grad is None}

    quiet_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.vision == "small":
            size = cfg.vision_size
            processor = pil_image_processor("SiglipImageProcessor")(size={"height": size, "width": size})
            width, shape = cfg.vision_width, dict(image_size=size, patch_size=size // 4, vision_use_head=False)
            config = SiglipVisionConfig(
                hidden_size=width, intermediate_size=4 * width, num_hidden_layers=cfg.vision_layers,
                num_attention_heads=width // 32, **shape,
            )  # fmt: skip
            tower = None if processor_only else AutoModel.from_config(config)
        else:  # the PIL backend: the same whether torchvision is installed or not
            load = partial(AutoImageProcessor.from_pretrained, backend="pil")
            processor = pretrained(load, cfg.vision, "image processor", "vision")
            config = pretrained(AutoConfig.from_pretrained, cfg.vision, "model config", "vision")
            config = getattr(config, "vision_config", None) or config  # a CLIP/SigLIP model: its vision half
            if not hasattr(config, "patch_size"):
                raise LoadError("vision", cfg.vision, f"{config.model_type} is not a ViT-style tower (patch tokens)")
            if not processor_only:  # in its checkpoint's dtype, unlike the LM
                tower = load_weights(AutoModel, cfg.vision, "vision", unused, config=config, dtype="auto")
    if processor_only:
        return None, processor
    trained = set() if cfg.freeze_vision else {name for name, _ in tower.named_parameters()} - unused(tower)
    for name, p in tower.named_parameters():
        p.grad = None
        p.requires_grad_(name in trained)
    return tower.eval(), processor


class VisionTower(nn.Module):
    """Raw pixels through a vision tower (load_vision): `batch["pixels"]` (B, F, 3, H, W), F frames (1 for an image),
    runs as (B*F, 3, H, W) and gives (B, F*K, D) patch tokens, K per frame (every patch, or --model.vision-tokens by
    average pooling over the patch grid), mask all True. Frozen: eval mode even in a model in training mode, no
    gradients, bf16 autocast on GPU. Extra feature streams (`features`, e.g. VGGish audio) are aligned to the shorter
    and concatenated along the width as FeatureStore aligns streams, so a --cache-features cache read before the same
    streams gives the same input. A batch without `pixels` carries tokens already encoded."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, extra_dim: int = 0, extra_stats=None):
        super().__init__()
        self.tower, self.processor = load_vision(cfg, seed)
        self.tokens, self.frozen = cfg.vision_tokens, cfg.freeze_vision
        self.dim = self.tower.config.hidden_size + extra_dim
        self.extra = FeatureInput(extra_dim, extra_stats)  # the extra streams, standardised as features are

    def tokens_per_image(self, size: tuple[int, int]) -> int:
        patch = self.tower.config.patch_size
        return self.tokens or (size[0] // patch) * (size[1] // patch)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.train(mode and not self.frozen)
        return self

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, K, D) float32."""
        bf16 = torch.autocast(pixels.device.type, torch.bfloat16, enabled=self.frozen and pixels.is_cuda)
        with torch.no_grad() if self.frozen else contextlib.nullcontext(), bf16:
            hidden = self.tower(pixel_values=pixels).last_hidden_state
        patch = self.tower.config.patch_size
        rows, cols = pixels.shape[-2] // patch, pixels.shape[-1] // patch
        patches = hidden[:, hidden.shape[1] - rows * cols :].float()  # CLS and register tokens come first
        if self.tokens:
            grid = patches.transpose(1, 2).reshape(len(patches), -1, rows, cols)
            patches = nn.functional.adaptive_avg_pool2d(grid, math.isqrt(self.tokens)).flatten(2).transpose(1, 2)
        return patches

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "pixels" not in batch:
            return batch["features"].float(), batch["feature_mask"]
        pixels = batch["pixels"]
        tokens = self.encode(pixels.flatten(0, 1)).reshape(len(pixels), -1, self.tower.config.hidden_size)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if "features" in batch:
            features, mask = self.extra(batch)
            length = min(tokens.shape[1], features.shape[1])
            tokens = torch.cat([tokens[:, :length], features[:, :length].to(tokens.dtype)], -1)
            mask = mask[:, :length]
        return tokens, mask


# ----------------------------------------------------------------------------------------------------------------
# A causal LM with a visual prefix (video-grounded dialogue, captioning, generative VQA)


IGNORE = -100  # the label of a position with nothing to learn (cross_entropy's ignore_index)


class LMBatch(TypedDict, total=False):
    """What LMTask.pack builds and VisualPrefixLM reads: B rows of L positions, [visual | text] each, beside the
    front end's input (`features` and `feature_mask`, or `pixels`). Tensors go to the device, the rest stays."""

    input_ids: torch.Tensor  # (B, L) token ids (padding at the visual positions)
    token_type_ids: torch.Tensor  # (B, L) marker ids, added as types where the model has them
    attention_mask: torch.Tensor  # (B, L) 1 on real positions; eval rows are left-padded for generation
    is_visual: torch.Tensor  # (B, L) bool: the position takes a visual token...
    visual_index: torch.Tensor  # (B, L) ...this one of the front end's
    labels: torch.Tensor  # (B, L) training: the token to learn at each position, IGNORE elsewhere
    loss_index: torch.Tensor  # training: the flat positions whose next token is labelled (token_losses)
    right_padded: bool  # training: rows right-padded, so the LM needs no padding mask (hidden_states)
    features: torch.Tensor
    feature_mask: torch.Tensor
    pixels: torch.Tensor
    references: list  # eval: each sample's reference texts, where the split has them
    ids: list  # each sample's id


class VisualPrefixLM(nn.Module):
    """A causal LM whose input mixes projected visual tokens and text (LAVIS's `gpt_dialogue`; the visual prefix of
    BLIP-2 and LLaVA). `is_visual` marks the positions that take a visual token (`visual_index`: which of the front
    end's), the others take the embedding of `input_ids`. The task's marker tokens (<speaker1>, <cap>, ...) have
    embeddings of our own (`markers`, initialised from the LM's rows and read instead of them), so they train when the
    LM is frozen or under LoRA; with `token_types`, `token_type_ids` (marker ids) add the same embeddings, as GPT-2's
    token types do (for any family). The projector ends in a LayerNorm whose gain starts at 1, or for a `pretrained`
    LM at the root mean square of its word embeddings: visual tokens enter at the scale of its words. The loss is
    summed over the labelled tokens and returned with their count: the caller normalises over the global batch."""

    def __init__(
        self,
        lm,
        vision: nn.Module,
        markers: list[int],
        projector: str = "linear",
        video_loss_weight=0.0,
        token_types: bool = True,
        pretrained: bool = False,
    ):
        super().__init__()
        self.lm = lm
        self.token_types = token_types
        self.vision = vision
        words = lm.get_input_embeddings().weight
        width = words.shape[1]
        # Normalised so that features of any scale enter at the scale of the LM's hidden states (raw I3D/VGGish
        # values are orders of magnitude larger than word embeddings and would swamp the residual stream).
        mlp = [nn.Linear(vision.dim, width), nn.GELU()] if projector == "mlp" else []
        self.projector = nn.Sequential(*mlp, nn.Linear(width if mlp else vision.dim, width), nn.LayerNorm(width))
        if pretrained:  # its layers expect inputs at its word embeddings' scale, far below a LayerNorm's sqrt(width)
            nn.init.constant_(self.projector[-1].weight, words.detach().float().pow(2).mean().sqrt().item())
        self.projector_kind = projector
        self.markers = nn.Embedding.from_pretrained(words[markers].detach().clone(), freeze=False)
        self.register_buffer("marker_ids", torch.tensor(markers), persistent=False)
        self.video_loss_weight = video_loss_weight
        # Only built when used, so DDP never sees a parameter without a gradient.
        self.video_head = nn.Linear(lm.config.hidden_size, vision.dim) if video_loss_weight > 0 else None

    def parts(self) -> dict[str, nn.Module]:
        """The pretrained parts, each with a learning rate of its own (train.py: --model.lm-lr, --model.vision-lr);
        the rest (projector, markers, heads) trains at --lr. Every model here declares them."""
        return {"lm": self.lm, "vision": self.vision}

    def marker_embeds(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids → (our embedding where the id is a marker, else 0; where it is one)."""
        hit = ids.unsqueeze(-1) == self.marker_ids
        found = hit.any(-1, keepdim=True)
        return self.markers(hit.int().argmax(-1)) * found, found

    def type_embeds(self, types: torch.Tensor) -> torch.Tensor:
        """(B, L) token types (marker ids) → what is added to the inputs: their markers' embeddings, or 0 without
        token types (the inputs left as they are)."""
        own = self.marker_embeds(types)[0]
        return own if self.token_types else torch.zeros_like(own)

    def embed(self, batch: LMBatch) -> torch.Tensor:
        own, is_marker = self.marker_embeds(batch["input_ids"])
        text = torch.where(is_marker, own, self.lm.get_input_embeddings()(batch["input_ids"]))
        visual = self.projector(self.vision(batch)[0].to(text.dtype))
        index = batch["visual_index"].unsqueeze(-1).expand(-1, -1, visual.shape[-1])
        mixed = torch.where(batch["is_visual"].unsqueeze(-1), visual.gather(1, index), text)
        return mixed + self.type_embeds(batch["token_type_ids"])

    def run_lm(self, batch: LMBatch):
        mask, embeds = batch["attention_mask"], self.embed(batch)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)

    def hidden_states(self, batch: LMBatch, padding_mask: bool = True) -> torch.Tensor:
        """(B, L, H): the LM's last hidden states, its output head not applied. Without `padding_mask` the LM gets
        neither the mask nor position ids, which is exact for a right-padded batch only (causal attention keeps
        every real position from the padding after it, and the LM numbers positions from 0 itself): transformers
        then reads no mask values (two waits for the device) and attends with SDPA's causal kernels; it still reads
        the position ids it makes, for packed sequences, once a step unless compiled."""
        embeds, lm = self.embed(batch), lm_backbone(self.lm)
        if not padding_mask:
            return lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state

    def token_losses(
        self, hidden: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) negative log-likelihood of each labelled next token (0 at padding), and (N,) the flat position
        (into B x L) that predicts it. The output head runs on those positions only, LOSS_CHUNK rows at a time: the
        (B, L, V) logits never exist. `index`: those positions as LMTask.pack lists them, padded with unlabelled
        ones to a bucket (no host sync, few shapes to compile); unset, they are found here (a host sync)."""
        index = labelled_positions(labels) if index is None else index
        states, targets = hidden.flatten(0, 1)[index], next_labels(labels)[index]
        # More than a chunk: each chunk's logits are recomputed in the backward pass instead of kept for it.
        recompute = torch.is_grad_enabled() and len(index) > LOSS_CHUNK
        losses = [
            checkpoint(self.chunk_losses, *chunk, use_reentrant=False) if recompute else self.chunk_losses(*chunk)
            for chunk in zip(states.split(LOSS_CHUNK), targets.split(LOSS_CHUNK), strict=True)
        ]
        return torch.cat(losses), index

    def chunk_losses(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of (N, H) states against (N,) targets (IGNORE: none), over float32 logits in which the rows
        pad_vocabulary added have no probability."""
        logits = without_padded_rows(self.lm, output_logits(self.lm, states).float())
        return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")

    def forward(self, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of labelled tokens). A batch marked `right_padded` (LMTask.pack's training batches)
        runs without a padding mask (hidden_states)."""
        hidden = self.hidden_states(batch, padding_mask=not batch.get("right_padded", False))
        loss = self.token_losses(hidden, batch["labels"], batch.get("loss_index"))[0].sum()
        count = (batch["labels"][:, 1:] != IGNORE).sum()
        if self.video_head is not None:
            loss = loss + self.video_loss_weight * self.next_frame_loss(hidden, batch) * count
        return loss, count

    def next_frame_loss(self, hidden: torch.Tensor, batch: LMBatch) -> torch.Tensor:
        """MSE between the prediction at visual position t and the input frame t+1 (both visual positions); every
        position predicts, the pairs are weighted in (a fixed shape: no host sync)."""
        tokens = self.vision(batch)[0]
        frames = tokens.gather(1, batch["visual_index"].unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        pairs = (batch["is_visual"][:, :-1] & batch["is_visual"][:, 1:]).unsqueeze(-1)
        errors = (self.video_head(hidden[:, :-1]).float() - frames[:, 1:].float()).square() * pairs
        return errors.sum() / (pairs.sum() * errors.shape[-1])

    @torch.no_grad()
    def log_likelihood(self, batch: LMBatch) -> torch.Tensor:
        """(B,) summed log-probability of each row's labelled tokens (ranking candidate answers)."""
        hidden = self.hidden_states(batch)
        losses, index = self.token_losses(hidden, batch["labels"])
        return -losses.new_zeros(len(hidden)).index_add_(0, index // hidden.shape[1], losses)

    @torch.no_grad()
    def generate(self, batch: LMBatch, num_beams: int, max_len: int, min_len: int, eos_id: int, pad_id: int):
        """Beam search from a left-padded prompt; returns the new token ids of each sample (eos and pad stripped).
        Position ids come from the attention mask (generate's own, as in training). Every new token gets the type
        of the prompt's last token, as GPT-2 extends token_type_ids: generate embeds new tokens with the LM's
        input embedding, so a hook adds the type there. Markers are never generated; the padded vocabulary rows get
        -inf logits from a hook on the output head (a suppressed token still weighs in the log-softmax that beam
        scores come from), so beams are those of the LM without them."""
        embeds = self.embed(batch)
        types = self.type_embeds(batch["token_type_ids"][:, -1:])
        hooks = [
            self.lm.get_input_embeddings().register_forward_hook(
                lambda module, args, out: out + types.repeat_interleave(len(out) // len(types), 0).to(out.dtype)
            ),
            self.lm.get_output_embeddings().register_forward_hook(
                lambda module, args, out: without_padded_rows(self.lm, out)
            ),
        ]
        search = dict(num_beams=num_beams, max_new_tokens=max_len, min_new_tokens=min_len, do_sample=False)
        search |= dict(eos_token_id=eos_id, pad_token_id=pad_id, suppress_tokens=self.marker_ids.tolist())
        try:
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **search)
        finally:
            for hook in hooks:
                hook.remove()
        rows = [row[: row.index(eos_id)] if eos_id in row else row for row in out.tolist()]
        return [[t for t in row if t != pad_id] for row in rows]


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) labels → (B * L,): the label of the token after each position (IGNORE where none, at each row's end)."""
    return nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()


def labelled_positions(labels: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """The flat positions (into B x L) whose next token is labelled, padded to a multiple of `multiple` with a
    position that predicts nothing (row 0's last)."""
    index = next_labels(labels).ne(IGNORE).nonzero().squeeze(1)
    return nn.functional.pad(index, (0, -len(index) % multiple), value=labels.shape[1] - 1)


def small_config(config_class, cfg: ModelConfig, vocab_size: int, **fields):
    """The config of a small model (no --model.name) from --model.n-layer/n-head/n-embd/n-positions, in the names
    every family takes (GPT-2 maps them onto its own), and the family's own `fields`."""
    sizes = dict(vocab_size=vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer)
    sizes |= dict(num_attention_heads=cfg.n_head, max_position_embeddings=cfg.n_positions)
    # GPT-2's and BERT's 0.02 suits width 768; at a small width the model is slow to start reading its visual
    # input: the embedded AVSD's answers do not depend on the video after 10 epochs with 0.02, they do from epoch
    # 4 with 1/sqrt(width); the embedded SNLI-VE is at chance accuracy after 300 steps, at 96% after 100.
    return config_class(**sizes, initializer_range=cfg.n_embd**-0.5, **fields)


def build_causal_lm(cfg: ModelConfig, tokenizer, eos: int, pad: int):
    """The LM: any causal LM from `cfg.name` or a small GPT-2 from a config, then `adapt`ed. Generation follows only
    our flags (eos, pad, beams): a hub model's own sampling defaults (temperature, repetition penalty) are dropped."""
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel

    quiet_transformers()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    if cfg.name is not None:
        lm = load_weights(AutoModelForCausalLM, cfg.name)
        lm.config.update(ids)
    else:
        drop = dict(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
        lm = GPT2LMHeadModel(small_config(GPT2Config, cfg, len(tokenizer), **drop, **ids))
    lm.generation_config = GenerationConfig(**ids)
    return adapt(lm, cfg, tokenizer)


def save_visual_prefix(model: VisualPrefixLM, tokenizer, directory: Path) -> None:
    """`load_visual_prefix`'s directory: the LM (LoRA merged into its weights, the padded vocabulary rows left out:
    both in `model` itself) and the tokenizer with save_pretrained, a vision tower with its image processor the same
    way in vision/, and visual_prefix.pt: the front end's width, the projector's kind, the marker tokens, whether they
    add token types, and every other weight (projector, markers)."""
    lm = model.lm.merge_and_unload() if hasattr(model.lm, "merge_and_unload") else model.lm
    if (rows := getattr(lm.config, "unpadded_vocab_size", None)) is not None:
        lm.resize_token_embeddings(rows)  # plain transformers gets the tokenizer's rows only
        del lm.config.unpadded_vocab_size
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tower = {}
    if isinstance(model.vision, VisionTower):
        model.vision.tower.save_pretrained(Path(directory) / "vision")
        model.vision.processor.save_pretrained(Path(directory) / "vision")
        tower = {"tokens": model.vision.tokens, "extra_dim": model.vision.extra.dim}
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(("lm.", "video_head.", "vision.tower."))}
    markers = tokenizer.convert_ids_to_tokens(model.marker_ids.tolist())
    extra = {"feature_dim": model.vision.dim, "projector": model.projector_kind, "markers": markers, "weights": weights}
    extra["token_types"] = model.token_types
    torch.save({**extra, "tower": tower}, Path(directory) / "visual_prefix.pt")


def load_visual_prefix(directory: str | Path) -> tuple[VisualPrefixLM, object]:
    """(model, tokenizer) from a directory written by `train.py TASK --export DIR`: the LM and tokenizer load with
    plain transformers (`AutoModelForCausalLM`, `AutoTokenizer`), a vision tower from vision/ (`AutoModel`,
    `AutoImageProcessor`), the rest from visual_prefix.pt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = torch.load(Path(directory) / "visual_prefix.pt", weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    markers = tokenizer.convert_tokens_to_ids(extra["markers"])
    dim = extra["tower"]["extra_dim"] if extra["tower"] else extra["feature_dim"]
    stats = (torch.zeros(dim), torch.ones(dim)) if any(k.endswith(".mean") for k in extra["weights"]) else None
    vision = FeatureInput(dim, stats)  # --model.feature-norm: the training statistics, loaded below
    if extra["tower"]:
        tower = ModelConfig(vision=str(Path(directory) / "vision"), vision_tokens=extra["tower"]["tokens"])
        vision = VisionTower(tower, extra_dim=dim, extra_stats=stats)
    model = VisualPrefixLM(lm, vision, markers, extra["projector"], token_types=extra.get("token_types", True))
    missing, unexpected = model.load_state_dict(extra["weights"], strict=False)
    if unexpected or not all(k.startswith(("lm.", "vision.tower.")) for k in missing):
        raise ValueError(f"{directory}/visual_prefix.pt does not fit: missing {missing}, unexpected {unexpected}")
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------------
# A pretrained vision-language model (AutoModelForImageTextToText: LLaVA, Idefics3/SmolVLM, Qwen2-VL, PaliGemma,
# BLIP-2) with its processor: the task hands over a Conversation, the model's side writes it


@dataclass(frozen=True)
class Conversation:
    """What a generative task asks of a pretrained VLM about one sample, in words: its images (PIL; a video's frames,
    `video`), the turns (user, assistant, ..., user: the question last) and the answer to learn (None: to generate).
    How it is written (chat template, image tokens, end of turn) is ChatFormat's business."""

    images: list
    turns: list[str]
    answer: str | None = None
    video: bool = False


@cache
def vlm_config(name: str | None):
    """The config of `name` when it is a pretrained vision-language model (a model_type AutoModelForImageTextToText
    builds), else None (no name, a causal LM, or nothing loadable: the LM path reports that). A multimodal config of
    another kind (a vision_config: CLIP, SigLIP) is one LoadError line: no generative task can serve it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as VLMS

    try:
        config = pretrained(AutoConfig.from_pretrained, name, "model config") if name else None
    except LoadError:
        return None
    if config is not None and config.model_type in VLMS:
        return config
    if hasattr(config, "vision_config"):
        kind = "an image-text-to-text model (AutoModelForImageTextToText)"
        raise LoadError("name", name, f"{config.model_type} is neither a causal LM nor {kind}")
    return None


def takes_suffix(processor) -> bool:
    """Whether the processor takes the answer as `suffix` (PaliGemma's, which marks it in token_type_ids): a parameter
    of its __call__ from transformers 5.23 on, one of its text kwargs before (typed by its valid_processor_kwargs from
    5.5, by the annotation of its **kwargs before)."""
    parameters = inspect.signature(processor.__call__).parameters
    if "suffix" in parameters:
        return True
    kinds = [getattr(processor, "valid_processor_kwargs", None)]
    kinds += get_args(parameters["kwargs"].annotation) if "kwargs" in parameters else []
    texts = [getattr(kind, "__annotations__", {}).get("text_kwargs") for kind in kinds]
    return any("suffix" in getattr(text, "__annotations__", {}) for text in texts)


class ChatFormat:
    """How a pretrained VLM writes a Conversation, read off its processor. With a chat template: the turns as its user
    and assistant messages, the images (or the video, where the processor has a video processor) in the first one,
    then the template's generation prompt; the answer follows as the template writes a reply, closed by its end-of-turn
    token (the first special token after a reply; eos where the template closes a turn with none, as LLaVA-1.5's).
    Without one: the turns on lines of their own, then the answer and eos (BLIP-2: after a space; PaliGemma: as the
    suffix its processor takes, which marks it in token_type_ids). The processor expands the image tokens. Training
    batches are right-padded with labels on the answer and its end-of-turn token only (checked: the tokens of prompt +
    answer must end with the answer's own); generation batches are the prompts, left-padded."""

    def __init__(self, processor):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.chat = bool(getattr(processor, "chat_template", None))
        self.video = getattr(processor, "video_processor", None) is not None
        self.suffix = takes_suffix(processor)
        self.lead, close = "" if self.suffix else " ", ""
        if self.chat:
            turn = Conversation([], ["PROMPT_7f3a"])
            prompt, full = self.prompt(turn), self.render(turn, "REPLY_7f3a")
            if not full.startswith(prompt) or "REPLY_7f3a" not in full:
                raise InputError(f"the chat template of {self.tokenizer.name_or_path} does not continue its prompt")
            self.lead, close = full[len(prompt) :].split("REPLY_7f3a")
        special = {i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        ids = self.tokenizer(close, add_special_tokens=False)["input_ids"]
        self.end_id = next((i for i in ids if i in special), self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        self.end = self.tokenizer.convert_ids_to_tokens(self.end_id)

    def render(self, conversation: Conversation, reply: str | None = None) -> str:
        video = conversation.video and self.video
        media = [{"type": "video"}] if video else [{"type": "image"}] * len(conversation.images)
        turns = [*conversation.turns, *([reply] if reply is not None else [])]
        messages = []
        for i, text in enumerate(turns):
            content = [*(media if i == 0 else []), {"type": "text", "text": text}]
            messages.append({"role": "assistant" if i % 2 else "user", "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=reply is None, tokenize=False)

    def prompt(self, conversation: Conversation) -> str:
        return self.render(conversation) if self.chat else "\n".join(conversation.turns)

    def answer(self, text: str) -> str:
        """What follows the prompt when `text` is the reply: as the template writes it, closed by the end of turn."""
        return self.lead + text + self.end

    def answer_ids(self, prompt: str, text: str) -> list[int]:
        """The tokens `answer(text)` adds after `prompt`, tokenized after it (a sentencepiece tokenizer writes a text's
        first word otherwise); PaliGemma's processor tokenizes its suffix alone."""

        def ids(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        before, whole = [] if self.suffix else ids(prompt), ids(("" if self.suffix else prompt) + self.answer(text))
        if whole[: len(before)] != before:
            raise InputError(
                f"{self.tokenizer.name_or_path}: an answer merges with the prompt's last token: {prompt!r}"
            )
        return whole[len(before) :]

    def __call__(self, conversations: list[Conversation], train: bool) -> dict[str, torch.Tensor]:
        suffix = train and self.suffix
        prompts = [self.prompt(c) for c in conversations]
        replies = [self.answer(c.answer) if train and not suffix else "" for c in conversations]
        texts = [p + reply for p, reply in zip(prompts, replies, strict=True)]
        video = conversations[0].video and self.video
        media = {"videos" if video else "images": [c.images for c in conversations]}
        media |= {"suffix": [c.answer for c in conversations]} if suffix else {}
        bos = self.tokenizer.bos_token  # a template that writes it: the tokenizer must not add it again
        side = dict(padding=True, padding_side="right" if train else "left", return_tensors="pt")
        side["add_special_tokens"] = not (bos and texts[0].startswith(bos))
        batch = dict(self.processor(text=texts, **media, **side))
        batch.pop("labels", None)  # PaliGemma's own: ours are checked
        if train:
            answers = [self.answer_ids(p, c.answer) for p, c in zip(prompts, conversations, strict=True)]
            batch["labels"] = self.labels(batch, answers)
            labelled = batch["labels"] != IGNORE  # the positions from the first label on (a number, kept on the host)
            batch["answer_span"] = labelled.shape[1] - int(labelled.int().argmax(1).min())
        return batch

    def labels(self, batch: dict, answers: list[list[int]]) -> torch.Tensor:
        """IGNORE but on each row's answer tokens: the last of its (right-padded) tokens."""
        ids, labels = batch["input_ids"], torch.full_like(batch["input_ids"], IGNORE)
        for row, (answer, length) in enumerate(zip(answers, batch["attention_mask"].sum(1).tolist(), strict=True)):
            if ids[row, length - len(answer) : length].tolist() != answer:
                found = self.tokenizer.decode(ids[row, max(0, length - len(answer) - 3) : length])
                raise InputError(f"{self.tokenizer.name_or_path}: the answer's tokens do not end its row: {found!r}")
            labels[row, length - len(answer) : length] = ids[row, length - len(answer) : length]
        return labels


def vlm_parts(model) -> tuple[nn.Module, nn.Module]:
    """(language model with its output head, vision tower) of a transformers VLM, found by the names the families give
    them; what is neither is the projector (LLaVA's multi_modal_projector, Idefics3's connector, BLIP-2's Q-Former,
    Qwen2-VL's merger, which sits inside its vision tower)."""
    inner = getattr(model, "model", model)
    lm = next(getattr(inner, n) for n in ("language_model", "text_model") if hasattr(inner, n))
    vision = next(getattr(inner, n) for n in ("vision_tower", "vision_model", "visual") if hasattr(inner, n))
    head = model.get_output_embeddings()
    lm = nn.ModuleList([lm] + ([head] if all(head is not m for m in lm.modules()) else []))
    if hasattr(vision, "merger"):
        vision = nn.ModuleList([m for n, m in vision.named_children() if n != "merger"])
    return lm, vision


def unused_weights(model, processor, lm: nn.Module) -> set[int]:
    """ids of the trained vision and projector weights the image features do not depend on (LLaVA's last vision
    layer, BLIP-2's Q-Former text layers): a backward pass from one blank image's features. Trained, DDP would wait
    for their gradients forever."""
    from PIL import Image

    inputs = processor.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    out = model.get_image_features(**inputs)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    sum(f.float().sum() for f in (features if isinstance(features, (list, tuple)) else [features])).backward()
    in_lm = {id(p) for p in lm.parameters()}
    unused = {id(p) for p in model.parameters() if p.requires_grad and p.grad is None and id(p) not in in_lm}
    model.zero_grad(set_to_none=True)
    return unused


class VLM(nn.Module):
    """A pretrained AutoModelForImageTextToText and its processor (ChatFormat) behind VisualPrefixLM's interface:
    forward(batch) → (summed loss, count), generate, log_likelihood, parts. The vision tower is frozen by default
    (--model.freeze-vision: eval mode, no gradients); --model.freeze-lm freezes the LM (output head included) and
    --model.lora-r adapts only its linear layers; the projector trains at --lr."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

        processor = pretrained(AutoProcessor.from_pretrained, cfg.name, "processor")  # before the weights: cheaper
        self.format = ChatFormat(processor)
        model = load_weights(AutoModelForImageTextToText, cfg.name)
        ids = dict(bos_token_id=self.format.tokenizer.bos_token_id, pad_token_id=self.format.pad_id)
        model.generation_config = GenerationConfig(eos_token_id=self.format.end_id, **ids)  # no sampling defaults
        if cfg.grad_checkpointing:
            checkpoint_activations(model)
        lm, vision = vlm_parts(model)
        if cfg.lora_r:
            model = lora_on(model, lm, cfg)
        lm_ids, vision_ids = {id(p) for p in lm.parameters()}, {id(p) for p in vision.parameters()}
        for name, p in model.named_parameters():
            in_lm = ("lora_" in name) if cfg.lora_r else not cfg.freeze_lm
            p.requires_grad_(not cfg.freeze_vision if id(p) in vision_ids else in_lm if id(p) in lm_ids else True)
        unused = unused_weights(model, processor, lm)
        for p in model.parameters():
            p.requires_grad_(p.requires_grad and id(p) not in unused)
        self.model, self.frozen_vision = model, cfg.freeze_vision
        self.keeps_logits = "logits_to_keep" in inspect.signature(type(self.hf()).forward).parameters

    def hf(self):
        """The transformers model (under LoRA, inside peft's wrapper)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def parts(self) -> dict[str, nn.Module]:
        lm, vision = vlm_parts(self.hf())
        return {"lm": lm, "vision": vision}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_vision:
            self.parts()["vision"].eval()
        return self

    def run(self, batch: dict, **kwargs):
        return self.model(**{k: v for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}, **kwargs)

    def token_losses(self, batch: dict) -> torch.Tensor:
        """(B, K) negative log-likelihood of each labelled token, 0 elsewhere, over the last K positions (ChatFormat's
        `answer_span`: no label before them). The logits of the prompt before them are not computed, where the model
        can leave them out (all but BLIP-2): at a 150k vocabulary they are most of a step's activation memory."""
        keep = batch["answer_span"]
        logits = self.run(batch, **{"logits_to_keep": keep + 1} if self.keeps_logits else {}).logits
        logits = logits[:, -keep - 1 : -1].float()
        return nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, -keep:], reduction="none")

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_losses(batch).sum(), (batch["labels"][:, 1:] != IGNORE).sum()

    @torch.no_grad()
    def log_likelihood(self, batch: dict) -> torch.Tensor:
        """(B,) summed log-probability of each row's labelled tokens (ranking candidate answers)."""
        return -self.token_losses(batch).sum(-1)

    @torch.no_grad()
    def next_token_logits(self, batch: dict) -> torch.Tensor:
        """(B, V) after each left-padded prompt."""
        return self.run(batch).logits[:, -1].float()

    @torch.no_grad()
    def generate(self, batch: dict, num_beams: int, max_len: int, min_len: int, eos_id: int, pad_id: int):
        """Beam search with the model's own generate from left-padded prompts; the new token ids of each sample."""
        inputs = {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}
        search = dict(num_beams=num_beams, max_new_tokens=max_len, min_new_tokens=min_len, do_sample=False)
        out = self.model.generate(**inputs, **search, eos_token_id=eos_id, pad_token_id=pad_id)
        rows = out[:, inputs["input_ids"].shape[1] :].tolist()
        rows = [row[: row.index(eos_id)] if eos_id in row else row for row in rows]
        return [[t for t in row if t != pad_id] for row in rows]


def lora_on(model, lm: nn.Module, cfg: ModelConfig):
    """peft LoRA on the linear layers of the language model only (--model.lora-targets: those of these names), never
    its output head, the vision tower or the projector."""
    from peft import LoraConfig, get_peft_model

    head = model.get_output_embeddings()
    inside = {id(m) for m in lm.modules() if isinstance(m, nn.Linear) and m is not head}
    names = [n for n, m in model.named_modules() if id(m) in inside]
    names = [n for n in names if not cfg.lora_targets or n.rpartition(".")[2] in cfg.lora_targets]
    if not names:
        raise InputError(f"--model.lora-targets {' '.join(cfg.lora_targets)}: no such linear layer in the LM")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=names)
    return get_peft_model(model, lora)


def save_vlm(model: VLM, directory: Path) -> None:
    """The VLM as plain AutoModelForImageTextToText and AutoProcessor load it: LoRA merged, beside its processor."""
    hf = model.model.merge_and_unload() if hasattr(model.model, "merge_and_unload") else model.model
    hf.save_pretrained(directory)
    model.format.processor.save_pretrained(directory)


# ----------------------------------------------------------------------------------------------------------------
# BERT-like text encoder with image features (retrieval, classification)


def build_text_encoder(cfg: ModelConfig, tokenizer):
    """A text encoder: any `AutoModel` from `cfg.name` (of a CLIP checkpoint, its text tower) or a small BERT from a
    config, then `adapt`ed. No pooler where it can be left out (BERT, RoBERTa): the tasks pool themselves, and an
    unused pooler leaves DDP with gradless weights."""
    import inspect

    from transformers import MODEL_MAPPING, AutoConfig, BertConfig, BertModel

    if cfg.name is not None:
        config = pretrained(AutoConfig.from_pretrained, cfg.name, "model config")
        model_class = MODEL_MAPPING[type(getattr(config, "text_config", config))]
        pooler = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
        encoder = load_weights(model_class, cfg.name, **({"add_pooling_layer": False} if pooler else {}))
        return adapt(encoder, cfg, tokenizer)
    drop = dict(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    fields = dict(intermediate_size=4 * cfg.n_embd, pad_token_id=tokenizer.pad_token_id, **drop)
    encoder = BertModel(small_config(BertConfig, cfg, len(tokenizer), **fields), add_pooling_layer=False)
    return adapt(encoder, cfg, tokenizer)


class DualEncoder(nn.Module):
    """Image and text embedded separately into one normalised space (retrieval). Images: every region projected
    by an MLP, mean-pooled, projected; texts: the encoder's [CLS] state, projected. `logit_scale` is the learned
    inverse temperature of the contrastive loss, kept as a log and clamped to [1, 100] as in CLIP."""

    def __init__(self, text_encoder, vision: nn.Module, embed_dim: int, temperature: float):
        super().__init__()
        width = text_encoder.config.hidden_size
        self.text_encoder = text_encoder
        self.vision = vision
        self.projector = nn.Sequential(nn.Linear(vision.dim, width), nn.GELU(), nn.Linear(width, width))
        self.image_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        # One element, not a 0-dim tensor: FSDP2 (--fsdp) cannot shard a 0-dim parameter.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / temperature)]))

    def parts(self) -> dict[str, nn.Module]:
        """As VisualPrefixLM.parts: the text encoder is the language side."""
        return {"lm": self.text_encoder, "vision": self.vision}

    def embed_images(self, batch: dict) -> torch.Tensor:
        tokens, mask = self.vision(batch)
        projected = self.projector(tokens)
        mask = mask.unsqueeze(-1).to(projected.dtype)
        pooled = (projected * mask).sum(1) / mask.sum(1).clamp(min=1)  # the mean over the real regions
        return nn.functional.normalize(self.image_proj(pooled).float(), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        pooled = getattr(out, "pooler_output", None)  # CLIP's text tower: its eos state (it is causal)
        cls = out.last_hidden_state[:, 0] if pooled is None else pooled
        return nn.functional.normalize(self.text_proj(cls).float(), dim=-1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, logit scale) for a batch of matching pairs."""
        images = self.embed_images(batch)
        texts = self.embed_texts(batch["input_ids"], batch["attention_mask"])
        return images, texts, self.logit_scale.clamp(0, math.log(100)).exp()


class FusionClassifier(nn.Module):
    """One encoder over image and text together (SNLI-VE): the projected regions are placed right after [CLS]
    in the encoder's inputs_embeds (token type 1, text is type 0, where the encoder has token types), and the class
    is read from [CLS]'s last state."""

    def __init__(self, encoder, vision: nn.Module, num_classes: int):
        super().__init__()
        if encoder.config.model_type == "clip_text_model":
            why = "which CLIP's text tower cannot take: pass a BERT-like encoder as --model.name"
            raise InputError(f"classification puts image regions into the encoder's input, {why}")
        self.typed = getattr(encoder.config, "type_vocab_size", 0) > 1
        width = encoder.config.hidden_size
        self.encoder = encoder
        self.vision = vision
        self.projector = nn.Linear(vision.dim, width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, num_classes))

    def parts(self) -> dict[str, nn.Module]:
        """As VisualPrefixLM.parts: the encoder is the language side."""
        return {"lm": self.encoder, "vision": self.vision}

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (B, num_classes). `input_ids` start with [CLS]; `features` regions are padded (`feature_mask`)."""
        words = self.encoder.get_input_embeddings()(batch["input_ids"])
        tokens, token_mask = self.vision(batch)
        regions = self.projector(tokens.to(words.dtype))
        embeds = torch.cat([words[:, :1], regions, words[:, 1:]], dim=1)
        text_mask = batch["attention_mask"]
        mask = torch.cat([text_mask[:, :1], token_mask.long(), text_mask[:, 1:]], dim=1)
        types = torch.zeros_like(mask)
        types[:, 1 : 1 + regions.shape[1]] = 1
        typed = {"token_type_ids": types} if self.typed else {}
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=mask, **typed).last_hidden_state
        return self.head(hidden[:, 0]).float()
