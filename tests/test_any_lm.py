"""Any causal LM for the generative tasks: tiny random-init GPT-2, Llama, Qwen2, OPT, Mistral and Phi saved with
save_pretrained beside tokenizers with their family's quirks (tests/helpers.py), trained in-process on tiny embedded
data, evaluated with beam search and resumed exactly; freeze-lm, LoRA, export; batched generation and VQA ranking per
family; the shared type embeddings against GPT-2's own token types."""

import dataclasses
import json
from pathlib import Path
from unittest import mock

import faulty
import pytest
import torch
from helpers import generate_batched_and_alone, save_lm_family

import embedded
import models
import tasks
import train

# Each family trains with other model flags, so that every flag runs on some family.
FAMILY_FLAGS = {
    "gpt2": [],
    "llama": ["--model.freeze-lm", "--model.grad-checkpointing"],
    "qwen2": ["--model.lora-r", "4", "--model.lora-alpha", "32", "--model.chat-template"],
    "opt": ["--model.projector", "mlp", "--model.lm-lr", "3e-4"],
    "mistral": ["--model.lora-r", "4"],
    "phi": ["--model.freeze-lm"],
}
COMMON = ["--batch-size", "4", "--eval-batch-size", "2", "--num-beams", "2", "--max-len", "6"]
COMMON += ["--data.num-workers", "0", "--warmup-steps", "0", "--lr", "3e-3", "--model.dropout", "0"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Tiny embedded datasets (no test split) and every family's checkpoint."""
    base = tmp_path_factory.mktemp("any_lm")
    with mock.patch.dict(embedded.EMBEDDED_SPLITS, {"train": 4, "val": 3}, clear=True):
        embedded.make_embedded_avsd(base / "avsd")
    with mock.patch.dict(embedded.CAPTIONS_SPLITS, {"train": 8, "val": 2}, clear=True):
        embedded.make_embedded_captions(base / "captions")
    with mock.patch.dict(embedded.VQA_SPLITS, {"train": 4, "val": 2}, clear=True):
        embedded.make_embedded_vqa(base / "vqa")
    return {"base": base, **{family: save_lm_family(family, base / family) for family in FAMILY_FLAGS}}


def argv(roots, task: str, family: str, out: Path, *flags) -> list[str]:
    root = {"dialogue": "avsd", "captioning": "captions", "vqa": "vqa"}[task]
    name = ["--model.name", str(roots[family]), *FAMILY_FLAGS[family]]
    return [task, "--data.root", str(roots["base"] / root), "--output-dir", str(out), *COMMON, *name, *flags]


@pytest.fixture(scope="module")
def dialogue_runs(roots):
    """family → the run directory of 4 dialogue steps (checkpoints at 2 and 4, evaluated at 4), made on demand.
    TRAINED[family] is that run's model object as training left it (checkpoints leave frozen weights out)."""
    runs = {}
    build = tasks.DialogueTask.build_model

    def keep(self, *args):
        TRAINED[self.cfg.model.name] = build(self, *args)
        return TRAINED[self.cfg.model.name]

    def get(family: str) -> Path:
        if family not in runs:
            runs[family] = roots["base"] / f"run-{family}"
            with mock.patch.object(tasks.DialogueTask, "build_model", keep):
                train.main(argv(roots, "dialogue", family, runs[family], "--max-steps", "4", "--save-every", "2"))
            TRAINED[family] = TRAINED.pop(str(roots[family]))
        return runs[family]

    return get


TRAINED = {}


def ckpt(run: Path) -> dict:
    return torch.load(run / "ckpt_last.pt", weights_only=True)


def fresh_model(roots, family: str, run: Path, *flags) -> tuple[tasks.LMTask, torch.nn.Module, dict]:
    """The run's task and its model as built before any training step (same seed), with the datasets."""
    name, cfg = train.parse_config(argv(roots, "dialogue", family, run, *flags))
    task = tasks.TASKS[name][0](cfg)
    datasets = task.build_datasets()
    torch.manual_seed(cfg.seed)
    return task, task.build_model(datasets["train"], run / "tokenizer"), datasets


@pytest.mark.parametrize("family", FAMILY_FLAGS)
def test_trains_evaluates_with_beams_and_resumes_exactly(roots, dialogue_runs, family, tmp_path, monkeypatch):
    run = dialogue_runs(family)
    results = json.loads((run / "results" / "val_step4.json").read_text())
    assert len(results) == 3 and all(isinstance(r["prediction"], str) for r in results)
    assert (run / "tokenizer" / "tokenizer.json").is_file()

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="fails after step 2"):
        patch.setattr(train, "forward_backward", faulty.fail_after("raise", 2))
        train.main(argv(roots, "dialogue", family, resumed, "--max-steps", "4", "--save-every", "2"))
    train.main(argv(roots, "dialogue", family, resumed, "--max-steps", "4", "--save-every", "2", "--resume", "auto"))
    a, b = ckpt(run)["model"], ckpt(resumed)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "results" / "val_step4.json").read_text() == (run / "results" / "val_step4.json").read_text()

    def losses(path: Path) -> list:
        return [(m["step"], m.get("train/loss")) for m in map(json.loads, path.read_text().splitlines())]

    assert losses(resumed / "metrics.jsonl") == losses(run / "metrics.jsonl")

    captioning = tmp_path / "captioning"
    train.main(argv(roots, "captioning", family, captioning, "--max-steps", "3"))
    assert len(json.loads((captioning / "results" / "val_step3.json").read_text())) == 2


def test_freeze_lm_leaves_the_lm_bitwise_unchanged_and_trains_the_rest(roots, dialogue_runs):
    run = dialogue_runs("llama")
    _, model, _ = fresh_model(roots, "llama", run)
    before, after = model.state_dict(), TRAINED["llama"].state_dict()
    lm = [k for k in before if k.startswith("lm.")]
    assert lm and all(torch.equal(before[k], after[k]) for k in lm)
    assert not set(lm) & set(ckpt(run)["model"]) and ckpt(run)["frozen_sha256"]  # left out, their digest kept
    for part in ("projector.0.weight", "markers.weight"):
        assert not torch.equal(before[part], after[part]), part
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in ckpt(run)["optimizer"]["param_groups"]) == len(trainable)  # frozen: not in it


def test_pretrained_weights_train_at_a_fine_tuning_rate_new_weights_at_lr(roots, tmp_path):
    """--model.lm-lr unset: a pretrained LM trained in full at the lower of --lr and 1e-4, the projector (and
    markers) at --lr; LoRA's adapters at --lr; a given --model.lm-lr wins; the small model: --lr throughout."""

    def rates(family: str, *flags) -> tuple[float, set[float]]:
        _, model, _ = fresh_model(roots, family, tmp_path, *flags)
        optimizer = train.build_optimizer(
            model, train.parse_config(argv(roots, "dialogue", family, tmp_path, *flags))[1], False
        )
        lr = {p: group["lr"] for group in optimizer.param_groups for p in group["params"]}
        lm = {lr[p] for name, p in model.named_parameters() if name.startswith("lm.") and p.requires_grad}
        return lr[model.projector[0].weight], lm

    assert rates("gpt2") == (3e-3, {1e-4})  # COMMON's --lr 3e-3
    assert rates("gpt2", "--lr", "2e-5") == (2e-5, {2e-5})
    assert rates("gpt2", "--model.lm-lr", "5e-4") == (3e-3, {5e-4})
    assert rates("mistral") == (3e-3, {3e-3})  # LoRA
    assert models.ModelConfig().lm_rate(1e-3) == 1e-3


def test_lora_trains_only_the_adapters(roots, dialogue_runs):
    run = dialogue_runs("qwen2")
    _, model, _ = fresh_model(roots, "qwen2", run)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("lm.")} == {n for n in trainable if "lora_" in n} != set()
    before, after = model.state_dict(), TRAINED["qwen2"].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if k.startswith("lm.")} == {k for k in before if "lora_" in k}
    assert "projector.1.weight" in changed and "markers.weight" in changed


def test_export_loads_with_plain_transformers_and_generates_the_runs_text(roots, dialogue_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run = dialogue_runs("qwen2")  # LoRA (merged on export) and the chat template
    out = tmp_path / "export"
    train.main(
        [
            *argv(roots, "dialogue", "qwen2", tmp_path / "unused"),
            "--resume",
            str(run / "ckpt_best.pt"),
            "--export",
            str(out),
        ]
    )
    assert not (tmp_path / "unused").exists()
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert type(lm).__name__ == "Qwen2ForCausalLM" and not any("lora" in k for k in lm.state_dict())
    model, tokenizer = models.load_visual_prefix(out)
    task, _, datasets = fresh_model(roots, "qwen2", run)
    predictions = []
    for i in range(0, len(datasets["val"]), 2):
        batch = task.collate([datasets["val"][j] for j in range(i, min(i + 2, len(datasets["val"])))], train=False)
        predictions += [r["prediction"] for r in task.valid_step(model, batch)]
    results = json.loads((run / "results" / "val_step4.json").read_text())
    assert predictions == [r["prediction"] for r in results]
    assert len(tokenizer) == len(task.tokenizer)


def scaled(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights large enough that the logits have no near-ties (float rounding cannot flip a beam) and the
    samples' generations differ."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0 if p.dim() == 1 else 0.5)
    return model.eval()


@pytest.mark.parametrize("family", FAMILY_FLAGS)
def test_left_padded_batched_generation_and_ranking_equal_one_by_one(roots, family, tmp_path):
    """Position ids under left padding (from the attention mask, in training and in generate), the type of the
    generated tokens, beams, --min-len; VQA's rank inference; each family, with its flags (chat template...)."""
    task, model, datasets = fresh_model(roots, family, tmp_path)
    model = scaled(model)
    samples = [datasets["val"][i] for i in range(len(datasets["val"]))]
    batch = task.collate(samples, train=False)
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts must differ in length to test left padding"
    batched, alone = generate_batched_and_alone(task, model, samples, max_len=6)
    assert batched == alone and all(len(ids) >= 2 for ids in batched)
    assert not {t for ids in batched for t in ids} & set(model.marker_ids.tolist())
    assert len({tuple(ids) for ids in batched}) > 1, "a degenerate model would pass trivially"

    _, cfg = train.parse_config(argv(roots, "vqa", family, tmp_path, "--inference-method", "rank"))
    vqa = tasks.VQATask(dataclasses.replace(cfg, num_ans_candidates=2))
    vqa_sets = vqa.build_datasets()
    torch.manual_seed(0)
    model = scaled(vqa.build_model(vqa_sets["train"], tmp_path / "vqa-tokenizer"))
    questions = [vqa_sets["val"][i] for i in range(len(vqa_sets["val"]))]
    ranked = vqa.rank(model, vqa.collate(questions, train=False))
    assert ranked == [vqa.rank(model, vqa.collate([q], train=False))[0] for q in questions]
    assert set(ranked) <= set(vqa.candidates)


def test_gpt2_type_embeddings_equal_gpt2s_own_token_types(roots, tmp_path):
    """The shared mechanism (markers table added to the input) against GPT-2's token_type_ids (its word embeddings
    of the type tokens, added by GPT-2 itself): the same logits, the same beams. (Off by default with --model.name:
    tests/test_fidelity.py.)"""
    task, model, datasets = fresh_model(roots, "gpt2", tmp_path, "--model.token-types", "True")
    # Without the padded vocabulary rows, which scaled() fills: GPT-2's own generate would emit them.
    model.lm.resize_token_embeddings(model.lm.config.unpadded_vocab_size)
    del model.lm.config.unpadded_vocab_size
    model = scaled(model)
    with torch.no_grad():
        model.markers.weight.copy_(model.lm.get_input_embeddings().weight[model.marker_ids])
    batch = task.collate([datasets["val"][i] for i in range(len(datasets["val"]))], train=False)
    mask = batch["attention_mask"]
    untyped = model.embed({**batch, "token_type_ids": torch.full_like(mask, task.token["<pad>"])})
    own = model.lm(
        inputs_embeds=untyped,
        attention_mask=mask,
        token_type_ids=batch["token_type_ids"],
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
    ).logits
    shared = model.run_lm(batch).logits
    real = mask.bool()
    assert torch.allclose(shared[real], own[real], atol=1e-4) and not torch.allclose(shared[real], 0 * own[real])
    generated = model.lm.generate(
        inputs_embeds=untyped,
        attention_mask=mask,
        token_type_ids=batch["token_type_ids"],
        num_beams=3,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=task.token["<eos>"],
        pad_token_id=task.token["<pad>"],
        suppress_tokens=model.marker_ids.tolist(),
    )
    eos = task.token["<eos>"]
    expected = [row[: row.index(eos)] if eos in row else row for row in generated.tolist()]
    assert model.generate(batch, num_beams=3, max_len=6, min_len=0, eos_id=eos, pad_id=task.token["<pad>"]) == [
        [t for t in row if t != task.token["<pad>"]] for row in expected
    ]


def test_every_preset_loads_for_its_task():
    import yaml

    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
        task = yaml.safe_load(path.read_text())["task"]
        assert tasks.load_preset(path, task, tasks.TASKS[task][1]).model.name, path
