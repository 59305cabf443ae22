"""Batching must not change results: beam search on a left-padded batch generates exactly what it generates for
each sample alone, and a right-padded training batch has the summed loss of its samples."""

import json

import numpy as np
import pytest
import torch
from helpers import generate_batched_and_alone

import data
from models import ModelConfig
from tasks import DataConfig, DialogueConfig, DialogueTask

WORDS = ["the", "a", "man", "woman", "cup", "book", "door", "kitchen", "walks", "holds", "opens", "red", "what", "is"]


def words(rng, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def task_and_model(tmp_path_factory):
    """A small AVSD root whose samples differ in frame count and text length, a random-init VisualPrefixLM whose
    weights are large enough that its logits have no near-ties (so float rounding cannot flip a beam)."""
    root = tmp_path_factory.mktemp("avsd")
    rng = np.random.default_rng(0)
    for stream in data.AVSD_STREAMS:
        (root / "features" / stream).mkdir(parents=True)
    (root / "annotations").mkdir()
    splits = {}
    for split, n in [("train", 6), ("val", 5)]:
        dialogs = []
        for i in range(n):
            video = f"{split}{i}"
            frames = int(rng.integers(2, 9))
            for stream, width in data.AVSD_STREAMS.items():
                np.save(root / "features" / stream / f"{video}.npy", rng.standard_normal((frames, width), np.float32))
            turns = [{"question": words(rng, 2, 9), "answer": words(rng, 2, 5)} for _ in range(rng.integers(1, 4))]
            dialogs.append({"image_id": video, "caption": words(rng, 1, 7), "summary": "", "dialog": turns})
        splits[split] = dialogs
        (root / "annotations" / f"{split}.json").write_text(json.dumps({"dialogs": dialogs}))
    cfg = DialogueConfig(
        data=DataConfig(root=root, num_workers=0),
        model=ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=300, dropout=0.0),
    )
    task = DialogueTask(cfg)
    datasets = task.build_datasets()
    torch.manual_seed(0)
    model = task.build_model(datasets["train"], root / "tokenizer")
    with torch.no_grad():  # each from its own seed: a table's size (the padded vocabulary) changes no other's draw
        for i, p in enumerate(model.parameters()):
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
    return task, model.eval(), datasets


def test_batched_beam_search_equals_one_by_one(task_and_model):
    task, model, datasets = task_and_model
    samples = [datasets["val"][i] for i in range(len(datasets["val"]))]
    batch = task.collate(samples, train=False)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "prompts must differ in length to test padding"
    assert (batch["attention_mask"][:, 0] == 0).any(), "evaluation batches are left-padded"
    batched, alone = generate_batched_and_alone(task, model, samples, max_len=8)
    assert batched == alone
    assert all(len(ids) >= 2 for ids in batched)
    assert len({tuple(ids) for ids in batched}) > 1, "a degenerate model would pass trivially"


def test_right_padded_training_batch_loss_is_the_sum_of_its_samples(task_and_model):
    task, model, datasets = task_and_model
    samples = [datasets["train"][i] for i in range(8)]
    loss, count = model(task.collate(samples, train=True))
    parts = [model(task.collate([s], train=True)) for s in samples]
    assert count.item() == sum(c.item() for _, c in parts)
    assert loss.item() == pytest.approx(sum(s.item() for s, _ in parts), rel=1e-5)
