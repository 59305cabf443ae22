"""Captioning: the COCO-Karpathy loader and its errors, collate, the caption metrics, and a learning run."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_lm_family, write_image_dataset

import embedded
import tasks
import train
from data import InputError

WIDTH = 16


def write_root(root: Path, train=None, val=None, features=None) -> Path:
    """A tiny dataset in the real layout: Karpathy-style annotations and one .npy per image."""
    train = (
        train
        if train is not None
        else [
            {"image": "train2014/a.jpg", "image_id": "a", "caption": "a red cup."},
            {"image": "train2014/a.jpg", "image_id": "a", "caption": "a cup that is red."},
            {"image": "train2014/b.jpg", "image_id": "b", "caption": ["a blue book.", "one blue book."]},
        ]
    )
    val = (
        val
        if val is not None
        else [
            {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["a green phone.", "a phone."]},
            {"image": "val2014/c.jpg", "image_id": "c", "caption": "a black towel."},
            {"image": "val2014/c.jpg", "image_id": "c", "caption": ["a towel."]},
        ]
    )
    features = (
        features
        if features is not None
        else {"a": (WIDTH,), "b": (3, WIDTH), "COCO_val2014_000000000042": (WIDTH,), "c": (2, WIDTH)}
    )
    return write_image_dataset(root, {"train": train, "val": val}, features)


def task_for(root: Path, **changes) -> tasks.CaptioningTask:
    cfg = dataclasses.replace(tasks.CaptioningConfig(), data=tasks.DataConfig(root=root), feature_dim=WIDTH, **changes)
    return tasks.CaptioningTask(cfg)


def test_loader_reads_both_caption_shapes(tmp_path):
    datasets = task_for(write_root(tmp_path)).build_datasets()
    assert set(datasets) == {"train", "val"}  # no test.json: no test split
    train_set, val_set = datasets["train"], datasets["val"]
    # Train: one sample per caption, whether an entry holds one caption or a list.
    assert [s["caption"] for s in train_set.samples] == [
        "a red cup.",
        "a cup that is red.",
        "a blue book.",
        "one blue book.",
    ]
    assert len({s["id"] for s in train_set.samples}) == 4
    # Eval: one sample per image with all its references; the feature id falls back to the image's file stem.
    assert [(s["image_id"], s["references"]) for s in val_set.samples] == [
        ("COCO_val2014_000000000042", ["a green phone.", "a phone."]),
        ("c", ["a black towel.", "a towel."]),
    ]
    assert train_set[2]["features"].shape == (3, WIDTH) and val_set[0]["features"].shape == (1, WIDTH)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_file", "annotation file not found"),
        ("malformed", "malformed JSON"),
        ("not_a_list", "expected a JSON list"),
        ("no_caption", "entry 1: missing field(s) caption"),
        ("no_image", "entry 0: missing field(s) image_id or image"),
        ("bad_caption", "'caption' must be a string or a non-empty list"),
        ("missing_feature", "missing feature file for id 'b'"),
        ("wrong_width", "feature file for id 'a' has shape (1, 3), expected (T, 16)"),
        ("empty", "empty split"),
    ],
)
def test_loader_errors_name_the_problem(tmp_path, breakage, message):
    entries = [{"image": "x/a.jpg", "image_id": "a", "caption": "a cup."}, {"image": "x/b.jpg", "image_id": "b"}]
    train_entries = {
        "no_caption": entries,
        "no_image": [{"caption": "a cup."}],
        "bad_caption": [{"image_id": "a", "caption": []}],
        "empty": [],
    }.get(breakage)
    features = {"a": (3,) if breakage == "wrong_width" else (WIDTH,), "c": (WIDTH,)}
    if breakage != "missing_feature":
        features["b"] = (WIDTH,)
    if train_entries is None:
        train_entries = [{"image_id": "a", "caption": "a cup."}, {"image_id": "b", "caption": "a b."}]
    root = write_root(tmp_path, train=train_entries, val=[{"image_id": "c", "caption": ["x."]}], features=features)
    path = root / "annotations" / "train.json"
    if breakage == "missing_file":
        path.unlink()
    elif breakage == "malformed":
        path.write_text('[{"image_id": "a", "caption": "a cup."},')
    elif breakage == "not_a_list":
        path.write_text('{"annotations": []}')
    with pytest.raises(InputError) as error:
        task_for(root).build_datasets()
    assert message in str(error.value)
    if breakage in ("missing_feature", "wrong_width"):
        assert str(root / "features") in str(error.value)  # the path of the bad file is named


def test_collate_labels_only_the_caption_and_prompts_end_at_cap(tmp_path):
    task = task_for(write_root(tmp_path))
    datasets = task.build_datasets()
    task.build_model(datasets["train"], tmp_path / "tokenizer")
    tok = task.token
    samples = [datasets["train"][i] for i in (0, 2)]  # 1 frame and 3 frames
    batch = task.collate(samples, train=True)
    caption = task.tokenizer("a red cup.", add_special_tokens=False)["input_ids"]
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row == [tok["<pad>"], tok["<cap>"], *caption, tok["<eos>"]]  # one frame slot, then the text
    assert batch["labels"][0][: len(row)].tolist() == [-100, -100, *caption, tok["<eos>"]]
    assert batch["is_visual"][1][:3].all() and not batch["is_visual"][1][3:].any()
    assert set(batch["token_type_ids"][1][:3].tolist()) == {tok["<image>"]}
    assert batch["ids"] == [samples[0]["id"], samples[1]["id"]]

    eval_batch = task.collate([datasets["val"][0], datasets["val"][1]], train=False)
    assert "labels" not in eval_batch
    assert (eval_batch["input_ids"][:, -1] == tok["<cap>"]).all()  # left-padded: every prompt ends at <cap>
    assert eval_batch["attention_mask"][0].tolist() == [0, 1, 1]  # 1 frame + <cap>, padded to 2 frames + <cap>
    assert eval_batch["references"] == [["a green phone.", "a phone."], ["a black towel.", "a towel."]]


def test_metrics_on_hand_checkable_captions():
    """One scorer run (PTB tokenizer + METEOR under Java when installed): image 1 captioned exactly, image 2 with
    two words that appear in no reference. The ground truth is the split's own references (LAVIS #598)."""
    task = tasks.CaptioningTask(tasks.CaptioningConfig())
    results = [
        {
            "id": "1",
            "prediction": "a man riding a horse on the beach",
            "references": ["a man riding a horse on the beach"],
        },
        {"id": "2", "prediction": "purple elephants", "references": ["two dogs playing in the snow"]},
    ]
    metrics = task.after_evaluation(results, "val")
    # Bleu_1: 8 of 10 predicted words match; brevity penalty exp(1 - 14 reference words / 10 predicted).
    assert metrics["Bleu_1"] == pytest.approx(0.8 * np.exp(1 - 14 / 10), rel=1e-4)
    assert metrics["ROUGE_L"] == pytest.approx(0.5)  # the mean of 1 and 0
    # Bleu_4: n-gram precisions 8/10, 7/8, 6/6, 5/5 (the 2-word caption has no 3- or 4-grams), same penalty.
    assert metrics["Bleu_4"] == pytest.approx(np.exp(1 - 14 / 10) * (0.8 * 7 / 8) ** 0.25, rel=1e-4)
    assert metrics["CIDEr"] == pytest.approx(5.0, rel=1e-3)  # CIDEr-D is 10 for an exact caption, 0 for image 2
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr"] + metrics["Bleu_4"])
    assert set(metrics) >= {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "agg_metrics"}
    if shutil.which("java"):
        assert 0 < metrics["METEOR"] < 1


def test_embedded_image_features_look_like_clip_ones(tmp_path):
    """The embedded image features (captioning, VQA, retrieval, SNLI-VE) as a CLIP ViT-B's last layer gives them:
    anisotropic (a large shared mean, so two images point the same way), a few outlier dimensions far larger than
    the rest, and patch tokens that share the pooled token's content."""
    embedded.make_embedded_captions(tmp_path)
    tokens = np.stack([np.load(p) for p in sorted((tmp_path / "features").glob("train*.npy"))])
    pooled = tokens[:, 0]
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    cosine = unit @ unit.T
    assert cosine[np.triu_indices(len(unit), 1)].mean() > 0.5
    magnitude = np.abs(pooled.mean(0))
    assert np.sort(magnitude)[-3] > 10 * np.median(magnitude)
    deviation, patches = pooled - pooled.mean(0), tokens[:, 1] - tokens[:, 1].mean(0)
    assert np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(deviation, patches, strict=True)]) > 0.3


def last_metrics(run_dir: Path, key: str) -> float:
    values = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [v[key] for v in values if key in v][-1]


@pytest.mark.slow
def test_learns_from_the_features_and_shuffling_them_hurts(tmp_path, monkeypatch):
    """A short CPU run on realistic data generated here with another seed than the embedded one lifts CIDEr far
    above an untrained model's; the same checkpoint scores far lower when every image gets another image's features.
    To keep it short, the test split is left out and the scorer runs its Java-free path (Python tokenizer, no
    METEOR; each JVM start costs seconds): the Java path is covered by test_metrics_on_hand_checkable_captions."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    torch.set_num_threads(1)
    root = tmp_path / "data"
    embedded.make_embedded_captions(root, seed=1)
    (root / "annotations" / "test.json").unlink()
    common = ["captioning", "--data.root", str(root), "--num-beams", "3", "--data.num-workers", "0"]
    train.main([*common, "--max-steps", "1", "--output-dir", str(tmp_path / "untrained")])
    before = last_metrics(tmp_path / "untrained", "val/CIDEr")
    run = tmp_path / "run"
    train.main([*common, "--max-steps", "100", "--warmup-steps", "10", "--eval-every", "100", "--output-dir", str(run)])
    after = last_metrics(run, "val/CIDEr")
    ckpt = str(run / "ckpt_best.pt")
    train.main(
        [*common, "--evaluate", "--resume", ckpt, "--data.shuffle-features", "--output-dir", str(tmp_path / "s")]
    )
    shuffled = last_metrics(tmp_path / "s", "val/CIDEr")
    print(f"CIDEr untrained {before:.3f} trained {after:.3f} shuffled features {shuffled:.3f}")
    assert before < 0.5 and after > 5.0, (before, after)  # measured: 0.01, 7.64
    assert shuffled < after / 2, (shuffled, after)  # measured: 0.78
    shutil.rmtree(tmp_path / "data")


def test_pretrained_gpt2_from_a_local_directory(tmp_path):
    """--model.name: a GPT-2 and its tokenizer saved with save_pretrained (a tiny one here: no download) get the
    task's special tokens and embeddings resized to match (and padded); a train step and beam search run on it."""
    from transformers import AutoTokenizer

    import models

    pretrained = save_lm_family("gpt2", tmp_path / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    task = task_for(write_root(tmp_path / "data"), model=models.ModelConfig(name=str(pretrained)))
    datasets = task.build_datasets()
    model = task.build_model(datasets["train"], tmp_path / "run" / "tokenizer")
    assert model.lm.config.unpadded_vocab_size == len(task.tokenizer) > len(tokenizer)  # then padded to 64s
    assert model.lm.get_input_embeddings().num_embeddings % 64 == 0
    loss, count = task.train_step(model, task.collate([datasets["train"][i] for i in range(3)], train=True))
    assert torch.isfinite(loss) and count > 0
    loss.backward()
    results = task.valid_step(model.eval(), task.collate([datasets["val"][0], datasets["val"][1]], train=False))
    assert [r["id"] for r in results] == ["COCO_val2014_000000000042", "c"]
    assert all(isinstance(r["prediction"], str) for r in results)


def test_preset_mirrors_lavis_caption_coco_ft():
    path = Path(__file__).resolve().parent.parent / "configs" / "caption_coco_ft.yaml"
    cfg = tasks.load_preset(path, "captioning", tasks.TASKS["captioning"][1])
    assert (cfg.lr, cfg.max_epochs, cfg.batch_size, cfg.num_beams, cfg.max_len, cfg.min_len) == (1e-5, 5, 32, 3, 20, 5)
    assert cfg.model.name == "gpt2" and cfg.best_metric == "agg_metrics"
