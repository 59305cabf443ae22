"""The training step and the data transport: train.py's update is the textbook one, and batches built in loader
workers arrive equal to the task's collate, features in their files' dtype."""

from functools import partial
from itertools import islice

import numpy as np
import pytest
import torch
from helpers import comparable_weights, read_metrics, train_ok

import data
import models
import train
from tasks import TASKS


def test_a_train_py_step_is_the_textbook_step(tmp_path):
    """Mean loss over the labelled tokens, gradients clipped to --max-grad-norm, AdamW, the LR schedule: after four
    steps with clipping active, train.py's weights and logged gradient norms equal a hand-written loop's."""
    argv = ["dialogue", "--model.n-layer", "1", "--model.n-embd", "64", "--model.dropout", "0", "--max-steps", "4"]
    argv += ["--max-grad-norm", "0.5", "--log-every", "1", "--num-beams", "1", "--max-len", "4", "--no-report-metric"]
    run_dir = tmp_path / "run"
    train_ok([*argv, "--output-dir", run_dir])
    logged = [e["train/grad_norm"] for e in read_metrics(run_dir) if "train/grad_norm" in e]

    name, cfg = train.parse_config(argv)
    task = TASKS[name][0](cfg)
    dataset = task.build_datasets()["train"]
    torch.manual_seed(cfg.seed)  # as train.py seeds the initial weights
    model = task.build_model(dataset, run_dir / "tokenizer")  # the run's tokenizer, loaded
    optimizer = train.build_optimizer(model, cfg, fused=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(train.lr_factor, cfg=cfg, total_steps=4))
    sampler = data.ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, cfg.batch_size, sampler=sampler, collate_fn=partial(task.collate, train=True), drop_last=True
    )
    norms = []
    for batch in islice(loader, 4):
        loss_sum, count = model(batch)
        (loss_sum / count).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item())
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()

    assert min(norms) > cfg.max_grad_norm  # clipping was active on every step
    assert logged == pytest.approx(norms, rel=1e-4)
    ours = torch.load(run_dir / "ckpt_last.pt", weights_only=True)["model"]
    ours, theirs = comparable_weights(ours), comparable_weights(model.state_dict())
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("for_training", [True, False])
def test_worker_batches_equal_the_collate(tmp_path, for_training):
    _, cfg = train.parse_config(["dialogue", "--data.num-workers", "2", "--eval-batch-size", "16"])
    task = TASKS["dialogue"][0](cfg)
    dataset = task.build_datasets()["train"]
    task.build_model(dataset, tmp_path / "tokenizer")
    loader = train.build_loader(task, dataset, cfg, rank=0, world=1, train=for_training, pin_memory=False)
    order = list(loader.sampler)
    for k, batch in enumerate(islice(loader, 3)):
        expected = task.collate([dataset[i] for i in order[16 * k : 16 * (k + 1)]], train=for_training)
        assert batch.keys() == expected.keys()
        for key, value in expected.items():
            if torch.is_tensor(value):
                assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
            else:
                assert batch[key] == value, key


def test_float16_feature_files_cross_as_float16_and_give_the_float32_model_input(tmp_path):
    """Features keep their files' dtype through the workers (half the bytes for float16 files); the model reads
    them as float32, so its input equals that of the same values stored as float32."""
    rng = np.random.default_rng(0)
    values = {f"v{i}": rng.standard_normal((3 + i, 8)).astype(np.float16) for i in range(3)}
    batches = {}
    for dtype in (np.float16, np.float32):
        (tmp_path / str(dtype) / "s").mkdir(parents=True)
        for name, array in values.items():
            np.save(tmp_path / str(dtype) / "s" / f"{name}.npy", array.astype(dtype))
        store = data.FeatureStore(tmp_path / str(dtype), {"s": None}, max_len=16)
        dataset = data.FeatureDataset([{"id": n, "image_id": n} for n in values], store)
        loader = torch.utils.data.DataLoader(dataset, 3, num_workers=1, collate_fn=lambda s: data.stack_features(
            [x["features"] for x in s]))  # fmt: skip
        batches[dtype] = next(iter(loader))
    assert batches[np.float16][0].dtype == torch.float16 and batches[np.float32][0].dtype == torch.float32
    front = models.FeatureInput(8)
    as_half, as_float = ({"features": b[0], "feature_mask": b[1]} for b in batches.values())
    assert torch.equal(front(as_half)[0], front(as_float)[0]) and front(as_half)[0].dtype == torch.float32


def test_training_flops_count_each_matmul_weight_by_what_its_backward_computes():
    """6 FLOPs per token per trainable weight, 4 per frozen one that gradients pass through, 2 per frozen front-end
    weight; embedding lookups free unless tied to the output head; attention 12 x layers x width x length."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    class Model(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm, self.vision, self.projector = lm, torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
            self.markers = torch.nn.Embedding(3, 8)  # a lookup
            self.vision.requires_grad_(False)

        def parts(self):
            return {"lm": self.lm, "vision": self.vision}

    torch.manual_seed(0)
    gpt2 = Model(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2)))
    gpt2.lm.transformer.h[0].requires_grad_(False)
    n = {name: p.numel() for name, p in gpt2.named_parameters()}  # the tied head appears once, as wte
    frozen_block = sum(v for k, v in n.items() if k.startswith("lm.transformer.h.0."))
    trained = sum(n.values()) - n["lm.transformer.wpe.weight"] - n["markers.weight"] - frozen_block - 40
    expected = 6 * trained + 4 * frozen_block + 2 * 40 + 12 * 2 * 8 * 10
    assert train.train_flops_per_token(gpt2, 10) == expected
    # The tied head (wte) runs on the labelled share of the tokens only: the loss applies it to those rows.
    head = 6 * n["lm.transformer.wte.weight"]
    assert train.train_flops_per_token(gpt2, 10, head_share=0.25) == pytest.approx(expected - 0.75 * head)

    class Bare(torch.nn.Module):  # the LM alone
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def parts(self):
            return {"lm": self.lm}

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )
    n = sum(p.numel() for p in llama.parameters()) - 50 * 8  # the input embedding is a lookup; lm_head is not
    assert train.train_flops_per_token(Bare(llama), 7) == 6 * n + 12 * 3 * 8 * 7
