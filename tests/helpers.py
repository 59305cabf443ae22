"""Helpers for end-to-end tests: train.py that must succeed, metrics.jsonl, and the untrained baseline a training
run must beat."""

import dataclasses
import json
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from conftest import ROOT, run_train


def train_ok(args, nproc: int | None = None, cwd: Path = ROOT):
    """train.py in a subprocess (torchrun with `nproc` ranks); fails the test with its output if it fails."""
    done = run_train(args, nproc=nproc, cwd=cwd)
    assert done.returncode == 0, f"train.py {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_metrics(run_dir: Path) -> dict[int, dict]:
    """step → everything logged at that step, throughput (timing: samples/s, tokens/s, MFU) left out."""
    merged = {}
    for entry in read_metrics(run_dir):
        timing = {k for k in entry if k.endswith(("_per_s", "/mfu"))}
        merged.setdefault(entry.pop("step"), {}).update({k: v for k, v in entry.items() if k not in timing})
    return merged


def untrained_metrics(task_name: str, tmp_path: Path, seed: int = 42) -> dict[str, float]:
    """Val metrics of the task's freshly initialised model (the baseline a training run must beat clearly)."""
    import torch
    from torch.utils.data import DataLoader

    import tasks

    task_class, default = tasks.TASKS[task_name]
    cfg = dataclasses.replace(default, data=dataclasses.replace(default.data, num_workers=0))
    task = task_class(cfg)
    datasets = task.build_datasets()
    torch.manual_seed(seed)
    model = task.build_model(datasets["train"], tmp_path / "tokenizer").eval()
    loader = DataLoader(datasets["val"], batch_size=32, collate_fn=partial(task.collate, train=False))
    return task.after_evaluation(task.evaluation(model, loader, lambda batch: batch), "val")


def shuffled_val_metric(task_name: str, run_dir: Path, out_dir: Path, key: str, *flags) -> float:
    """The run's best checkpoint evaluated with every sample given another sample's features: val `key`."""
    args = ["--evaluate", "--resume", run_dir / "ckpt_best.pt", "--output-dir", out_dir, "--data.shuffle-features"]
    train_ok([task_name, *args, *flags])
    (value,) = [m[key] for m in read_metrics(out_dir) if key in m]
    return value


def write_image_dataset(root: Path, splits: dict[str, list], features: dict[str, tuple], seed: int = 0) -> Path:
    """The image tasks' real layout: ROOT/annotations/{split}.json and a random ROOT/features/{id}.npy per id."""
    import numpy as np

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    (root / "features").mkdir()
    for split, entries in splits.items():
        (root / "annotations" / f"{split}.json").write_text(json.dumps(entries))
    for image_id, shape in features.items():
        np.save(root / "features" / f"{image_id}.npy", rng.standard_normal(shape).astype(np.float32))
    return root


# Tiny random-init causal LMs of each family, saved with save_pretrained beside a tokenizer that has the family's
# quirks: special tokens (bos, eos, pad) as the family sets them, whether encoding a text prepends bos, and Qwen2's
# chat template. (special tokens, bos, eos, pad, bos prepended)
LM_FAMILIES = {
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, False),  # bos == eos, no pad
    "llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>", None, True),  # no pad
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|endoftext|>", False),
    "opt": (["<pad>", "</s>", "<unk>"], "</s>", "</s>", "<pad>", True),  # bos == eos
    "mistral": (["<unk>", "<s>", "</s>"], "<s>", "</s>", None, True),  # as Llama: no pad
    "phi": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, False),  # Phi-2: GPT-2's tokenizer
}
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LM_TEXT = [
    "a red cup on the kitchen table. what is the man holding? he holds a blue book and opens the door.",
    "the woman walks to the green phone. is there a dog? no, two cats sit by the window.",
]


def save_lm_family(
    family: str,
    directory: Path,
    width: int = 32,
    seed: int = 0,
    positions: int = 256,
    texts: list[str] | None = None,
    vocab_size: int = 300,
) -> Path:
    """A tiny `family` causal LM (2 layers) and its tokenizer (a BPE trained on `texts`, default LM_TEXT), saved
    into `directory`."""
    import torch
    from tokenizers import processors
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        PhiConfig,
        Qwen2Config,
    )

    import models

    specials, bos, eos, pad, prepend_bos = LM_FAMILIES[family]
    tokenizer = models.train_tokenizer(texts or LM_TEXT * 3, vocab_size, specials)
    if prepend_bos:
        bos_id = tokenizer.convert_tokens_to_ids(bos)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, bos_id)]
        )
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = bos, eos, pad
    if family == "qwen2":
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    blocks = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=positions)
    config = {
        "gpt2": lambda: GPT2Config(n_embd=width, n_layer=2, n_head=2, n_positions=positions, **ids),
        "llama": lambda: LlamaConfig(num_key_value_heads=1, intermediate_size=2 * width, **blocks, **ids),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=1, intermediate_size=2 * width, **blocks, **ids),
        "opt": lambda: OPTConfig(ffn_dim=2 * width, word_embed_proj_dim=width, **blocks, **ids),
        "mistral": lambda: MistralConfig(num_key_value_heads=1, intermediate_size=2 * width, **blocks, **ids),
        "phi": lambda: PhiConfig(intermediate_size=2 * width, partial_rotary_factor=0.5, **blocks, **ids),
    }[family]()
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


# Tiny text encoders of each family beside tokenizers that frame a text as the family does: (specials, template,
# pad). CLIP is saved whole (both towers): the encoder tasks take its text tower.
ENCODER_FAMILIES = {
    "bert": (["[PAD]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", "[PAD]"),
    "roberta": (["<s>", "<pad>", "</s>"], "<s> $A </s>", "<pad>"),
    "distilbert": (["[PAD]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", "[PAD]"),
    "clip": (["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>", "<|endoftext|>"),
}


def save_encoder_family(family: str, directory: Path, width: int = 32) -> Path:
    """A tiny `family` text encoder and its tokenizer (a BPE trained on LM_TEXT), saved into `directory`."""
    import torch
    import transformers as hf

    import models

    specials, template, pad = ENCODER_FAMILIES[family]
    tokenizer = models.train_tokenizer(LM_TEXT * 3, 300, specials, template)
    tokenizer.pad_token = pad
    tokenizer.save_pretrained(directory)
    n, pad_id = len(tokenizer), tokenizer.pad_token_id
    blocks = dict(hidden_size=width, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * width)
    torch.manual_seed(0)
    if family == "clip":
        text = dict(vocab_size=n, eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), **blocks)
        config = hf.CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=16, **blocks))
        model = hf.CLIPModel(config)
    elif family == "distilbert":
        config = hf.DistilBertConfig(vocab_size=n, dim=width, n_layers=1, n_heads=2, hidden_dim=2 * width)
        model = hf.DistilBertModel(config)
    else:
        types = {"type_vocab_size": 1} if family == "roberta" else {}  # as roberta-base: one token type
        config = hf.AutoConfig.for_model(family, vocab_size=n, pad_token_id=pad_id, **types, **blocks)
        model = hf.AutoModel.from_config(config)
    model.save_pretrained(directory)
    return directory


def generate_batched_and_alone(task, model, samples: list, max_len: int) -> tuple[list, list]:
    """Beam search (3 beams, --min-len 2) over the samples as one left-padded batch, and over each one alone."""
    eos, pad = task.token["<eos>"], task.token["<pad>"]
    generate = partial(model.generate, num_beams=3, max_len=max_len, min_len=2, eos_id=eos, pad_id=pad)
    return generate(task.collate(samples, train=False)), [generate(task.collate([s], train=False))[0] for s in samples]


def comparable_weights(state: dict) -> dict:
    """A state dict without the key third of GPT-2's attention biases, which nothing the model computes depends on
    (softmax is shift-invariant): its gradient is float rounding noise, which Adam scales up to updates of ~lr, so it
    differs between runs that only round differently (2 ranks and 1 process, a hand-written loop)."""
    out = dict(state)
    for name, value in state.items():
        if name.endswith("attn.c_attn.bias"):
            third = len(value) // 3
            out[name] = torch.cat([value[:third], value[2 * third :]])
    return out


def pixel_root(root: Path, make, splits: dict, sizes: dict) -> Path:
    """An embedded pixel dataset cut to `sizes` (no test split)."""
    with mock.patch.dict(splits, sizes):
        make(root, pixels=True)
    (root / "annotations" / "test.json").unlink()
    return root
