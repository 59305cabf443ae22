"""Pretrained vision-language models (issue 17): tiny random-init checkpoints of each family, saved with
save_pretrained beside their processors (tokenizer with the family's special tokens, image token and chat template;
image processor), fine-tuned on the generative tasks through train.py: what the labels cover, training, beam search,
exact resume, VQA rank, export, DDP, and the checkpoints it cannot serve."""

import dataclasses
import json
import math
import shutil
from functools import cache
from pathlib import Path
from unittest import mock

import faulty
import pytest
import torch
from helpers import generate_batched_and_alone, read_metrics, train_ok

import data
import embedded
import models
import tasks
import train

LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf's: no end-of-turn token (the answer ends with eos)
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = (  # HuggingFaceTB/SmolVLM-256M-Instruct's
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-2B-Instruct's, without its default system message
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# family → (the generation prompt's end, what precedes an answer, what ends it)
WRITTEN = {
    "llava": ("ASSISTANT:", " ", "</s>"),
    "idefics3": ("Assistant:", " ", "<end_of_utterance>"),
    "qwen2_vl": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    "blip2": ("", " ", "</s>"),
    "paligemma": ("\n", "", "<eos>"),
}
WIDTH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
LLAMA = dict(**WIDTH, num_key_value_heads=1, max_position_embeddings=512)
VISION = dict(**WIDTH, image_size=32, patch_size=8)


def tokenizer(texts: list[str], specials: list[str], bos: str | None, eos: str, pad: str, prepend_bos: bool):
    """A BPE trained on the task texts, with the family's special tokens; `prepend_bos`: encoding adds bos (Llama)."""
    from tokenizers import processors

    tok = models.train_tokenizer(texts, 500, specials)
    if prepend_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
        )
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
    return tok


def save_family(family: str, directory: Path, texts: list[str]) -> Path:
    """A tiny random-init `family` VLM and its processor, saved into `directory` as a hub download is on disk."""
    import transformers as hf
    from transformers.models.blip import image_processing_pil_blip as blip
    from transformers.models.clip import image_processing_pil_clip as clip
    from transformers.models.idefics3 import image_processing_pil_idefics3 as idefics3

    def ids(*tokens):
        return dict(
            zip(("bos_token_id", "eos_token_id", "pad_token_id"), tok.convert_tokens_to_ids(tokens), strict=True)
        )

    torch.manual_seed(0)
    if family == "llava":
        tok = tokenizer(texts, ["<unk>", "<s>", "</s>", "<pad>", "<image>"], "<s>", "</s>", "<pad>", True)
        images = clip.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = hf.LlavaProcessor(
            images, tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1
        )
        text = hf.LlamaConfig(vocab_size=len(tok), **LLAMA, **ids("<s>", "</s>", "<pad>"))
        config = hf.LlavaConfig(
            vision_config=hf.CLIPVisionConfig(**VISION),
            text_config=text,
            image_token_id=tok.convert_tokens_to_ids("<image>"),
        )
        template = LLAVA_TEMPLATE
    elif family == "idefics3":
        grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>"]
        tok = tokenizer(
            texts, [*specials, "<global-img>", *grid], "<|im_start|>", "<end_of_utterance>", "<|endoftext|>", False
        )
        images = idefics3.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        processor = hf.Idefics3Processor(images, tok, image_seq_len=4)  # (32 / 8)^2 patches / scale_factor^2
        text = hf.LlamaConfig(
            vocab_size=len(tok), **LLAMA, **ids("<|im_start|>", "<end_of_utterance>", "<|endoftext|>")
        )
        vision = hf.Idefics3Config.sub_configs["vision_config"](**VISION)
        config = hf.Idefics3Config(
            vision_config=vision, text_config=text, scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>")
        )
        template = IDEFICS3_TEMPLATE
    elif family == "blip2":
        tok = tokenizer(texts, ["<pad>", "</s>", "<unk>", "<image>"], "</s>", "</s>", "<pad>", True)
        processor = hf.Blip2Processor(
            blip.BlipImageProcessorPil(size={"height": 32, "width": 32}), tok, num_query_tokens=4
        )
        text = hf.OPTConfig(
            vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
            word_embed_proj_dim=32, max_position_embeddings=512, **ids("</s>", "</s>", "<pad>"),
        )  # fmt: skip
        qformer = dict(**WIDTH, encoder_hidden_size=32, vocab_size=len(tok))
        image = tok.convert_tokens_to_ids("<image>")
        config = hf.Blip2Config(
            vision_config=VISION,
            qformer_config=qformer,
            text_config=text.to_dict(),
            num_query_tokens=4,
            image_token_index=image,
        )
        template = None
    elif family == "paligemma":
        tok = tokenizer(texts, ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], "<bos>", "<eos>", "<pad>", False)
        images = models.siglip_pil_processor(32)
        images.image_seq_length = 16  # (32 / 8)^2 patches
        processor = hf.PaliGemmaProcessor(images, tok)  # adds its <loc>/<seg> tokens
        text = hf.GemmaConfig(vocab_size=len(tok), head_dim=16, **LLAMA, **ids("<bos>", "<eos>", "<pad>"))
        image = tok.convert_tokens_to_ids("<image>")
        config = hf.PaliGemmaConfig(
            vision_config=hf.SiglipVisionConfig(**VISION), text_config=text, image_token_index=image, projection_dim=32
        )
        template = None
    elif family == "qwen2_vl":
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as qwen

        pads = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tok = tokenizer(
            texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *pads], None, "<|im_end|>", "<|endoftext|>", False
        )
        images = qwen.Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, patch_size=8)
        processor = hf.Qwen2VLProcessor(images, tok, hf.Qwen2VLVideoProcessor(size=images.size, patch_size=8))
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        text = dict(
            vocab_size=len(tok), **LLAMA, rope_parameters=rope, **ids("<|im_start|>", "<|im_end|>", "<|endoftext|>")
        )
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8)
        tokens = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                          tok.convert_tokens_to_ids(pads), strict=True))  # fmt: skip
        config = hf.Qwen2VLConfig(vision_config=vision, text_config=text, **tokens)
        template = QWEN2_VL_TEMPLATE
    processor.chat_template = template
    hf.AutoModelForImageTextToText.from_config(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


# Qwen2-VL's processor holds a video processor, which needs torchvision (requirements-dev.txt).
NATIVE_VIDEO = pytest.mark.skipif(not has_torchvision(), reason="Qwen2-VL's video processor needs torchvision")
FAMILIES = ["llava", "idefics3", "blip2", "paligemma", pytest.param("qwen2_vl", marks=NATIVE_VIDEO)]


def pixel_root(root: Path, make, splits: dict, sizes: dict) -> Path:
    """An embedded pixel dataset cut to `sizes` (no test split)."""
    with mock.patch.dict(splits, sizes):
        make(root, pixels=True)
    (root / "annotations" / "test.json").unlink()
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    return {
        "captioning": pixel_root(
            base / "captions", embedded.make_embedded_captions, embedded.CAPTIONS_SPLITS, {"train": 12, "val": 4}
        ),
        "vqa": pixel_root(base / "vqa", embedded.make_embedded_vqa, embedded.VQA_SPLITS, {"train": 4, "val": 2}),
        "dialogue": pixel_root(
            base / "avsd", embedded.make_embedded_avsd, embedded.EMBEDDED_SPLITS, {"train": 4, "val": 2}
        ),
    }


@pytest.fixture(scope="module")
def checkpoint(roots, tmp_path_factory):
    """family → its tiny checkpoint (made once, on first use), its tokenizer trained on the tasks' texts."""
    texts = [tasks.CaptioningTask.PROMPT, tasks.VQATask.PROMPT]
    for root in roots.values():
        for split in ("train", "val"):
            texts.append(json.dumps(json.loads((root / "annotations" / f"{split}.json").read_text())))
    base = tmp_path_factory.mktemp("checkpoints")
    return cache(lambda family: save_family(family, base / family, texts * 2))


TINY = ["--num-beams", "2", "--max-len", "5", "--log-every", "1", "--warmup-steps", "0", "--lr", "1e-2"]
TINY += ["--batch-size", "4", "--data.num-workers", "0", "--no-report-metric"]


def argv(task: str, roots, checkpoint, family: str, *more) -> list[str]:
    return [task, "--data.root", str(roots[task]), "--model.name", str(checkpoint(family)), *TINY, *map(str, more)]


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run) if "train/loss" in m}


def build(args: list[str], tmp_path: Path):
    """(task, datasets, model) as train.py builds them for `args`."""
    name, cfg = train.parse_config(args)
    return train.build(name, cfg, tmp_path / "tokenizer")


# ----------------------------------------------------------------------------------------------------------------
# How a conversation is written


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_the_answer_and_end_of_turn_only(roots, checkpoint, family, tmp_path):
    """Decoded, the labelled positions of a training batch are each caption as the family writes a reply (after its
    generation prompt) and its end-of-turn token; what precedes them is, token for token, the generation batch's
    prompt (image tokens expanded by the processor, left padding stripped)."""
    task, datasets, model = build(argv("captioning", roots, checkpoint, family), tmp_path)
    samples = [datasets["train"][i] for i in range(4)]
    batch, prompts = task.collate(samples, train=True), task.collate(samples, train=False)
    ends_prompt, lead, end = WRITTEN[family]
    decode = partial_decode(task.tokenizer)
    image = task.chat.processor.tokenizer.convert_tokens_to_ids(str(task.chat.processor.image_token))
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row] != -100
        assert decode(batch["input_ids"][row][labelled]) == lead + sample["caption"] + end
        real = batch["attention_mask"][row].bool()
        assert not (labelled & ~real).any() and not (labelled & (batch["input_ids"][row] == image)).any()
        assert (batch["input_ids"][row] == image).sum() > 0  # the processor expanded the image tokens
        prompt = prompts["input_ids"][row][prompts["attention_mask"][row].bool()]
        assert torch.equal(batch["input_ids"][row][real & ~labelled], prompt)
        assert decode(prompt).endswith(ends_prompt)


def partial_decode(tokenizer):
    return lambda ids: tokenizer.decode(ids.tolist(), skip_special_tokens=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_left_padded_batch_generates_what_each_sample_generates_alone(roots, checkpoint, family, tmp_path):
    """VQA questions of different lengths, beam search as one left-padded batch and one at a time."""
    task, datasets, model = build(argv("vqa", roots, checkpoint, family), tmp_path)
    samples = [datasets["val"][i] for i in range(len(datasets["val"]))]
    assert len({len(s["question"]) for s in samples}) > 1
    batched, alone = generate_batched_and_alone(task, model.eval(), samples, max_len=6)
    assert batched == alone and all(len(row) >= 2 for row in batched)
