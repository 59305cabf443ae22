"""The task's model keeps a pretrained LM as it is: with no visual tokens and the LM frozen, its per-token
log-likelihood of a text equals the plain transformers model's; and greedy generation continues a prompt as the
training forward pass would, token by token. Every family of tests/test_any_lm.py (tiny random-init checkpoints)."""

from unittest import mock

import pytest
import torch
from helpers import LM_FAMILIES, save_lm_family

import embedded
import tasks
import train

COMMON = ["--batch-size", "4", "--eval-batch-size", "2", "--num-beams", "1", "--max-len", "6"]
COMMON += ["--data.num-workers", "0", "--warmup-steps", "0", "--lr", "3e-3", "--model.lm-lr", "3e-3"]  # random LMs


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Tiny embedded datasets (no test split) and every family's checkpoint."""
    base = tmp_path_factory.mktemp("fidelity")
    with mock.patch.dict(embedded.EMBEDDED_SPLITS, {"train": 4, "val": 3}, clear=True):
        embedded.make_embedded_avsd(base / "avsd")
    with mock.patch.dict(embedded.CAPTIONS_SPLITS, {"train": 8, "val": 3}, clear=True):
        embedded.make_embedded_captions(base / "captions")
    return {"base": base, **{family: save_lm_family(family, base / family) for family in LM_FAMILIES}}


def argv(roots, task: str, family: str, out, *flags) -> list[str]:
    root = roots["base"] / {"dialogue": "avsd", "captioning": "captions"}[task]
    return [
        task,
        "--data.root",
        str(root),
        "--output-dir",
        str(out),
        *COMMON,
        "--model.name",
        str(roots[family]),
        *flags,
    ]


def built(roots, task_name: str, family: str, out, *flags):
    """(task, its freshly built model, datasets) as train.py builds them."""
    name, cfg = train.parse_config(argv(roots, task_name, family, out, *flags))
    task = tasks.TASKS[name][0](cfg)
    datasets = task.build_datasets()
    torch.manual_seed(cfg.seed)
    return task, task.build_model(datasets["train"], out / "tokenizer").eval(), datasets


def next_token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L-1) log-probability of each next token."""
    return logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("task_name", ["captioning", "dialogue"])
@pytest.mark.parametrize("family", LM_FAMILIES)
def test_text_log_likelihood_equals_the_plain_lms(roots, family, task_name, tmp_path, monkeypatch):
    task, model, datasets = built(roots, task_name, family, tmp_path, "--model.freeze-lm")
    monkeypatch.setattr(task, "visual_len", lambda sample: 0)  # the text alone: no visual positions
    batch = task.collate([datasets["train"][i] for i in range(4)], train=True)
    assert not batch["is_visual"].any()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vocab = getattr(model.lm.config, "unpadded_vocab_size", None)  # the LM as loaded, without its padded rows
    with torch.no_grad():
        ours = next_token_log_probs(model.run_lm(batch).logits[..., :vocab], ids)
        plain = next_token_log_probs(model.lm(input_ids=ids, attention_mask=mask).logits[..., :vocab], ids)
    real = mask[:, 1:].bool()
    assert (ours[real] - plain[real]).abs().max() < 1e-5
    labelled = batch["labels"][:, 1:] != -100
    summed = (model.log_likelihood(batch) - (plain * labelled).sum(1)).abs()
    assert (summed <= 1e-5 * labelled.sum(1)).all()  # within 1e-5 a token


# Each family trains with other flags, so that generation is checked through every input path: GPT-2 with token
# types (added to generated tokens by a hook), a frozen LM, Qwen2's chat template, OPT's MLP projector, LoRA.
GENERATION_FLAGS = {
    "gpt2": ["--model.token-types", "True"],
    "llama": ["--model.freeze-lm"],
    "qwen2": ["--model.chat-template"],
    "opt": ["--model.projector", "mlp"],
    "mistral": ["--model.lora-r", "4"],
    "phi": [],
}


@pytest.fixture(scope="module")
def trained(roots, tmp_path_factory):
    """family → (task, model, datasets) after 4 captioning steps of train.py, made on demand."""
    models, build = {}, tasks.CaptioningTask.build_model

    def keep(self, *args):
        models[self.cfg.model.name] = self, build(self, *args)
        return models[self.cfg.model.name][1]

    def get(family: str):
        if family not in models:
            out = tmp_path_factory.mktemp(f"run-{family}")
            with mock.patch.object(tasks.CaptioningTask, "build_model", keep):
                train.main(argv(roots, "captioning", family, out, "--max-steps", "4", *GENERATION_FLAGS[family]))
            task, model = models.pop(str(roots[family]))
            models[family] = task, model.eval(), task.build_datasets()
        return models[family]

    return get


@pytest.mark.parametrize("family", GENERATION_FLAGS)
def test_greedy_generation_takes_the_training_forwards_argmax(trained, family):
    """At each step of greedy `generate` (a batch, the KV cache), the LM's logits equal those of the training forward
    pass over the prompt and the tokens so far packed as a training target, and the token it takes is their argmax
    (markers excluded, as generate excludes them; to float rounding: a near-tie may go either way); it stops where
    that argmax is eos."""
    task, model, datasets = trained(family)
    samples = [datasets["val"][i] for i in range(len(datasets["val"]))]
    eos, pad, cap = task.token["<eos>"], task.token["<pad>"], task.token["<cap>"]
    steps = []  # the logits generate computes at each step: what the LM head gives for the last position
    hook = model.lm.get_output_embeddings().register_forward_hook(lambda m, args, out: steps.append(out[:, -1]))
    try:
        generated = model.generate(task.collate(samples, train=False), 1, 6, 0, eos, pad)
    finally:
        hook.remove()
    for row, (sample, tokens) in enumerate(zip(samples, generated, strict=True)):
        for i, token in enumerate([*tokens, eos] if len(tokens) < 6 else tokens):
            with torch.no_grad():
                packed = task.pack([sample], [([cap], [cap])], [tokens[:i]], train=True)
                logits = model.run_lm(packed).logits[0, -2].float()  # before the <eos> pack appends to a target
            assert torch.allclose(steps[i][row].float(), logits, atol=1e-4), (row, i)
            logits[model.marker_ids] = -torch.inf
            assert logits[token] >= logits.max() - 1e-4, (row, i, token, logits.argmax().item())
    assert any(generated), "an empty generation would pass trivially"


def before_the_image(task, sample) -> list[int]:
    """The ids a training sequence has before its first visual token."""
    batch = task.collate([sample], train=True)
    return batch["input_ids"][0, : batch["is_visual"][0].int().argmax()].tolist()


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_a_sequence_starts_with_the_familys_bos_never_with_an_image(roots, family, tmp_path):
    """A pretrained LM's first position is an attention sink: it gets the family's bos, whether its tokenizer
    prepends it (Llama, Mistral, OPT) or not (GPT-2, Phi), and a visual token only where there is none (Qwen2)."""
    task, _, datasets = built(roots, "captioning", family, tmp_path)
    bos = task.tokenizer.bos_token_id
    assert before_the_image(task, datasets["train"][0]) == ([] if bos is None else [bos])


def test_with_a_chat_template_the_image_is_in_the_user_turn(roots, tmp_path):
    task, _, datasets = built(roots, "captioning", "qwen2", tmp_path, "--model.chat-template")
    user = task.tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False).split("X")[0]
    assert task.tokenizer.decode(before_the_image(task, datasets["train"][0])) == user == "<|im_start|>user\n"
