"""Models and tokenizers, all from transformers (imported lazily: `train.py --help` must not pay for them).

`ModelConfig.name` unset builds a small GPT-2 (generative tasks) or BERT (encoder tasks) from a config and a BPE
tokenizer trained on the training text, so the default runs with no download; set, it is any causal LM
(`AutoModelForCausalLM`) or text encoder (`AutoModel`), by hub name or local directory, with its own tokenizer.
"""

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from data import InputError


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = None
    """Pretrained model and its tokenizer: a hub name or a local directory saved with save_pretrained. Generative
    tasks: any causal LM (GPT-2, OPT, Llama, Qwen2, Mistral, Phi, SmolLM); retrieval and classification: a text
    encoder (BERT, RoBERTa, DistilBERT, MiniLM; CLIP's text tower for retrieval). Unset: a small model built from the
    fields below and a tokenizer trained on the training split, so nothing is downloaded."""
    n_layer: int = 2
    """Layers of the small model (ignored with --model.name)."""
    n_head: int = 4
    """Attention heads of the small model (ignored with --model.name)."""
    n_embd: int = 128
    """Width of the small model (ignored with --model.name)."""
    n_positions: int = 512
    """Longest sequence (video frames + text tokens) of the small model (ignored with --model.name)."""
    vocab_size: int = 1000
    """BPE vocabulary trained for the small model (ignored with --model.name)."""
    dropout: float = 0.0
    """Dropout of the small model (ignored with --model.name). 0 by default: with 0.1 the small model reads its
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
    hub name or local directory; `small`: a random SigLIP-style tower (--model.vision-size, n-layer, n-head, n-embd),
    no download. Images: ROOT/images/{entry's "image"}; videos: ROOT/videos/{image_id}.{mp4,webm,avi,mkv}."""
    freeze_vision: bool = True
    """Frozen tower (as BLIP-2): eval mode, no gradients, bf16 on GPU, not in the optimizer; checkpoints hold its
    digest, not its weights (README: lean checkpoints). --model.no-freeze-vision fine-tunes it at --model.vision-lr."""
    vision_lr: float | None = None
    """Peak learning rate of the tower when fine-tuned; unset: --lr."""
    vision_tokens: int = 0
    """Tokens per image (per frame): the tower's patch grid average-pooled to this many (a square: 1, 4, 9, ...); 0:
    every patch token. The CLS (and register) tokens are not used."""
    vision_size: int = 32
    """Input size in pixels of --model.vision small (patches of a quarter of it)."""
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
        if self.vision_size < 4 or self.vision_size % 4:
            raise ValueError(f"--model.vision-size must be a multiple of 4, got {self.vision_size}")


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
    are fine (heads left out: BERT's MLM head, CLIP's image tower)."""
    quiet_transformers()
    kwargs = dict(output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32) | kwargs
    model, info = pretrained(partial(auto.from_pretrained, **kwargs), name, "model", field)
    missing = info["missing_keys"] | {k[0] for k in info["mismatched_keys"]}
    missing, unexpected = sorted(missing - spare(model)) if missing else [], sorted(info["unexpected_keys"])
    if missing:
        reason = (
            f"its checkpoint does not fit {type(model).__name__}, the model its config.json describes: "
            f"{len(missing)} weights missing or of another shape ({', '.join(missing[:2])}, ...), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:2])}, ...)"
        )
        raise LoadError(field, name, reason)
    return model


def adapt(model, cfg: ModelConfig, tokenizer):
    """Embeddings grown for added tokens; --model.freeze-lm, --model.lora-r (peft), --model.grad-checkpointing."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
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
        features = batch["features"]
        if self.mean is not None:
            features = (features - self.mean) / self.std
        return features, batch["feature_mask"]


def load_vision(cfg: ModelConfig, seed: int = 0, processor_only: bool = False):
    """(tower, image processor) of --model.vision, the tower built without touching the global RNG (the rest of the
    model initialises as it would without it; `small` from `seed`). Loud: a directory that is not a vision model,
    or lacks weights the patch tokens depend on, is one LoadError line. Weights they do not depend on (CLIP's
    post_layernorm, pooling heads) are frozen: a fine-tuned tower leaves DDP no gradless weights."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, SiglipVisionConfig
    from transformers.models import siglip

    from data import Pixels

    def unused(tower) -> set[str]:  # the weights the patch tokens do not depend on: a backward pass on a blank image
        tower.eval()(pixel_values=torch.zeros(1, 3, *Pixels(processor, 1).size)).last_hidden_state.sum().backward()
        return {name for name, p in tower.named_parameters() if p.grad is None}

    quiet_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.vision == "small":
            processor = getattr(siglip, "SiglipImageProcessorPil", None) or siglip.SiglipImageProcessor
            processor, size = processor(size={"height": cfg.vision_size, "width": cfg.vision_size}), cfg.vision_size
            config = SiglipVisionConfig(
                hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, image_size=size, patch_size=size // 4, vision_use_head=False,
            )  # fmt: skip
            tower = None if processor_only else AutoModel.from_config(config)
        else:  # the PIL backend: the same whether torchvision is installed or not
            pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
            load = partial(AutoImageProcessor.from_pretrained, **pil)
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
            return batch["features"], batch["feature_mask"]
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

    def embed(self, batch: dict) -> torch.Tensor:
        own, is_marker = self.marker_embeds(batch["input_ids"])
        text = torch.where(is_marker, own, self.lm.get_input_embeddings()(batch["input_ids"]))
        visual = self.projector(self.vision(batch)[0].to(text.dtype))
        index = batch["visual_index"].unsqueeze(-1).expand(-1, -1, visual.shape[-1])
        mixed = torch.where(batch["is_visual"].unsqueeze(-1), visual.gather(1, index), text)
        return mixed + self.type_embeds(batch["token_type_ids"])

    def run_lm(self, batch: dict, hidden_states: bool = False):
        mask, embeds = batch["attention_mask"], self.embed(batch)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=hidden_states
        )

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, L-1) negative log-likelihood of each next token; 0 where the label is -100."""
        return nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
        )

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.run_lm(batch, hidden_states=self.video_head is not None)
        loss = self.token_losses(out.logits, batch["labels"]).sum()
        count = (batch["labels"][:, 1:] != -100).sum()
        if self.video_head is not None:
            loss = loss + self.video_loss_weight * self.next_frame_loss(out.hidden_states[-1], batch) * count
        return loss, count

    def next_frame_loss(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """MSE between the prediction at visual position t and the input frame t+1 (both visual positions)."""
        tokens = self.vision(batch)[0]
        frames = tokens.gather(1, batch["visual_index"].unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        pairs = batch["is_visual"][:, :-1] & batch["is_visual"][:, 1:]
        pred = self.video_head(hidden[:, :-1][pairs])
        return nn.functional.mse_loss(pred.float(), frames[:, 1:][pairs].float())

    @torch.no_grad()
    def log_likelihood(self, batch: dict) -> torch.Tensor:
        """(B,) summed log-probability of each row's labelled tokens (ranking candidate answers)."""
        return -self.token_losses(self.run_lm(batch).logits, batch["labels"]).sum(-1)

    @torch.no_grad()
    def generate(self, batch: dict, num_beams: int, max_len: int, min_len: int, eos_id: int, pad_id: int):
        """Beam search from a left-padded prompt; returns the new token ids of each sample (eos and pad stripped).
        Position ids come from the attention mask (generate's own, as in training). Every new token gets the type
        of the prompt's last token, as GPT-2 extends token_type_ids: generate embeds new tokens with the LM's
        input embedding, so a hook adds the type there. Markers are never generated."""
        embeds = self.embed(batch)
        types = self.type_embeds(batch["token_type_ids"][:, -1:])
        hook = self.lm.get_input_embeddings().register_forward_hook(
            lambda module, args, out: out + types.repeat_interleave(len(out) // len(types), 0).to(out.dtype)
        )
        search = dict(num_beams=num_beams, max_new_tokens=max_len, min_new_tokens=min_len, do_sample=False)
        search |= dict(eos_token_id=eos_id, pad_token_id=pad_id, suppress_tokens=self.marker_ids.tolist())
        try:
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **search)
        finally:
            hook.remove()
        rows = [row[: row.index(eos_id)] if eos_id in row else row for row in out.tolist()]
        return [[t for t in row if t != pad_id] for row in rows]


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
    """`load_visual_prefix`'s directory: the LM (LoRA merged into its weights) and the tokenizer with
    save_pretrained, a vision tower with its image processor the same way in vision/, and visual_prefix.pt: the front
    end's width, the projector's kind, the marker tokens, whether they add token types, and every other weight
    (projector, markers)."""
    lm = model.lm.merge_and_unload() if hasattr(model.lm, "merge_and_unload") else model.lm
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
