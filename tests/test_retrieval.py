"""Retrieval: the real-format loader, recall@k by hand, chunked ranking vs a dense reference, from_pretrained,
learning on the embedded data (and failing without the right features), and 2 ranks == 1 rank under torchrun."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port
from helpers import read_metrics, shuffled_val_metric, train_ok, untrained_metrics

import metrics
import tasks
from data import InputError


def write_dataset(root, train, val, features):
    (root / "annotations").mkdir(parents=True)
    (root / "features").mkdir()
    (root / "annotations" / "train.json").write_text(json.dumps(train))
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    for name, array in features.items():
        np.save(root / "features" / f"{name}.npy", array)


def build(root, feature_dim=16):
    cfg = tasks.RetrievalConfig(data=tasks.DataConfig(root=root, num_workers=0), feature_dim=feature_dim)
    return tasks.RetrievalTask(cfg), cfg


def test_loader_reads_the_real_format(tmp_path):
    train = [
        {"image": "train2014/COCO_1.jpg", "caption": "a dog.", "image_id": "COCO_1"},
        {"image": "train2014/COCO_1.jpg", "caption": "a brown dog."},
        {"image": "train2014/COCO_2.jpg", "caption": ["a cat.", "a cat on a mat."]},  # eval shape in train: accepted
    ]
    val = [
        {"image": "val2014/COCO_3.jpg", "caption": ["a bird.", "a small bird."]},
        {"image": "COCO_4.png", "caption": "x"},
    ]
    feats = {"COCO_1": np.ones((3, 16), np.float32), "COCO_2": np.zeros(16, np.float32)}
    feats |= {"COCO_3": np.ones((2, 16), np.float32), "COCO_4": np.ones((5, 16), np.float32)}
    write_dataset(tmp_path, train, val, feats)
    task, _ = build(tmp_path)
    datasets = task.build_datasets()
    assert set(datasets) == {"train", "val"}  # test is optional
    assert [s["caption"] for s in datasets["train"].samples] == ["a dog.", "a brown dog.", "a cat.", "a cat on a mat."]
    assert [s["image_index"] for s in datasets["train"].samples] == [0, 0, 1, 1]
    assert len({s["id"] for s in datasets["train"].samples}) == 4
    assert [(s["id"], s["references"]) for s in datasets["val"].samples] == [
        ("COCO_3", ["a bird.", "a small bird."]),
        ("COCO_4", ["x"]),
    ]
    assert datasets["train"][2]["features"].shape == (1, 16)  # a single (D,) vector is one region
    assert datasets["val"].features.dim == 16


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"image": "a.jpg"}, r"train.json: entry 0: missing field\(s\) caption"),
        ({"image": "a.jpg", "caption": []}, "'caption' must be"),
        ({"caption": "x"}, "missing field\\(s\\) image_id or image"),
        ({"image": "missing.jpg", "caption": "x"}, "missing feature file for id 'missing'"),
    ],
)
def test_loader_errors_name_the_problem(tmp_path, entry, message):
    write_dataset(tmp_path, [entry], [{"image": "a.jpg", "caption": ["x"]}], {"a": np.ones(8, np.float32)})
    with pytest.raises(InputError, match=message):
        build(tmp_path, feature_dim=8)[0].build_datasets()


def test_wrong_feature_width_is_named(tmp_path):
    feats = {"a": np.ones(8, np.float32), "b": np.ones((2, 9), np.float32)}
    write_dataset(tmp_path, [{"image": "a.jpg", "caption": "x"}], [{"image": "b.jpg", "caption": ["y"]}], feats)
    with pytest.raises(InputError, match=r"'b' has shape \(2, 9\), expected \(T, 8\)"):
        build(tmp_path, feature_dim=8)[0].build_datasets()


def test_recall_by_hand():
    # 3 images (groups 0, 1, 2), 2 captions each; image 0's captions are texts 0 and 1, etc.
    sims = torch.tensor(
        [  # texts:  0    1    2    3    4    5
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: its best caption (0) is first     → rank 0
            [0.5, 0.0, 0.1, 0.2, 0.0, 0.0],  # image 1: best own (3: 0.2) below 0.5       → rank 1
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # image 2: best own (4: 0.5) below 4 others  → rank 4
        ]
    )
    text_owner = torch.tensor([0, 0, 1, 1, 2, 2])
    # Ranking with the identity as "embeddings" turns the table above into scores.
    ranks, top = metrics.retrieval_ranks(sims, torch.arange(3), torch.eye(6), text_owner, k=2, chunk=2)
    assert ranks.tolist() == [0, 1, 4]
    assert top.tolist() == [[0, 2], [0, 3], [0, 1]]
    text_ranks = [0, 1, 4]
    image_ranks = [0, 0, 1, 2, 0, 9]  # text → image, given
    m = metrics.recall_metrics(text_ranks, image_ranks)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == 100 and m["txt_r10"] == 100
    assert m["img_r1"] == pytest.approx(50) and m["img_r5"] == pytest.approx(500 / 6) and m["img_r10"] == 100
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["img_r_mean"] == pytest.approx((50 + 500 / 6 + 100) / 3)
    assert m["r_mean"] == m["agg_metrics"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_chunked_ranks_match_dense_reference():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(37, 16), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(111, 16), dim=-1)
    owner = torch.arange(111) % 37
    ranks, top = metrics.retrieval_ranks(images, torch.arange(37), texts, owner, k=5, chunk=4)
    # Dense reference, LAVIS's way: sort each row, the best position of any ground-truth caption.
    dense = images @ texts.T
    order = dense.argsort(dim=1, descending=True)
    expected = [min((order[i] == t).nonzero().item() for t in (owner == i).nonzero().flatten()) for i in range(37)]
    assert ranks.tolist() == expected
    assert torch.equal(top, order[:, :5])
    ranks, _ = metrics.retrieval_ranks(texts, owner, images, torch.arange(37), k=5, chunk=10)
    order = dense.T.argsort(dim=1, descending=True)
    assert ranks.tolist() == [(order[t] == owner[t]).nonzero().item() for t in range(111)]


def test_from_pretrained_loads_a_saved_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    import models

    texts = ["a red cup in the kitchen.", "a blue book in the office."] * 20
    tokenizer = models.train_tokenizer(texts, 200, list(tasks.EncoderTask.SPECIAL.values()), "[CLS] $A [SEP]")
    tokenizer.add_special_tokens(tasks.EncoderTask.SPECIAL)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ),
        add_pooling_layer=False,
    )
    bert.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    cfg = tasks.RetrievalConfig(model=dataclasses.replace(tasks.RetrievalConfig().model, name=str(tmp_path / "tiny")))
    task = tasks.RetrievalTask(cfg)
    datasets = task.build_datasets()
    model = task.build_model(datasets["train"], tmp_path / "run-tokenizer")
    for name, value in bert.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[name], value), name
    batch = task.collate([datasets["train"][i] for i in range(4)], train=True)
    loss, count = task.train_step(model, batch)
    assert count.item() == 4 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.slow
def test_learns_and_needs_the_right_features(tmp_path):
    before = untrained_metrics("retrieval", tmp_path)
    run = tmp_path / "run"
    train_ok(["retrieval", "--output-dir", run, "--max-steps", 100, "--batch-size", 32, "--data.num-workers", 0])
    val = [m for m in read_metrics(run) if "val/r_mean" in m]
    after = max(m["val/r_mean"] for m in val)
    assert before["r_mean"] < 35 and after > 85, (before, val)
    # Same checkpoint, every image given another image's features: back near chance.
    ablated = shuffled_val_metric("retrieval", run, tmp_path / "shuffled", "val/r_mean", "--data.num-workers", 0)
    assert ablated < 35, ablated
    print(
        f"retrieval val r_mean: untrained {before['r_mean']:.1f}, trained {after:.1f}, shuffled features {ablated:.1f}"
    )


@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path):
    """Per-rank batch 8 on 2 ranks == batch 16 on one, through train.py: DistributedSampler deals the same 16
    samples out to the two ranks, so the loss over the gathered embeddings, the gradient norm (logged before
    clipping) and, after the updates, the next steps' losses and the sharded evaluation must all agree."""
    common = ["--max-steps", 4, "--log-every", 1, "--model.dropout", 0, "--data.num-workers", 0, "--warmup-steps", 0]
    train_ok(["retrieval", "--output-dir", tmp_path / "one", "--batch-size", 16, *common])
    train_ok(["retrieval", "--output-dir", tmp_path / "two", "--batch-size", 8, *common], nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    worst = 0.0
    for a, b in zip(one, two, strict=True):
        assert a["step"] == b["step"]
        for key in ("train/loss", "train/grad_norm", "val/r_mean", "test/r_mean", "val/txt_r1", "val/img_r1"):
            if key in a:
                worst = max(worst, abs(a[key] - b[key]) / max(1.0, abs(a[key])))
                # The gradient norm sums thousands of fp32 terms in another order on 2 ranks: 1e-4 relative.
                rel = 1e-4 if key == "train/grad_norm" else 1e-5
                assert b[key] == pytest.approx(a[key], abs=1e-5, rel=rel), (key, a, b)
    print(f"retrieval 1 vs 2 ranks through train.py: worst relative difference {worst:.1e}")


GRADIENT_SCRIPT = """
import dataclasses, gc, os, sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, sys.argv[1])
import tasks


def main(distributed):
    out = Path(sys.argv[2])
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    default = tasks.RetrievalConfig()
    cfg = dataclasses.replace(
        default,
        data=dataclasses.replace(default.data, num_workers=0),
        model=dataclasses.replace(default.model, dropout=0.0),
    )
    task = tasks.RetrievalTask(cfg)
    train = task.build_datasets()["train"]
    torch.manual_seed(0)
    model = task.build_model(train, out / f"tokenizer{world}")
    wrapped = DistributedDataParallel(model) if distributed else model
    # 8 images x 2 captions; rank 0 gets each image's first caption, rank 1 its second: positives across ranks.
    batch = task.collate([train[i] for i in range(16)][rank::world], train=True)
    loss, count = task.train_step(wrapped, batch)
    loss.backward()
    stats = torch.stack([loss.detach(), count.float()])
    if distributed:
        dist.all_reduce(stats)
    for p in model.parameters():  # the loop's normalisation: DDP averaged over ranks; make it the global mean
        p.grad *= world / stats[1]
    if rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters()}
        torch.save({"loss": stats[0] / stats[1], "grads": grads}, out / f"grads{world}.pt")


distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
main(distributed)
if distributed:  # gloo work (DDP, the gather's autograd) freed at interpreter teardown would abort the process
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_gathered_loss_gradients_match_one_rank(tmp_path):
    """The exact gradients, parameter by parameter: with the differentiable gather, DDP's mean and the loop's
    x world / global count, 2 ranks of 8 give the gradient of one process on all 16 (1e-5)."""
    import subprocess
    import sys

    script = tmp_path / "grads.py"
    script.write_text(GRADIENT_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    for cmd in ([sys.executable, script], [*launch, script]):
        done = subprocess.run([*map(str, cmd), str(ROOT), str(tmp_path)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "grads1.pt"), torch.load(tmp_path / "grads2.pt")
    assert two["loss"].item() == pytest.approx(one["loss"].item(), abs=1e-5)
    worst = max((one["grads"][n] - two["grads"][n]).abs().max().item() for n in one["grads"])
    scale = max(g.abs().max().item() for g in one["grads"].values())
    assert worst < 1e-5, (worst, scale)
    print(
        f"retrieval 1 vs 2 ranks: loss {one['loss'].item():.6f} vs {two['loss'].item():.6f}, "
        f"max gradient difference {worst:.1e} (largest gradient {scale:.2f})"
    )


@pytest.mark.parametrize("preset", ["retrieval_coco", "retrieval_flickr"])
def test_presets_load(preset):
    cfg = tasks.load_preset(ROOT / "configs" / f"{preset}.yaml", "retrieval", tasks.RetrievalConfig())
    assert cfg.model.name == "bert-base-uncased" and cfg.max_epochs == 6 and cfg.batch_size == 32


@pytest.mark.parametrize("family", ["roberta", "distilbert", "clip"])
def test_any_text_encoder_family_trains_and_evaluates(family, tmp_path):
    """--model.name takes any AutoModel text encoder: its tokenizer frames texts as the family does (RoBERTa's
    <s> text </s>), RoBERTa and DistilBERT take no token types, CLIP's text tower (from a whole CLIP checkpoint) is
    causal and pooled at its eos; classification fuses regions into the encoder's input (not CLIP's)."""
    from helpers import ENCODER_FAMILIES, save_encoder_family

    name = str(save_encoder_family(family, tmp_path / family))
    first = ENCODER_FAMILIES[family][1].split()[0]
    for task_name in ("retrieval", "classification"):
        task_class, default = tasks.TASKS[task_name]
        task = task_class(dataclasses.replace(default, model=dataclasses.replace(default.model, name=name)))
        datasets = task.build_datasets()
        if family == "clip" and task_name == "classification":
            with pytest.raises(tasks.InputError, match="CLIP's text tower cannot take"):
                task.build_model(datasets["train"], tmp_path / "tokenizer")
            continue
        model = task.build_model(datasets["train"], tmp_path / "tokenizer")
        batch = task.collate([datasets["train"][i] for i in range(4)], train=True)
        assert batch["input_ids"][0, 0].item() == task.tokenizer.convert_tokens_to_ids(first)
        loss, count = task.train_step(model, batch)
        loss.backward()
        assert torch.isfinite(loss) and count.item() == 4
        assert task.valid_step(model.eval(), task.collate([datasets["val"][0]], train=False))
