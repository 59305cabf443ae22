"""Dialogue collate (masks, token types, labels), model forward, beam generation, pretrained loading, metrics."""

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import save_lm_family
from test_avsd_data import multiref_dialog, ten_turn_dialog, write_avsd

import metrics
import models
import tasks
from models import ModelConfig


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = write_avsd(tmp_path_factory.mktemp("avsd"), [ten_turn_dialog("a"), ten_turn_dialog("b")])
    cfg = dataclasses.replace(
        tasks.TASKS["dialogue"][1],
        data=tasks.DataConfig(root=root),
        # The features are constant (ones): standardised, they would all be 0.
        model=ModelConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=300, dropout=0.0, feature_norm=False),
    )
    task = tasks.DialogueTask(cfg)
    datasets = task.build_datasets()
    model = task.build_model(datasets["train"], tmp_path_factory.mktemp("run") / "tokenizer")
    return task, datasets, model


def test_train_batch_labels_only_the_answer_and_its_eos(built):
    task, datasets, _ = built
    samples = [datasets["train"][i] for i in (0, 5)]  # no history vs 3 turns of history: different lengths
    batch = task.collate(samples, train=True)
    tok = task.token
    n_frames = 7
    assert batch["features"].shape == (2, n_frames, 4224)
    assert batch["is_visual"][:, :n_frames].all() and not batch["is_visual"][:, n_frames:].any()
    assert (batch["token_type_ids"][:, :n_frames] == tok["<video>"]).all()
    for row, sample in enumerate(samples):
        mask = batch["attention_mask"][row].bool()
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        labels = batch["labels"][row]
        answer = labels[labels != -100].tolist()
        assert answer[-1] == tok["<eos>"]
        assert task.tokenizer.decode(answer[:-1]) == sample["answer"]
        # the labelled tokens are exactly the input tokens at those positions, typed <speaker2>
        labelled = labels != -100
        assert batch["input_ids"][row][labelled].tolist() == answer
        assert (batch["token_type_ids"][row][labelled] == tok["<speaker2>"]).all()
        types = batch["token_type_ids"][row][n_frames:length].tolist()
        assert types[0] == tok["<cap>"]
        assert set(types) <= {tok["<cap>"], tok["<speaker1>"], tok["<speaker2>"]}
    assert batch["ids"] == [samples[0]["id"], samples[1]["id"]]


def test_eval_batch_is_a_left_padded_prompt_ending_in_speaker2(built):
    task, datasets, _ = built
    long_history = datasets["val"][0]
    short = dict(long_history, history=[], id="short")
    batch = task.collate([long_history, short], train=False)
    assert "labels" not in batch and batch["references"] == [[long_history["answer"]]] * 2
    assert (batch["input_ids"][:, -1] == task.token["<speaker2>"]).all()
    mask = batch["attention_mask"]
    assert mask[0].all() and not mask[1, 0] and mask[1, -1]  # the shorter prompt is padded on the left
    assert (batch["is_visual"].sum(1) == 7).all()


def test_forward_loss_is_summed_over_answer_tokens(built):
    task, datasets, model = built
    batch = task.collate([datasets["train"][i] for i in (0, 1, 9)], train=True)
    loss_sum, count = task.train_step(model, batch)
    assert count == (batch["labels"] != -100).sum()
    assert torch.isfinite(loss_sum) and loss_sum > 0
    loss_sum.backward()
    assert model.projector[0].weight.grad.abs().sum() > 0  # the video features reach the loss


def test_beam_generation_respects_min_and_max_len(built):
    task, datasets, model = built
    model.eval()
    batch = task.collate([datasets["val"][0], datasets["val"][1]], train=False)
    out = model.generate(
        batch, num_beams=3, max_len=6, min_len=4, eos_id=task.token["<eos>"], pad_id=task.token["<pad>"]
    )
    assert len(out) == 2 and all(4 <= len(ids) <= 6 for ids in out)
    results = task.valid_step(model, batch)
    assert [r["id"] for r in results] == ["a", "b"] and all(isinstance(r["prediction"], str) for r in results)


def test_pretrained_model_and_tokenizer_load_from_a_local_directory(built, tmp_path):
    from transformers import AutoModelForCausalLM

    task, datasets, _ = built
    pretrained = save_lm_family("gpt2", tmp_path / "pretrained")
    lm = AutoModelForCausalLM.from_pretrained(pretrained)
    cfg = dataclasses.replace(task.cfg, model=ModelConfig(name=str(pretrained)))
    pretrained_task = tasks.DialogueTask(cfg)
    model = pretrained_task.build_model(datasets["train"], tmp_path / "run" / "tokenizer")
    assert torch.equal(model.lm.transformer.h[0].attn.c_attn.weight, lm.transformer.h[0].attn.c_attn.weight)
    rows = model.lm.get_input_embeddings().weight.shape[0]
    assert model.lm.config.unpadded_vocab_size == len(pretrained_task.tokenizer) and rows % 64 == 0
    assert pretrained_task.max_positions == 256 - 1  # its bos (<|endoftext|>) starts every sequence
    loss_sum, count = model(pretrained_task.collate([datasets["train"][3]], train=True))
    assert torch.isfinite(loss_sum) and count > 0


def test_every_reference_of_a_multi_reference_file_goes_to_the_scorer(built, tmp_path, monkeypatch):
    task, _, _ = built
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # the Python tokenizer: no Java to start
    root = write_avsd(tmp_path, [multiref_dialog("CGRUM"), multiref_dialog("M8TPH")])
    samples = [
        {**s, "features": np.ones((7, 4224), np.float32)}
        for s in tasks.data.load_avsd(root / "annotations" / "test.json", train=False, max_turns=3)
    ]
    batch = task.collate(samples, train=False)
    references = multiref_dialog("x")["dialog"][-1]["answer"]
    assert batch["references"] == [references, references]
    # Each prediction is the third reference word for word: perfect only if all six reach the scorer (against the
    # first alone, Bleu_4 is 0.0).
    results = [
        {"id": i, "prediction": references[2], "references": r}
        for i, r in zip(batch["ids"], batch["references"], strict=True)
    ]
    assert task.after_evaluation(results, "test")["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_caption_metrics_on_hand_checkable_inputs():
    refs = {"1": ["a man is cooking pasta today"], "2": ["the dog runs across green grass"]}
    perfect = metrics.caption_metrics(
        {"1": "a man is cooking pasta today", "2": "the dog runs across green grass"}, refs
    )
    assert perfect["Bleu_1"] == pytest.approx(1.0) and perfect["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ROUGE_L"] == pytest.approx(1.0) and perfect["METEOR"] > 0.9
    assert perfect["CIDEr"] == pytest.approx(10.0, rel=1e-3)  # CIDEr-D of an exact match is 10
    wrong = metrics.caption_metrics({"1": "xylophone", "2": "zebra"}, refs)
    assert wrong["Bleu_1"] < 1e-6 and wrong["ROUGE_L"] == 0 and wrong["CIDEr"] == 0
    # unigram precision 3/3 with brevity penalty exp(1 - 6/3)
    half = metrics.caption_metrics({"1": "a man is", "2": "the dog runs"}, refs)
    assert half["Bleu_1"] == pytest.approx(math.exp(1 - 12 / 6), rel=1e-3)


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer is Java")
def test_ptb_tokenize_equals_pycocoevalcaps_tokenizer_and_raises_when_java_fails(monkeypatch):
    from pycocoevalcap.tokenizer import ptbtokenizer

    texts = {
        "a": ["A man, in a kitchen!", "it's 1,000 (x) “q” café"],
        "b": ["", "two\nlines\tand tabs..."],
        "c": ["$5 --"],
    }
    expected = ptbtokenizer.PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})
    assert metrics.ptb_tokenize(texts) == expected
    monkeypatch.setattr(ptbtokenizer, "STANFORD_CORENLP_3_4_1_JAR", "missing.jar")
    with pytest.raises(RuntimeError, match=r"PTB tokenizer failed \(exit 1\): .*PTBTokenizer"):
        metrics.ptb_tokenize(texts)


def test_caption_metrics_without_java_fall_back_and_say_so(monkeypatch, capsys):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    scores = metrics.caption_metrics({"1": "A man, cooking!"}, {"1": ["a man cooking"]})
    assert "METEOR" not in scores and scores["Bleu_1"] == pytest.approx(1.0)
    assert "java not found" in capsys.readouterr().err


def test_feature_norm_standardises_with_training_statistics_that_checkpoints_carry(tmp_path):
    """--model.feature-norm (the default): the front end standardises each feature dimension with the training
    split's mean and std, kept as buffers, so a checkpoint carries them (a resumed or evaluated run uses the
    statistics it trained with, whatever data it is built on). --model.no-feature-norm: features as they are."""
    root = write_avsd(tmp_path / "data", [ten_turn_dialog("a"), ten_turn_dialog("b")])
    rng = np.random.default_rng(0)
    for path in (root / "features").glob("*/*.npy"):
        shape = np.load(path).shape
        np.save(path, (10 + rng.uniform(0.5, 5, shape[1]) * rng.random(shape)).astype(np.float32))

    def build(feature_norm: bool):
        model_cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=300, feature_norm=feature_norm)
        task = tasks.DialogueTask(
            dataclasses.replace(tasks.DialogueConfig(), data=tasks.DataConfig(root=root), model=model_cfg)
        )
        datasets = task.build_datasets()
        model = task.build_model(datasets["train"], tmp_path / f"tokenizer-{feature_norm}")
        return task, task.collate([datasets["train"][0], datasets["train"][10]], train=True), model  # videos a, b

    _, batch, model = build(True)
    tokens, mask = model.vision(batch)
    frames = tokens[mask]  # every frame of both training videos once
    torch.testing.assert_close(frames.mean(0), torch.zeros(frames.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(frames.std(0, correction=0), torch.ones(frames.shape[1]), atol=1e-3, rtol=0)
    state = model.state_dict()
    assert {"vision.mean", "vision.std"} <= set(state)
    other = models.FeatureInput(model.vision.dim, (torch.zeros(model.vision.dim), torch.ones(model.vision.dim)))
    other.load_state_dict({"mean": state["vision.mean"], "std": state["vision.std"]})
    torch.testing.assert_close(other(batch)[0], tokens)

    _, batch, model = build(False)
    assert not any(k.startswith("vision.") for k in model.state_dict())
    assert model.vision(batch)[0] is batch["features"]
