"""Classification (SNLI-VE): the real-format loader and its errors, accuracy by hand, from_pretrained, and learning
on the embedded data (where the label depends on the image) and failing with another image's features."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, run_train
from helpers import read_metrics, shuffled_val_metric, train_ok, untrained_metrics

import metrics
import tasks
from data import InputError


def write_dataset(root, entries: dict, features: dict):
    (root / "annotations").mkdir(parents=True)
    (root / "features").mkdir()
    for split, split_entries in entries.items():
        (root / "annotations" / f"{split}.json").write_text(json.dumps(split_entries))
    for name, array in features.items():
        np.save(root / "features" / f"{name}.npy", array)


def build(root, feature_dim):
    cfg = tasks.ClassificationConfig(data=tasks.DataConfig(root=root, num_workers=0), feature_dim=feature_dim)
    return tasks.ClassificationTask(cfg)


def test_loader_reads_the_real_format(tmp_path):
    train = [
        {"image": "Flickr30K/1000092795.jpg", "sentence": "Two men are outside.", "label": "entailment"},
        {"image": "Flickr30K/1000092795.jpg", "sentence": "Two men sleep.", "label": "contradiction"},
        {"image": "Flickr30K/10002456.jpg", "sentence": "A crowd waits for a bus.", "label": "neutral"},
    ]
    val = [{"image": "10002456.jpg", "sentence": "People are outside.", "label": "entailment", "instance_id": "x"}]
    features = {"1000092795": np.ones((4, 12), np.float32), "10002456": np.zeros((2, 12), np.float32)}
    write_dataset(tmp_path, {"train": train, "val": val, "test": val}, features)
    task = build(tmp_path, feature_dim=12)
    datasets = task.build_datasets()
    assert set(datasets) == {"train", "val", "test"}
    assert [s["label"] for s in datasets["train"].samples] == [0, 2, 1]  # entailment, contradiction, neutral
    assert [s["image_id"] for s in datasets["train"].samples] == ["1000092795", "1000092795", "10002456"]
    task.build_model(datasets["train"], tmp_path / "tokenizer")  # the tokenizer, trained on the sentences
    batch = task.collate([datasets["train"][i] for i in range(3)], train=True)
    assert batch["features"].shape == (3, 4, 12) and batch["feature_mask"].sum(1).tolist() == [4, 4, 2]
    assert batch["labels"].tolist() == [0, 2, 1] and batch["ids"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"image": "a.jpg", "sentence": "x"}, r"train.json: entry 0: missing field\(s\) label"),
        ({"image": "a.jpg", "sentence": "x", "label": "yes"}, "label 'yes' is not one of entailment, neutral"),
        ({"image": "a.jpg", "sentence": "", "label": "neutral"}, "'sentence' must be a non-empty string"),
        ({"image": "b.jpg", "sentence": "x", "label": "neutral"}, "missing feature file for id 'b'"),
    ],
)
def test_loader_errors_name_the_problem(tmp_path, entry, message):
    ok = {"image": "a.jpg", "sentence": "x", "label": "neutral"}
    write_dataset(tmp_path, {"train": [entry], "val": [ok]}, {"a": np.ones(8, np.float32)})
    with pytest.raises(InputError, match=message):
        build(tmp_path, feature_dim=8).build_datasets()


def test_accuracy_by_hand():
    labels = ["entailment", "entailment", "neutral", "contradiction", "contradiction", "contradiction"]
    predictions = ["entailment", "neutral", "neutral", "contradiction", "entailment", "contradiction"]
    m = metrics.accuracy_metrics(predictions, labels, tasks.ClassificationTask.LABELS)
    assert m["accuracy"] == m["agg_metrics"] == pytest.approx(400 / 6)
    assert m["acc_entailment"] == 50 and m["acc_neutral"] == 100 and m["acc_contradiction"] == pytest.approx(200 / 3)


def test_from_pretrained_loads_a_saved_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    import models

    texts = ["a red cup in the kitchen.", "a blue book in the office."] * 20
    tokenizer = models.train_tokenizer(texts, 200, list(tasks.EncoderTask.SPECIAL.values()), "[CLS] $A [SEP]")
    tokenizer.add_special_tokens(tasks.EncoderTask.SPECIAL)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    bert = BertModel(config, add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    default = tasks.ClassificationConfig()
    task = tasks.ClassificationTask(
        dataclasses.replace(default, model=dataclasses.replace(default.model, name=str(tmp_path / "tiny")))
    )
    datasets = task.build_datasets()
    model = task.build_model(datasets["train"], tmp_path / "run-tokenizer")
    for name, value in bert.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    batch = task.collate([datasets["train"][i] for i in range(4)], train=True)
    loss, count = task.train_step(model, batch)
    assert count.item() == 4 and torch.isfinite(loss)
    assert len(task.valid_step(model.eval(), task.collate([datasets["val"][0]], train=False))) == 1


@pytest.mark.slow
def test_learns_and_needs_the_right_features(tmp_path):
    before = untrained_metrics("classification", tmp_path)
    run = tmp_path / "run"
    train_ok(
        [
            "classification",
            "--output-dir",
            run,
            "--max-steps",
            250,
            "--max-epochs",
            20,
            "--batch-size",
            32,
            "--data.num-workers",
            0,
        ]
    )
    val = [m for m in read_metrics(run) if "val/accuracy" in m]
    after = max(m["val/accuracy"] for m in val)
    # Measured 80.0. Reading the thing off the image alone gives 66.7 (neutral right, entailment and contradiction at
    # chance); with realistic features the colour comparison comes later (100% after 350 steps of a 500-step run).
    assert before["accuracy"] < 45 and after > 65, (before, val)
    ablated = shuffled_val_metric("classification", run, tmp_path / "shuffled", "val/accuracy", "--data.num-workers", 0)
    assert ablated < 50, ablated
    print(
        f"classification val accuracy: untrained {before['accuracy']:.1f}, trained {after:.1f}, "
        f"shuffled features {ablated:.1f}"
    )


def test_preset_loads():
    cfg = tasks.load_preset(ROOT / "configs" / "snli_ve.yaml", "classification", tasks.ClassificationConfig())
    assert cfg.model.name == "bert-base-uncased" and cfg.lr == 2e-5 and cfg.max_epochs == 10


def test_bad_data_root_is_one_clear_error(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "features").mkdir()
    done = run_train(["classification", "--data.root", tmp_path, "--output-dir", tmp_path / "run"])
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1] == f"error: annotation file not found: {tmp_path}/annotations/train.json"
    )
