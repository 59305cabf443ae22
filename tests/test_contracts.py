"""What train.py needs from a model or a task is declared, not read off names: a model's `parts()` carry the
per-part learning rates (--model.lm-lr, --model.vision-lr) whatever its attributes are called; a task declares its
tokenizer and its export; a dataset knows its root."""

from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import LM_FAMILIES, save_lm_family

import embedded
import tasks
import train

LM_LR, LR = 1e-5, 3e-3


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("contracts")
    with mock.patch.dict(embedded.EMBEDDED_SPLITS, {"train": 4, "val": 2}, clear=True):
        embedded.make_embedded_avsd(base / "avsd")
    with mock.patch.dict(embedded.CAPTIONS_SPLITS, {"train": 4, "val": 2}, clear=True):
        embedded.make_embedded_captions(base / "captions", pixels=True)
    return base


def built(argv: list, tmp: Path):
    name, cfg = train.parse_config([str(a) for a in argv])
    task = tasks.TASKS[name][0](cfg)
    datasets = task.build_datasets()
    return task, task.build_model(datasets["train"], tmp / "tokenizer"), datasets, cfg


def rates(model, cfg) -> dict[int, float]:
    optimizer = train.build_optimizer(model, cfg, fused=False)
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("family", [None, *LM_FAMILIES])
def test_lm_lr_reaches_every_trained_weight_of_the_lm_and_nothing_else(roots, tmp_path, family):
    name = [] if family is None else ["--model.name", save_lm_family(family, tmp_path / family)]
    argv = ["dialogue", "--data.root", roots / "avsd", "--lr", LR, "--model.lm-lr", LM_LR, *name]
    _, model, _, cfg = built(argv, tmp_path)
    lr = rates(model, cfg)
    lm = {id(p) for p in model.lm.parameters() if p.requires_grad}
    assert lm and all(lr[i] == LM_LR for i in lm)
    rest = [p for n, p in model.named_parameters() if id(p) not in lm and p.requires_grad]
    assert rest and all(lr[id(p)] == LR for p in rest)  # projector, markers


def test_a_model_whose_lm_attribute_has_another_name_keeps_its_rates(roots, tmp_path):
    """A subclass that keeps its LM under another attribute name: parts() says where it is, so --model.lm-lr still
    applies to it (a name-prefix rule would silently give it --lr)."""
    _, model, _, cfg = built(["dialogue", "--data.root", roots / "avsd", "--lr", LR, "--model.lm-lr", LM_LR], tmp_path)

    class Renamed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.language_model, self.visual, self.head = inner.lm, inner.vision, inner.projector

        def parts(self):
            return {"lm": self.language_model, "vision": self.visual}

    renamed = Renamed(model)
    lr = rates(renamed, cfg)
    assert all(lr[id(p)] == LM_LR for p in renamed.language_model.parameters())
    assert all(lr[id(p)] == LR for p in renamed.head.parameters())


@pytest.mark.parametrize("task_name", ["retrieval", "classification"])
def test_encoder_tasks_give_the_text_encoder_lm_lr(tmp_path, task_name):
    _, model, _, cfg = built([task_name, "--lr", LR, "--model.lm-lr", LM_LR], tmp_path)
    lr, encoder = rates(model, cfg), model.parts()["lm"]
    assert all(lr[id(p)] == LM_LR for p in encoder.parameters())
    assert sum(lr[id(p)] == LR for p in model.parameters()) > 0


def test_a_fine_tuned_tower_gets_vision_lr(roots, tmp_path):
    argv = ["captioning", "--data.root", roots / "captions", "--model.vision", "small", "--model.no-freeze-vision"]
    _, model, _, cfg = built([*argv, "--lr", LR, "--model.vision-lr", 1e-6], tmp_path)
    lr = rates(model, cfg)
    tower = [p for p in model.vision.parameters() if p.requires_grad]
    assert tower and all(lr[id(p)] == 1e-6 for p in tower)


def test_the_task_declares_its_tokenizer_and_the_dataset_its_root(roots, tmp_path):
    assert tasks.BaseTask.tokenizer is None
    task, _, datasets, _ = built(["dialogue", "--data.root", roots / "avsd"], tmp_path)
    assert task.tokenizer is not None and all(d.root == roots / "avsd" for d in datasets.values())


def test_export_is_the_tasks_own_and_refused_where_a_task_has_none(tmp_path):
    task, model, _, _ = built(["classification"], tmp_path)
    with pytest.raises(tasks.InputError, match="--export: ClassificationTask's model has no export"):
        task.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["retrieval", "--model.projector", "mlp"], "--model.projector does not apply: retrieval and classification"),
        (["classification", "--model.chat-template"], "--model.chat-template does not apply: retrieval and"),
        (
            ["dialogue", "--model.name", "gpt2", "--model.n-layer", "6"],
            "--model.n-layer does not apply: the pretrained",
        ),
        (["dialogue", "--model.lora-alpha", "8"], "--model.lora-alpha does not apply: LoRA is off"),
        (
            ["captioning", "--model.vision-tokens", "4"],
            "--model.vision-tokens does not apply: there is no vision tower",
        ),
        (["captioning", "--model.vision", "small", "--model.vision-lr", "1e-5"], "does not apply: the tower is frozen"),
        (["captioning", "--model.vision", "DIR", "--model.vision-width", "64"], "--model.vision is not small"),
    ],
)
def test_a_flag_that_does_not_apply_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_config(argv)
    assert exit_.value.code == 2
    assert message in " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro's box around it


def test_the_small_tower_is_sized_by_its_own_flags():
    import models

    cfg = models.ModelConfig(vision="small", vision_width=64, vision_layers=1, n_embd=32)
    tower, _ = models.load_vision(cfg)
    assert (tower.config.hidden_size, tower.config.num_hidden_layers, tower.config.num_attention_heads) == (64, 1, 2)


def test_the_transformers_seams_work_on_the_installed_version():
    """What models.py relies on that transformers renamed within the supported range, behind one function each."""
    from PIL import Image
    from transformers import GPT2Config, GPT2LMHeadModel

    import models

    lm = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20))
    models.checkpoint_activations(lm)
    assert any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())  # the flag each block reads
    processor = models.pil_image_processor("SiglipImageProcessor")(size={"height": 16, "width": 16})
    pixels = processor(images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    assert pixels["pixel_values"].shape == (1, 3, 16, 16)
    from test_vlm import tokenizer
    from transformers import LlavaProcessor, PaliGemmaProcessor

    tok = tokenizer(["a photo"], ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], "<bos>", "<eos>", "<pad>", False)
    processor.image_seq_length = 4
    # PaliGemma takes the answer as `suffix`: from 5.23 a parameter of its __call__, a text kwarg before
    assert models.takes_suffix(PaliGemmaProcessor(processor, tok))
    assert not models.takes_suffix(LlavaProcessor(processor, tok, patch_size=8))
