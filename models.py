"""Models and tokenizers, all from transformers (imported lazily: `train.py --help` must not pay for them).

`ModelConfig.name` unset builds a small model from a config and a BPE tokenizer trained on the training text, so
the default runs with no download; set, it is a hub name or a local directory for `from_pretrained`.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = None
    """Pretrained model: a hub name (`gpt2`) or a local directory. Unset: a small model built from the fields below
    and a tokenizer trained on the training split, so nothing is downloaded."""
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
    feature_norm: bool = True
    """Standardise each feature dimension with the mean and standard deviation of the training split's features
    (computed when the model is built, from up to 256 videos or images; kept in checkpoints). Real features have a
    large shared mean and dimensions of very different scales (I3D ~0.4, VGGish 0..255) that otherwise hide what
    varies between videos from the projector. Off: features enter as they are."""

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"--model.n-embd ({self.n_embd}) must be divisible by --model.n-head ({self.n_head})")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE trained on the given text: deterministic for the same text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def load_tokenizer(name: str | Path, special_tokens: dict):
    """A pretrained tokenizer with the task's special tokens added (no-op if they are already there)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name))
    tok.add_special_tokens(special_tokens)
    return tok


def build_tokenizer(cfg: ModelConfig, tokenizer_dir: Path, special_tokens: dict, texts: Callable[[], Iterable[str]]):
    """The run's tokenizer: pretrained (`cfg.name`), the one saved in `tokenizer_dir` (a resumed run), or a BPE
    trained on `texts()` with the special tokens. Saved into `tokenizer_dir` (by rank 0) if it is not there yet."""
    import torch.distributed as dist

    if cfg.name is not None:
        tokenizer = load_tokenizer(cfg.name, special_tokens)
    elif (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tokenizer_dir, special_tokens)
    else:
        specials = [v for v in special_tokens.values() if isinstance(v, str)]
        specials += special_tokens.get("additional_special_tokens", [])
        tokenizer = train_tokenizer(texts(), cfg.vocab_size, specials)
        tokenizer.add_special_tokens(special_tokens)
    if not (tokenizer_dir / "tokenizer.json").is_file() and (not dist.is_initialized() or dist.get_rank() == 0):
        tokenizer.save_pretrained(tokenizer_dir)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# The visual front end: every model reads its visual input through one, then projects it (`projector`) into its own
# width. Parameter names follow the split: `vision.*` (front end), `projector.*`, the rest is the language side.


class FeatureInput(nn.Module):
    """Pre-extracted features: `batch["features"]` (B, T, D) and `batch["feature_mask"]` (B, T), True on real
    frames, standardised per dimension when given `stats` (mean, std of the training split: buffers, so they travel
    in checkpoints), else as they are. Any front end (a vision tower on `batch["pixels"]`) has the same interface:
    `dim` and `forward(batch) -> (tokens, mask)`."""

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


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 with features prepended (video-grounded dialogue, captioning, generative VQA)


class FeatureGPT2(nn.Module):
    """GPT-2 LM whose input sequence mixes projected visual features and text tokens (LAVIS's `gpt_dialogue`).

    A batch is a packed sequence: `is_visual` marks the positions that take a visual token (`visual_index` says
    which of the front end's tokens), all other positions take the embedding of `input_ids`. `token_type_ids` are
    embedded with the word embeddings and added by GPT-2 itself, so generation keeps extending them. Loss is summed
    over the labelled tokens and returned with their count, so the caller can normalise over the whole global batch.
    """

    def __init__(self, lm, vision: nn.Module, video_loss_weight: float = 0.0):
        super().__init__()
        self.lm = lm
        self.vision = vision
        width = lm.config.n_embd
        # Normalised so that features of any scale enter at the scale of GPT-2's hidden states (raw I3D/VGGish
        # values are orders of magnitude larger than word embeddings and would swamp the residual stream).
        self.projector = nn.Sequential(nn.Linear(vision.dim, width), nn.LayerNorm(width))
        self.video_loss_weight = video_loss_weight
        # Only built when used, so DDP never sees a parameter without a gradient.
        self.video_head = nn.Linear(width, vision.dim) if video_loss_weight > 0 else None

    def embed(self, batch: dict) -> torch.Tensor:
        text = self.lm.get_input_embeddings()(batch["input_ids"])
        visual = self.projector(self.vision(batch)[0].to(text.dtype))
        index = batch["visual_index"].unsqueeze(-1).expand(-1, -1, visual.shape[-1])
        visual = visual.gather(1, index)
        return torch.where(batch["is_visual"].unsqueeze(-1), visual, text)

    def run_lm(self, batch: dict, hidden_states: bool = False):
        mask = batch["attention_mask"]
        return self.lm(
            inputs_embeds=self.embed(batch),
            attention_mask=mask,
            token_type_ids=batch["token_type_ids"],
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            output_hidden_states=hidden_states,
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
        """Beam search from a left-padded prompt; returns the new token ids of each sample (eos and pad stripped)."""
        out = self.lm.generate(
            inputs_embeds=self.embed(batch),
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            num_beams=num_beams,
            max_new_tokens=max_len,
            min_new_tokens=min_len,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        results = []
        for row in out.tolist():
            if eos_id in row:
                row = row[: row.index(eos_id)]
            results.append([t for t in row if t != pad_id])
        return results


def build_gpt2(cfg: ModelConfig, tokenizer):
    """GPT-2 LM: pretrained from `cfg.name` (embeddings resized for added tokens) or small from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ids["pad_token_id"] = tokenizer.pad_token_id
    if cfg.name is not None:
        lm = GPT2LMHeadModel.from_pretrained(cfg.name)
        lm.resize_token_embeddings(len(tokenizer))
        lm.config.update(ids)
        lm.generation_config.update(**ids)
        return lm
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        # GPT-2's 0.02 suits width 768; at a small width the model is slow to start reading its visual input (the
        # embedded AVSD's main job: with 0.02 its answers do not depend on the video after 10 epochs, with
        # 1/sqrt(width) they do from epoch 4).
        initializer_range=cfg.n_embd**-0.5,
        **ids,
    )
    lm = GPT2LMHeadModel(config)
    lm.generation_config.update(**ids)
    return lm


# ----------------------------------------------------------------------------------------------------------------
# BERT-like text encoder with image features (retrieval, classification)


def build_text_encoder(cfg: ModelConfig, tokenizer):
    """BertModel: pretrained from `cfg.name` (embeddings resized for added tokens) or small from a config. No
    pooler: the tasks read the [CLS] state themselves, and an unused pooler would leave DDP with gradless weights."""
    from transformers import BertConfig, BertModel

    if cfg.name is not None:
        encoder = BertModel.from_pretrained(cfg.name, add_pooling_layer=False)
        encoder.resize_token_embeddings(len(tokenizer))
        return encoder
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=4 * cfg.n_embd,
        max_position_embeddings=cfg.n_positions,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=tokenizer.pad_token_id,
        # BERT's 0.02 suits width 768; at a small width the model sits on a loss plateau for hundreds of steps
        # (embedded SNLI-VE: chance accuracy after 300 steps, against 96% after 100 with 1/sqrt(width)).
        initializer_range=cfg.n_embd**-0.5,
    )
    return BertModel(config, add_pooling_layer=False)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions: (B, T, D), (B, T) bool → (B, D)."""
    mask = mask.unsqueeze(-1).to(x.dtype)
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


class DualEncoder(nn.Module):
    """Image and text embedded separately into one normalised space (retrieval). Images: every region projected
    by an MLP, mean-pooled, projected; texts: the encoder's [CLS] state, projected. `logit_scale` is the learned
    inverse temperature of the contrastive loss, kept as a log and clamped to [1, 100] as in CLIP."""

    MAX_LOGIT_SCALE = 100.0

    def __init__(self, text_encoder, vision: nn.Module, embed_dim: int, temperature: float):
        super().__init__()
        width = text_encoder.config.hidden_size
        self.text_encoder = text_encoder
        self.vision = vision
        self.projector = nn.Sequential(nn.Linear(vision.dim, width), nn.GELU(), nn.Linear(width, width))
        self.image_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def embed_images(self, batch: dict) -> torch.Tensor:
        tokens, mask = self.vision(batch)
        pooled = masked_mean(self.projector(tokens), mask)
        return nn.functional.normalize(self.image_proj(pooled).float(), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cls = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return nn.functional.normalize(self.text_proj(cls).float(), dim=-1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, logit scale) for a batch of matching pairs."""
        images = self.embed_images(batch)
        texts = self.embed_texts(batch["input_ids"], batch["attention_mask"])
        return images, texts, self.logit_scale.clamp(0, math.log(self.MAX_LOGIT_SCALE)).exp()


class FusionClassifier(nn.Module):
    """One encoder over image and text together (SNLI-VE): the projected regions are placed right after [CLS]
    in the encoder's inputs_embeds (token type 1, text is type 0), and the class is read from [CLS]'s last state."""

    def __init__(self, encoder, vision: nn.Module, num_classes: int):
        super().__init__()
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
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types).last_hidden_state
        return self.head(hidden[:, 0]).float()
