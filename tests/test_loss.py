"""The loss on the labelled positions only, the padded vocabulary, host syncs and --compile (issue 15): the loss and
its gradients equal the full-logits formula for every family of test_any_lm.py, the output head never sees more than a
chunk of rows, the padded vocabulary rows are never generated or ranked (an export leaves them out) and stay zero
through training and an exact resume, a training step reads nothing back from the device, and a compiled model stops
compiling after its first batches."""

import copy
import re
import traceback
from contextlib import nullcontext
from functools import partial
from unittest import mock

import faulty
import pytest
import torch
from helpers import read_metrics, save_lm_family
from test_any_lm import FAMILY_FLAGS
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import embedded
import models
import tasks
import train

TINY = ["--model.n-layer", "1", "--model.n-embd", "32", "--model.n-head", "2", "--num-beams", "2", "--max-len", "5"]
TINY += ["--data.num-workers", "0", "--model.dropout", "0", "--no-report-metric"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Tiny embedded AVSD and VQA, and every family's checkpoint."""
    base = tmp_path_factory.mktemp("loss")
    with mock.patch.dict(embedded.EMBEDDED_SPLITS, {"train": 8, "val": 3}, clear=True):
        embedded.make_embedded_avsd(base / "avsd")
    with mock.patch.dict(embedded.VQA_SPLITS, {"train": 6, "val": 3}, clear=True):
        embedded.make_embedded_vqa(base / "vqa")
    return {"base": base, **{family: save_lm_family(family, base / family) for family in FAMILY_FLAGS}}


def build(args: list[str], tokenizer_dir):
    """(task, model, datasets) as train.py builds them from `args`."""
    name, cfg = train.parse_config(args)
    task = tasks.TASKS[name][0](cfg)
    datasets = task.build_datasets()
    torch.manual_seed(cfg.seed)
    return task, task.build_model(datasets["train"], tokenizer_dir), datasets


def family_args(roots, family: str, task: str = "dialogue", *flags) -> list[str]:
    root = roots["base"] / {"dialogue": "avsd", "vqa": "vqa"}[task]
    return [task, "--data.root", str(root), "--model.name", str(roots[family]), *FAMILY_FLAGS[family], *flags]


def without_dropout(model: nn.Module) -> nn.Module:
    """Dropout off, the model left in training mode (gradient checkpointing stays on where it is set)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout"):  # OPT's, Llama's: plain floats
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model.train()


def unpadded(model: models.VisualPrefixLM) -> models.VisualPrefixLM:
    """A copy of `model` whose LM has the vocabulary it had before models.pad_vocabulary."""
    copied = copy.deepcopy(model)
    lm = copied.lm.get_base_model() if hasattr(copied.lm, "get_base_model") else copied.lm
    rows = lm.config.unpadded_vocab_size
    lm.resize_token_embeddings(rows)
    del lm.config.unpadded_vocab_size
    lm.generation_config.suppress_tokens = None
    assert lm.get_output_embeddings().weight.shape[0] == rows
    return copied


def full_logits_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token losses as VisualPrefixLM computed them before the loss moved to the labelled positions: cross
    entropy over all (B, L, V) logits of the LM's own forward. And the last hidden states."""
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.lm(
        inputs_embeds=model.embed(batch), attention_mask=mask, position_ids=positions, output_hidden_states=True
    )
    losses = nn.functional.cross_entropy(
        out.logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none"
    )
    return losses, out.hidden_states[-1]


def full_logits_forward(model, batch: dict) -> torch.Tensor:
    """VisualPrefixLM.forward's summed loss as it was, the next-frame loss included."""
    losses, hidden = full_logits_losses(model, batch)
    count = (batch["labels"][:, 1:] != -100).sum()
    tokens = model.vision(batch)[0]
    frames = tokens.gather(1, batch["visual_index"].unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    pairs = batch["is_visual"][:, :-1] & batch["is_visual"][:, 1:]
    pred = model.video_head(hidden[:, :-1][pairs])
    mse = nn.functional.mse_loss(pred.float(), frames[:, 1:][pairs].float())
    return losses.sum() + model.video_loss_weight * mse * count


def labelled_eval_batch(task, samples: list) -> dict:
    """An evaluation batch (left-padded prompts) labelled on every real text token: padding in front of the labels."""
    batch = task.collate(samples, train=False)
    unlabelled = ~batch["attention_mask"].bool() | batch["is_visual"]
    return {**batch, "labels": batch["input_ids"].masked_fill(unlabelled, -100)}


def named(name: str, message: str) -> str:
    return f"{name}: {message}"


def assert_gradients_equal(model, reference, tolerance: float) -> None:
    """Equal gradients, parameter by parameter; the vocabulary rows the reference lacks have none."""
    pairs = zip(model.named_parameters(), reference.named_parameters(), strict=True)
    checked = 0
    for (name, p), (_, q) in pairs:
        if q.grad is None:
            assert p.grad is None, name
            continue
        rows = q.grad.shape[0]
        torch.testing.assert_close(p.grad[:rows], q.grad, rtol=tolerance, atol=tolerance, msg=partial(named, name))
        assert not p.grad[rows:].any(), name
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("family", FAMILY_FLAGS)
def test_losses_and_gradients_equal_the_full_logits_formula(roots, family, tmp_path):
    """forward (the loss with the next-frame loss, on a right-padded training batch run without a padding mask) and
    log_likelihood (per row, on left-padded rows) against the full-logits formula on the same model without its
    padded vocabulary rows, with each family's flags (LoRA, freeze-lm, gradient checkpointing, MLP projector): the
    mean loss (what train.py steps on), its gradients and the log-likelihoods to 1e-6, in float32."""
    task, model, datasets = build(family_args(roots, family, "dialogue", "--model.video-loss-weight", "0.5"), tmp_path)
    assert model.lm.get_input_embeddings().num_embeddings % models.VOCAB_MULTIPLE == 0
    model = without_dropout(model)
    reference = unpadded(model)
    samples = [datasets["train"][i] for i in range(4)]
    batch = task.collate(samples, train=True)
    assert batch["right_padded"] and (batch["attention_mask"][:, -1] == 0).any(), "rows must differ in length"

    loss, count = model(batch)
    expected = full_logits_forward(reference, batch)
    assert count == (batch["labels"][:, 1:] != -100).sum() > 0
    torch.testing.assert_close(loss / count, expected / count, rtol=1e-6, atol=1e-6)
    (loss / count).backward()
    (expected / count).backward()
    assert_gradients_equal(model, reference, 1e-6)

    scored = labelled_eval_batch(task, samples)
    assert (scored["attention_mask"][:, 0] == 0).any(), "rows must differ in length to pad in front"
    with torch.no_grad():
        expected = -full_logits_losses(reference, scored)[0].sum(-1)
    torch.testing.assert_close(model.log_likelihood(scored), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_a_head_that_does_more_than_a_linear_layer_is_followed_or_refused(family):
    """The loss's logits (output_logits on the backbone's states) equal the LM's own where its forward transforms
    them (Gemma 2's soft-capping, Cohere's and Granite's scales); a transform output_logits does not apply is refused
    when the LM is built (here GPT-2 given a Cohere-style scale it ignores), not trained on other logits."""
    import transformers

    width = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=300)
    config = {
        "gemma2": lambda: transformers.Gemma2Config(**width, intermediate_size=64, head_dim=16),
        "cohere": lambda: transformers.CohereConfig(**width, intermediate_size=64, logit_scale=0.5),
        "granite": lambda: transformers.GraniteConfig(**width, intermediate_size=64, logits_scaling=4.0),
    }[family]()
    assert models.output_logits_match(transformers.AutoModelForCausalLM.from_config(config))
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300))
    lm.config.logit_scale = 0.5
    with pytest.raises(models.LoadError, match="changes its output head's logits"):
        models.adapt(lm, models.ModelConfig(name="tiny"), tokenizer=range(300))  # (adapt reads its length only)


def test_the_output_head_never_sees_more_than_a_chunk(tmp_path, monkeypatch):
    """With a chunk of 8 rows: the head gets at most 8 rows a call (in the forward pass and in its recomputation in
    the backward pass), no tensor kept for the backward pass is larger than 8 x V, and the loss and gradients are
    those of one chunk for all rows. The instrument sees the logits: with one chunk it finds (N, V) tensors."""
    task, model, datasets = build(["dialogue", *TINY], tmp_path / "tokenizer")
    head = model.lm.get_output_embeddings()
    vocab = head.weight.shape[0]
    batch = task.collate([datasets["train"][i] for i in range(8)], train=True)
    rows = len(batch["loss_index"])
    assert rows > 8

    def run(chunk: int) -> tuple[torch.Tensor, list[int], list[int], dict]:
        monkeypatch.setattr(models, "LOSS_CHUNK", chunk)
        model.zero_grad()
        seen, kept = [], []
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def keep(t: torch.Tensor) -> torch.Tensor:
            if vocab in t.shape and t.untyped_storage().data_ptr() not in weights:
                kept.append(t.numel())
            return t

        hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
        try:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = model(batch)[0]
                loss.backward()
        finally:
            hook.remove()
        return loss, seen, kept, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, seen, kept, grads = run(8)
    assert max(seen) <= 8 and sum(seen) == 2 * rows  # every row once forward, once recomputed
    assert max(kept, default=0) <= 8 * vocab
    whole, seen_whole, kept_whole, grads_whole = run(1024)
    assert seen_whole == [rows] and max(kept_whole) == rows * vocab
    torch.testing.assert_close(loss, whole, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_whole.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_whole[name], rtol=1e-6, atol=1e-6, msg=name)


def lure(model: models.VisualPrefixLM, batch: dict) -> None:
    """The padded head rows set along the mean final hidden state: unless they are left out, they take the largest
    logits."""
    with torch.no_grad():
        direction = model.hidden_states(batch)[batch["attention_mask"].bool()].mean(0)
        rows = model.lm.config.unpadded_vocab_size
        model.lm.get_output_embeddings().weight[rows:] = 50 * direction / direction.norm()


def scaled(model: nn.Module) -> nn.Module:
    """Random weights large enough that logits have no near-ties (as in test_any_lm), padded rows zero as built."""
    rows = model.lm.config.unpadded_vocab_size
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0 if p.dim() == 1 else 0.5)
        for table in (model.lm.get_input_embeddings(), model.lm.get_output_embeddings()):
            table.weight[rows:] = 0
    return model.eval()


def test_padded_rows_are_never_generated_and_an_export_is_the_lm_without_them(roots, tmp_path):
    """GPT-2's padded head rows lured to the top: beam search never emits them and gives the tokens of the same model
    without them (it would emit them if they kept their logits). An export leaves them out: plain transformers loads
    the LM without them and generates as it; load_visual_prefix generates the model's tokens."""
    from transformers import AutoModelForCausalLM

    task, model, datasets = build(family_args(roots, "gpt2"), tmp_path / "tokenizer")
    model = scaled(model)
    rows = model.lm.config.unpadded_vocab_size
    assert model.lm.get_input_embeddings().num_embeddings > rows
    batch = task.collate([datasets["val"][i] for i in range(len(datasets["val"]))], train=False)
    lure(model, batch)
    search = dict(num_beams=3, max_len=6, min_len=2, eos_id=task.token["<eos>"], pad_id=task.token["<pad>"])
    generated = model.generate(batch, **search)
    assert all(t < rows for ids in generated for t in ids) and len({tuple(ids) for ids in generated}) > 1
    reference = unpadded(model)
    assert generated == reference.generate(batch, **search)
    with mock.patch.object(models, "without_padded_rows", lambda lm, logits: logits):
        assert any(t >= rows for ids in model.generate(batch, **search) for t in ids), "the lure must work"

    out = tmp_path / "export"
    models.save_visual_prefix(model, task.tokenizer, out)
    loaded, tokenizer = models.load_visual_prefix(out)
    assert loaded.generate(batch, **search) == generated
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.get_input_embeddings().num_embeddings == rows == len(tokenizer)
    assert not hasattr(plain.config, "unpadded_vocab_size")
    prompt = tokenizer("a red cup on the table", return_tensors="pt")
    beams = dict(num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=search["pad_id"])
    assert torch.equal(plain.generate(**prompt, **beams), reference.lm.generate(**prompt, **beams))


def test_vqa_ranks_as_without_padded_rows(roots, tmp_path):
    """VQA's rank inference (first-token shortlist, then each pair's log-likelihood) with the padded rows lured to
    the top ranks and scores as the same model without them; the full logits would score otherwise."""
    args = family_args(roots, "gpt2", "vqa", "--inference-method", "rank", "--num-ans-candidates", "2")
    task, model, datasets = build(args, tmp_path / "tokenizer")
    model = scaled(model)
    questions = task.collate([datasets["val"][i] for i in range(len(datasets["val"]))], train=False)
    lure(model, questions)
    reference = unpadded(model)
    assert task.rank(model, questions) == task.rank(reference, questions)
    scored = labelled_eval_batch(task, [datasets["val"][i] for i in range(len(datasets["val"]))])
    ours = model.log_likelihood(scored)
    torch.testing.assert_close(ours, reference.log_likelihood(scored), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(ours, -full_logits_losses(model, scored)[0].sum(-1), rtol=1e-2)


def test_padded_rows_stay_zero_through_training_and_an_exact_resume(tmp_path, monkeypatch):
    """4 steps, and the same run failing after step 2 and resumed: equal checkpoints, whose vocabulary rows are a
    multiple of 64 and whose padded rows are still zero."""
    from transformers import AutoTokenizer

    args = ["dialogue", *TINY, "--max-steps", "4", "--save-every", "2", "--weight-decay", "0.1"]
    train.main([*args, "--output-dir", str(tmp_path / "run")])
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="fails after step 2"):
        patch.setattr(train, "forward_backward", faulty.fail_after("raise", 2))
        train.main([*args, "--output-dir", str(tmp_path / "resumed")])
    train.main([*args, "--output-dir", str(tmp_path / "resumed"), "--resume", "auto"])
    a, b = (torch.load(tmp_path / run / "ckpt_last.pt", weights_only=True)["model"] for run in ("run", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = len(AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer"))
    words = a["lm.transformer.wte.weight"]
    assert words.shape[0] % models.VOCAB_MULTIPLE == 0 and words.shape[0] > rows
    assert not words[rows:].any() and words[:rows].abs().sum(1).min() > 0


def test_compile_stops_compiling_after_warm_up(tmp_path, monkeypatch):
    """train.py --compile over batches whose sequence and feature lengths vary: it logs one compilation, made at the
    first batch, at every log step: no recompilation, and no graph break (a value read in Python, or a shape made from
    values, would break the graph). torch.compile's AOT-eager backend, for time: its guards are torch.compile's own."""
    compile_, before = torch.compile, train.compilations()  # a process-wide count: other tests may have compiled
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    pack, shapes = tasks.LMTask.pack, set()

    def packed(self, *args, **kwargs) -> dict:
        batch = pack(self, *args, **kwargs)
        if "labels" in batch:
            shapes.add((batch["input_ids"].shape[1], batch["features"].shape[1], len(batch["loss_index"])))
        return batch

    monkeypatch.setattr(tasks.LMTask, "pack", packed)
    out = tmp_path / "run"
    args = ["dialogue", *TINY, "--compile", "--max-steps", "12", "--log-every", "2", "--batch-size", "4"]
    train.main([*args, "--output-dir", str(out)])
    counts = [m["train/compilations"] - before for m in read_metrics(out) if "train/compilations" in m]
    assert counts == [1] * 6  # one graph: no graph break (where a value read or a shape from values would break it)
    sequence, features, labelled = (len(set(dim)) for dim in zip(*shapes, strict=True))
    assert sequence >= 4 and features >= 2 and labelled == 1, shapes  # (labelled positions come in multiples of 64)


class HostReads(TorchDispatchMode):
    """Records the ops that make the host wait for the device on a GPU: reading a value (`.item()`, `bool()`, `if`
    on a tensor) or an output whose shape depends on the values (nonzero, masked_select, boolean-mask indexing)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name == "aten::index" else ()
        if name in ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim") or any(
            i is not None and i.dtype == torch.bool for i in indices
        ):
            caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
            where = (
                caller.filename.rpartition("site-packages/")[2]
                if "/transformers/" in caller.filename
                else caller.filename
            )
            self.found.append(f"{name} in {where}:{caller.lineno} {caller.name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["small", *FAMILY_FLAGS])
def test_a_training_step_reads_nothing_back_from_the_device_but_transformers_packing_check(roots, family, tmp_path):
    """train.py's step (forward_backward, TrainState.update with the fused AdamW of a GPU), the next-frame loss on,
    runs no op that reads a value back to the host or makes a shape from values, for every family and its flags, but
    one in transformers: given no mask, it checks the position ids it makes itself for packed sequences (under
    torch.compile it does not: see test_compile_stops_compiling_after_warm_up). With the padding mask, as before,
    transformers reads it (5.25: twice); log_likelihood (evaluation) finds its positions with nonzero."""
    flags = ["--model.video-loss-weight", "0.5", "--batch-size", "4", "--max-grad-norm", "1"]
    args = ["dialogue", *TINY, *flags] if family == "small" else [*family_args(roots, family), *flags]
    task, model, datasets = build(args, tmp_path / "tokenizer")
    cfg = task.cfg
    build_optimizer = train.build_optimizer
    with mock.patch.object(train, "build_optimizer", lambda model, cfg, fused: build_optimizer(model, cfg, True)):
        state = train.TrainState(cfg, model, 10, torch.device("cpu"), tmp_path, set(), 0, 1, {})
    batch = task.collate([datasets["train"][i] for i in range(4)], train=True)
    with HostReads() as reads:
        stats = train.forward_backward(model, task, iter([batch]), cfg, nullcontext(), torch.device("cpu"), [])
        state.update(stats, 1)
    # at most one read, inside transformers: 5.25's packing check (5.0: its sdpa mask check, for some families)
    inside = re.compile(
        r"aten::_local_scalar_dense in transformers/\S+ (find_packed_sequence_indices|_ignore_causal_mask_sdpa)"
    )
    assert len(reads.found) <= 1 and all(inside.fullmatch(found) for found in reads.found), reads.found
    assert stats[1] > 0 and any(p.grad is None for p in model.parameters())  # stepped, then zeroed

    with HostReads() as reads, torch.no_grad():
        model.hidden_states(batch)  # with the padding mask
    assert reads.found and all("transformers/" in found for found in reads.found), reads.found  # 5.25: twice
    with HostReads() as reads:
        model.log_likelihood(batch)
    assert any(found.startswith("aten::nonzero") for found in reads.found)
