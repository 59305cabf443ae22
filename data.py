"""Datasets: reading real annotation/feature layouts, generating the embedded defaults, samplers and padding.

Everything here is task-agnostic except the dataset formats (AVSD, ...), which live here so that a task in
`tasks.py` only says which format it reads. Visual input is always pre-extracted features: one `.npy` per video
or image, memory-mapped so that a dataset much larger than RAM costs nothing until a batch touches it.
"""

import json
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


class InputError(Exception):
    """Bad input from the user (config, flags, data files): train.py prints it as one line and exits 2."""


# ----------------------------------------------------------------------------------------------------------------
# Reading files with messages that name what is wrong


def read_json(path: Path):
    if not path.is_file():
        raise InputError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON in {path}, line {e.lineno} column {e.colno}: {e.msg}") from None


def require(entry: dict, keys: Sequence[str], where: str) -> None:
    """Every annotation entry goes through this so a missing field names the entry, not a KeyError deep inside."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")


class FeatureStore:
    """Pre-extracted features `ROOT/{stream}/{id}.npy`, one or more streams per id.

    Streams are memory-mapped, truncated to the shortest one (LAVIS's alignment: i3d and vggish run at different
    rates) and to `max_len` frames, then concatenated along the feature axis. A stream with a single vector per id
    (shape (D,)) is treated as one frame.
    """

    def __init__(self, root: Path, streams: dict[str, int], max_len: int):
        self.root, self.streams, self.max_len = root, streams, max_len
        # (stream, id) -> (data offset, shape, dtype, Fortran order), parsed once by check(): parsing an .npy header
        # (ast.literal_eval) cost more than mapping the file, three times per sample in every batch.
        self.headers: dict[tuple[str, str], tuple] = {}
        for stream in streams:
            if not (root / stream).is_dir():
                raise InputError(f"feature directory not found: {root / stream}")

    @property
    def dim(self) -> int:
        return sum(self.streams.values())

    def path(self, stream: str, feature_id: str) -> Path:
        return self.root / stream / f"{feature_id}.npy"

    def read_header(self, stream: str, feature_id: str) -> tuple:
        path, width = self.path(stream, feature_id), self.streams[stream]
        if not path.is_file():
            raise InputError(f"missing feature file for id {feature_id!r}: {path}")
        try:
            with open(path, "rb") as f:
                npy = np.lib.format
                version = npy.read_magic(f)
                header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, fortran_order, dtype = header(f)
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read feature file for id {feature_id!r}: {path} ({e})") from None
        if dtype.hasobject:
            raise InputError(f"cannot read feature file for id {feature_id!r}: {path} (an object array)")
        if len(shape) == 1:  # one vector per id: one frame
            shape = (1, *shape)
        if len(shape) != 2 or shape[1] != width or shape[0] == 0:
            raise InputError(f"feature file for id {feature_id!r} has shape {shape}, expected (T, {width}): {path}")
        if size < offset + math.prod(shape) * dtype.itemsize:
            raise InputError(f"feature file for id {feature_id!r} is truncated (shorter than shape {shape}): {path}")
        return offset, shape, dtype, fortran_order

    def open(self, stream: str, feature_id: str) -> np.ndarray:
        """Memory-map one stream of one id. Done by hand (mmap + frombuffer) because np.load(mmap_mode="r") costs
        twice as much."""
        header = self.headers.get((stream, feature_id)) or self.read_header(stream, feature_id)
        offset, shape, dtype, fortran_order = header
        path = self.path(stream, feature_id)
        try:
            with open(path, "rb") as f:
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            array = np.frombuffer(buffer, dtype, count=math.prod(shape), offset=offset)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read feature file for id {feature_id!r}: {path} ({e})") from None
        return array.reshape(shape, order="F" if fortran_order else "C")

    def check(self, feature_id: str) -> None:
        """Run at dataset build time, so a missing or mis-shaped file fails before training, not at step 3000."""
        for stream in self.streams:
            self.headers[stream, feature_id] = self.read_header(stream, feature_id)

    def load(self, feature_id: str) -> np.ndarray:
        arrays = [self.open(stream, feature_id) for stream in self.streams]
        length = min(min(a.shape[0] for a in arrays), self.max_len)
        return np.concatenate([np.asarray(a[:length], dtype=np.float32) for a in arrays], axis=1)


class FeatureDataset(Dataset):
    """Annotation samples (dicts) joined with their features under `"features"`.

    `shuffle_features` is the ablation that proves a model uses its visual input: each sample gets the features of
    another sample's video (a fixed permutation over distinct feature ids), so text-only shortcuts keep working and
    everything grounded in the video breaks.
    """

    def __init__(self, samples: list[dict], features: FeatureStore, key: str, shuffle_features: bool = False):
        if not samples:
            raise InputError("empty split: no samples")
        self.samples, self.features, self.key = samples, features, key
        ids = sorted({s[key] for s in samples})
        for feature_id in ids:
            features.check(feature_id)
        self.remap = {i: i for i in ids}
        if shuffle_features:
            # A derangement-ish permutation: rotate a fixed shuffle by one so no id keeps its own features.
            order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
            self.remap = dict(zip(order, order[1:] + order[:1], strict=True))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {**sample, "features": self.features.load(self.remap[sample[self.key]])}


# ----------------------------------------------------------------------------------------------------------------
# AVSD (DSTC7): ROOT/annotations/{split}.json + ROOT/features/{i3d_flow,i3d_rgb,vggish}/{image_id}.npy

AVSD_STREAMS = {"i3d_flow": 2048, "i3d_rgb": 2048, "vggish": 128}


def load_avsd(path: Path, train: bool, max_turns: int) -> list[dict]:
    """Train: one sample per turn with up to `max_turns` earlier turns as history. Eval: one sample per dialog whose
    last turn is the target; its "answer" may be a list of references (the multi-reference test files of DSTC7/10,
    e.g. test_set4DSTC10-AVSD_multiref+reason.json: 6 per answer), all of them scored against. Each sample keeps `id`
    (unique, for de-duplicating results), `image_id` and `references`."""
    data = read_json(path)
    if not isinstance(data, dict) or "dialogs" not in data:
        raise InputError(f'{path}: expected an object with a "dialogs" list')
    samples = []
    for n, dialog in enumerate(data["dialogs"]):
        named = isinstance(dialog, dict) and "image_id" in dialog
        where = f"{path}: dialog {n}" + (f" (image_id {dialog['image_id']!r})" if named else "")
        require(dialog, ["image_id", "dialog"], where)
        turns = dialog["dialog"]
        if not isinstance(turns, list) or not turns:
            raise InputError(f"{where}: empty or invalid 'dialog' list")
        target = -1 if train else len(turns) - 1  # the eval target turn: the only one that may hold references
        for t, turn in enumerate(turns):
            require(turn, ["question", "answer"], f"{where}, turn {t}")
            answer = turn["answer"]
            listed = t == target and isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)
            if not (isinstance(answer, str) or listed):
                also = " or a non-empty list of references (strings)" if t == target else ""
                raise InputError(f"{where}, turn {t}: 'answer' must be a string{also}")
        context = {
            "image_id": str(dialog["image_id"]),
            "caption": dialog.get("caption", ""),
            "summary": dialog.get("summary", ""),
        }
        targets = range(len(turns)) if train else [len(turns) - 1]
        for t in targets:
            history = [(h["question"], h["answer"]) for h in turns[max(0, t - max_turns) : t]]
            answer = turns[t]["answer"]
            references = answer if isinstance(answer, list) else [answer]
            samples.append(
                {
                    **context,
                    "id": f"{context['image_id']}#{t}" if train else context["image_id"],
                    "history": history,
                    "question": turns[t]["question"],
                    "answer": references[0],
                    "references": references,
                }
            )
    if not samples:
        raise InputError(f"empty split: no dialogs in {path}")
    return samples


# The embedded default: a generated AVSD in the real layout and feature sizes. Each video has hidden attributes;
# every attribute value is a fixed random direction in one feature stream, so the answers to the questions below
# can only be read off the features (the caption names the place, nothing else).
_ATTRIBUTES = {
    "color": ("i3d_rgb", ["red", "blue", "green", "yellow", "black", "white"]),
    "thing": ("i3d_rgb", ["cup", "book", "phone", "towel", "broom", "laptop"]),
    "action": ("i3d_flow", ["sweeping", "reading", "cooking", "dancing", "sitting", "walking"]),
    "count": ("i3d_flow", ["one", "two", "three"]),
    "sound": ("vggish", ["music", "talking", "a dog barking", "silence"]),
}
_PLACES = ["kitchen", "bedroom", "living room", "garage", "hallway", "office"]
# Two phrasings of a question per attribute. A dialog asks about each attribute once, so no turn's answer is given
# away by another turn of the same dialog (in training history or at evaluation): it can only come from the video.
_QUESTIONS = {
    "color": [("what color is it?", "it is {color}."), ("what color is the object?", "the object is {color}.")],
    "thing": [("what is the person holding?", "a {thing}."), ("what object can you see?", "i see a {thing}.")],
    "action": [("what are they doing?", "they are {action}."), ("what happens in the video?", "someone is {action}.")],
    "count": [("how many people are there?", "{count} people."), ("is the person alone?", "there are {count}.")],
    "sound": [("what can you hear?", "i can hear {sound}."), ("is there any sound?", "yes, {sound}.")],
}
_SMALL_TALK = [
    ("is it daytime?", "i can't tell."),
    ("does the video end abruptly?", "no, it doesn't."),
    ("is the camera moving?", "no, it's still."),
    ("is it a long video?", "about thirty seconds."),
    ("is anyone talking to the camera?", "no, nobody does."),
    ("is the room tidy?", "it's tidy enough."),
    ("is it in color?", "yes, it's in color."),
    ("does anything else happen?", "not really."),
    ("is the video blurry?", "a little at the start."),
]
EMBEDDED_SPLITS = {"train": 240, "val": 40, "test": 40}
EMBEDDED_VERSION = "avsd-embedded-v5"


def make_embedded_avsd(root: Path, seed: int = 0) -> None:
    """Write the embedded AVSD into `root` (all splits, annotations and features)."""
    rng = np.random.default_rng(seed)
    directions = {
        (attr, value): rng.standard_normal(AVSD_STREAMS[stream]).astype(np.float32)
        for attr, (stream, values) in _ATTRIBUTES.items()
        for value in values
    }
    for stream in AVSD_STREAMS:
        (root / "features" / stream).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n_dialogs in EMBEDDED_SPLITS.items():
        dialogs = []
        for i in range(n_dialogs):
            video_id = f"{split}{i:04d}"
            attrs = {attr: values[rng.integers(len(values))] for attr, (_, values) in _ATTRIBUTES.items()}
            place = _PLACES[rng.integers(len(_PLACES))]
            # i3d runs at a lower rate than vggish: different lengths, aligned by truncation when read.
            lengths = {"i3d_flow": int(rng.integers(6, 12)), "vggish": int(rng.integers(8, 14))}
            lengths["i3d_rgb"] = lengths["i3d_flow"]
            for stream, width in AVSD_STREAMS.items():
                frames = 0.5 * rng.standard_normal((lengths[stream], width)).astype(np.float32)
                for attr, (attr_stream, _) in _ATTRIBUTES.items():
                    if attr_stream == stream:
                        frames += directions[attr, attrs[attr]]
                np.save(root / "features" / stream / f"{video_id}.npy", frames)
            grounded = [phrasings[rng.integers(2)] for phrasings in _QUESTIONS.values()]
            grounded = [(q, a.format(**attrs)) for q, a in grounded]
            small_talk = [_SMALL_TALK[k] for k in rng.permutation(len(_SMALL_TALK))[:5]]
            target = grounded.pop(rng.integers(len(grounded)))  # the eval target always asks about the video
            turns = grounded + small_talk
            turns = [turns[k] for k in rng.permutation(len(turns))] + [target]
            dialogs.append(
                {
                    "image_id": video_id,
                    "caption": f"a person in the {place}.",
                    "summary": f"it's a quiet {place}.",
                    "dialog": [{"question": q, "answer": a} for q, a in turns],
                }
            )
        (root / "annotations" / f"{split}.json").write_text(json.dumps({"dialogs": dialogs}, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Images (captioning, VQA): ROOT/annotations/{split}.json + ROOT/features/{image_id}.npy, one (D,) or (T, D) array
# per image (pooled or grid features of an image encoder). An entry's feature id is its "image_id", else the file
# name of its "image" without the extension ("val2014/COCO_val2014_000000391895.jpg" → COCO_val2014_000000391895).


def image_feature_id(entry: dict) -> str:
    return str(entry["image_id"]) if "image_id" in entry else Path(str(entry["image"])).stem


def read_entries(path: Path, keys: Sequence[str]) -> list[dict]:
    """A JSON list of objects, each checked for `keys` (a missing field names the entry and the field)."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    if not entries:
        raise InputError(f"empty split: no entries in {path}")
    for n, entry in enumerate(entries):
        require(entry, keys, f"{path}: entry {n}")
        if "image_id" not in entry and "image" not in entry:
            raise InputError(f"{path}: entry {n}: missing field(s) image_id or image (the feature id)")
    return entries


def load_captions(path: Path, train: bool) -> list[dict]:
    """COCO-Karpathy style entries {"image", "image_id", "caption"}; "caption" is one string (a train entry) or a
    list of references (an eval entry); both shapes are read in every split. Train: one sample per caption. Eval:
    one sample per image with all its references (entries of the same image are merged)."""
    samples, by_image = [], {}
    for n, entry in enumerate(read_entries(path, ["caption"])):
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise InputError(f"{path}: entry {n}: 'caption' must be a string or a non-empty list of strings")
        image_id = image_feature_id(entry)
        if train:
            samples += [
                {"id": f"{image_id}#{n}.{k}", "image_id": image_id, "caption": c} for k, c in enumerate(captions)
            ]
        elif image_id in by_image:
            by_image[image_id]["references"] += captions
        else:
            by_image[image_id] = {"id": image_id, "image_id": image_id, "references": list(captions)}
    return samples if train else list(by_image.values())


def load_vqa(path: Path, train: bool) -> list[dict]:
    """VQAv2 style entries {"question_id", "question", "answer": [answers], "image"} (+ optional "answer_type",
    "image_id"). One sample per question; "answer" may be a single string. Eval entries may lack answers (a test
    split scored elsewhere): they get an empty list, and scoring them is refused."""
    samples = []
    for n, entry in enumerate(read_entries(path, ["question_id", "question", *(["answer"] if train else [])])):
        answers = entry.get("answer", [])
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or (train and not answers):
            raise InputError(
                f"{path}: entry {n} (question_id {entry['question_id']!r}): 'answer' must be a string "
                "or a list of strings"
            )
        sample = {"id": str(entry["question_id"]), "image_id": image_feature_id(entry), "question": entry["question"]}
        samples.append({**sample, "answers": answers, "answer_type": entry.get("answer_type")})
    if len({s["id"] for s in samples}) != len(samples):
        raise InputError(f"{path}: question_id values are not unique")
    return samples


# The embedded image datasets: every image has hidden attributes, each value a fixed random direction in feature
# space; an image's features are a small grid of patch vectors = the sum of its attribute directions + noise. The
# captions and answers name these attributes, so they can only be read off the features.
IMAGE_FEATURE_DIM = 768  # ViT-B/16 (CLIP, BLIP) patch/pooled width
_IMAGE_PATCHES = 4
_IMAGE_ATTRIBUTES = {
    "color": ["red", "blue", "green", "yellow", "black", "white"],
    "thing": ["cup", "book", "phone", "towel", "bicycle", "laptop"],
    "place": ["kitchen", "bedroom", "street", "garden", "office", "beach"],
    "count": ["one", "two", "three", "four"],
}


def _make_images(
    root: Path, split: str, n_images: int, rng: np.random.Generator, directions: dict, n_values: int | None = None
) -> list[dict]:
    """Write `n_images` feature files of one split; returns their ids and hidden attributes (each drawn from the
    first `n_values` values of its attribute; None: all)."""
    (root / "features").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n_images):
        attrs = {attr: values[rng.integers(len(values[:n_values]))] for attr, values in _IMAGE_ATTRIBUTES.items()}
        patches = 0.5 * rng.standard_normal((_IMAGE_PATCHES, IMAGE_FEATURE_DIM)).astype(np.float32)
        patches += sum(directions[attr, value] for attr, value in attrs.items())
        image_id = f"{split}{i:04d}"
        np.save(root / "features" / f"{image_id}.npy", patches)
        images.append({"image_id": image_id, "image": f"{split}/{image_id}.jpg", **attrs})
    return images


def _image_directions(rng: np.random.Generator) -> dict:
    return {
        (attr, value): rng.standard_normal(IMAGE_FEATURE_DIM).astype(np.float32)
        for attr, values in _IMAGE_ATTRIBUTES.items()
        for value in values
    }


_CAPTIONS = [
    "a {color} {thing} in the {place}.",
    "there is a {color} {thing} in a {place}.",
    "a photo of a {color} {thing} in the {place}.",
    "the {place} has a {color} {thing} in it.",
]
CAPTIONS_SPLITS = {"train": 160, "val": 40, "test": 40}  # images; train has 2 captions per image, eval 3 references
CAPTIONS_VERSION = "captions-embedded-v1"


def make_embedded_captions(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directions = _image_directions(rng)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n_images in CAPTIONS_SPLITS.items():
        entries = []
        for image in _make_images(root, split, n_images, rng, directions):
            key = {"image": image["image"], "image_id": image["image_id"]}
            captions = [_CAPTIONS[k].format(**image) for k in rng.permutation(len(_CAPTIONS))]
            if split == "train":  # the Karpathy layout: one entry per caption
                entries += [{**key, "caption": c} for c in captions[:2]]
            else:
                entries.append({**key, "caption": captions[:3]})
        (root / "annotations" / f"{split}.json").write_text(json.dumps(entries, indent=1))


VQA_SPLITS = {"train": 160, "val": 30, "test": 30}  # images, 3 questions each
VQA_VERSION = "vqa-embedded-v1"


def make_embedded_vqa(root: Path, seed: int = 0) -> None:
    """Questions of three answer types; the 10 human answers vary in spelling ("two", "2", "Red.") as real VQA
    answers do, and one or two annotators of ten disagree, so the consensus and the official accuracy's answer
    processing (which matches only some spellings) matter."""
    rng = np.random.default_rng(seed)
    directions = _image_directions(rng)
    digits = {"one": "1", "two": "2", "three": "3", "four": "4"}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n_images in VQA_SPLITS.items():
        entries = []
        for image in _make_images(root, split, n_images, rng, directions):
            asked_color = _IMAGE_ATTRIBUTES["color"][rng.integers(6)] if rng.random() < 0.5 else image["color"]
            plain, period, title = str, "{}.".format, str.title
            questions = [
                (f"what color is the {image['thing']}?", "other", image["color"], [plain, period, title]),
                (
                    "what is the object in the picture?",
                    "other",
                    image["thing"],
                    [plain, "a {}".format, "the {}".format],
                ),
                (f"how many {image['thing']}s are there?", "number", image["count"], [plain, digits.get]),
                (
                    f"is the {image['thing']} {asked_color}?",
                    "yes/no",
                    "yes" if asked_color == image["color"] else "no",
                    [plain, title],
                ),
            ]
            for q in rng.permutation(len(questions))[:3]:
                question, answer_type, answer, spellings = questions[q]
                answers = [spellings[rng.integers(len(spellings))](answer) for _ in range(10)]
                pool = {"number": _IMAGE_ATTRIBUTES["count"], "yes/no": ["yes", "no"]}.get(answer_type)
                pool = pool or _IMAGE_ATTRIBUTES["color" if "color" in question else "thing"]
                for k in rng.permutation(10)[: rng.integers(0, 3)]:  # disagreeing annotators
                    answers[k] = pool[rng.integers(len(pool))]
                question_id = 100_000 * list(VQA_SPLITS).index(split) + len(entries)
                entries.append(
                    {
                        "question_id": question_id,
                        "image": image["image"],
                        "question": question,
                        "answer": answers,
                        "answer_type": answer_type,
                    }
                )
        (root / "annotations" / f"{split}.json").write_text(json.dumps(entries, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# SNLI-VE (visual entailment): ROOT/annotations/{split}.json, [{"image", "sentence", "label"}], and image features as
# above. (Retrieval reads the captioning layout: load_captions, make_embedded_captions.)

SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")


def load_snli_ve(path: Path) -> list[dict]:
    """One sample per entry; `label` becomes its index in SNLI_VE_LABELS, `id` the entry's position."""
    samples = []
    for n, entry in enumerate(read_entries(path, ["sentence", "label"])):
        if entry["label"] not in SNLI_VE_LABELS:
            raise InputError(f"{path}: entry {n}: label {entry['label']!r} is not one of {', '.join(SNLI_VE_LABELS)}")
        if not isinstance(entry["sentence"], str) or not entry["sentence"].strip():
            raise InputError(f"{path}: entry {n}: 'sentence' must be a non-empty string")
        label = SNLI_VE_LABELS.index(entry["label"])
        samples.append({"id": n, "image_id": image_feature_id(entry), "sentence": entry["sentence"], "label": label})
    return samples


SNLI_VE_SPLITS = {"train": 400, "val": 60, "test": 60}  # images, three sentences each
SNLI_VE_VERSION = "snli-ve-embedded-v1"
# Colours and things used. With 4 or more, the small model from scratch sits at chance for 200+ steps before it
# learns to compare words with features; with 3 it learns in about 100.
SNLI_VE_VALUES = 3


def make_embedded_snli_ve(root: Path, seed: int = 0) -> None:
    """Three sentences per image, one per label. Entailment names the image's thing and colour; contradiction its
    thing with another colour; neutral another thing (whose colour the image cannot tell). Every sentence is
    equally likely under every label, so only the image decides."""
    rng = np.random.default_rng(seed)
    directions = _image_directions(rng)
    colors, things = _IMAGE_ATTRIBUTES["color"][:SNLI_VE_VALUES], _IMAGE_ATTRIBUTES["thing"][:SNLI_VE_VALUES]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n_images in SNLI_VE_SPLITS.items():
        entries = []
        for image in _make_images(root, split, n_images, rng, directions, SNLI_VE_VALUES):
            stated = {
                "entailment": (image["color"], image["thing"]),
                "contradiction": (rng.choice([c for c in colors if c != image["color"]]), image["thing"]),
                "neutral": (rng.choice(colors), rng.choice([t for t in things if t != image["thing"]])),
            }
            for label, (color, thing) in stated.items():
                template = _CAPTIONS[rng.integers(len(_CAPTIONS))]
                sentence = template.format(color=color, thing=thing, place=image["place"])
                entries.append({"image": image["image"], "sentence": sentence, "label": label})
        (root / "annotations" / f"{split}.json").write_text(json.dumps(entries, indent=1))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vltasks"


def embedded_root(cache_dir: Path | None, name: str, make) -> Path:
    """Generate an embedded dataset once into `cache_dir/name` and reuse it. Safe to race: every process builds in
    its own temp dir and renames it into place; the loser of the race throws its copy away."""
    cache_dir = cache_dir or default_cache_dir()
    root = cache_dir / name
    if (root / "COMPLETE").is_file():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}-"))
    make(tmp)
    (tmp / "COMPLETE").write_text("ok\n")
    try:
        tmp.rename(root)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------------------------
# Sampling and padding


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: `skip` indices of this rank are dropped from the front,
    so a resumed run sees exactly the batches the interrupted one had not seen yet (without loading the others)."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad lists of ints into a (B, max_len) long tensor, on the right (training) or on the left (generation)."""
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), value, dtype=np.int64)  # numpy: filling rows from lists is 4x torch's cost
    for i, s in enumerate(seqs):
        if s:
            if left:
                out[i, width - len(s) :] = s
            else:
                out[i, : len(s)] = s
    return torch.from_numpy(out)


def share_tensors(batch: dict) -> dict:
    """In a DataLoader worker: the batch's tensors that are not yet in shared memory, copied into ONE shared storage
    and replaced by views of it. Each shared storage crosses to the training process through its own file descriptor
    and mapping, ~0.4 ms of the training process's CPU apiece on a 2-core CPU: a dialogue batch (features plus six
    small tensors) costs it about 2 ms less per step this way. Outside a worker the batch is returned as it is."""
    keys = [k for k, v in batch.items() if torch.is_tensor(v) and not v.is_shared()]
    if torch.utils.data.get_worker_info() is None or len(keys) < 2:
        return batch
    offsets, size = [], 0
    for k in keys:
        size = -(-size // 64) * 64  # every view starts on a cache line (so also aligned for its dtype)
        offsets.append(size)
        size += batch[k].numel() * batch[k].element_size()
    storage = torch.UntypedStorage._new_shared(size)
    shared = dict(batch)
    for k, offset in zip(keys, offsets, strict=True):
        tensor = batch[k]
        view = tensor.new_empty(0).set_(storage, offset // tensor.element_size(), tensor.shape)
        shared[k] = view.copy_(tensor)
    return shared


def collate_in_worker(collate, samples: list, train: bool) -> dict:
    """The loaders' collate_fn: the task's collate, its result made cheap to send (see share_tensors)."""
    return share_tensors(collate(samples, train=train))


def stack_features(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length (T, D) features into (B, T_max, D) plus a (B, T_max) bool mask of real frames."""
    width = max(a.shape[0] for a in arrays)
    shape = (len(arrays), width, arrays[0].shape[1])
    out = torch.empty(0)
    if torch.utils.data.get_worker_info() is not None:
        # In a DataLoader worker, build the batch in shared memory (as torch's default_collate does): sending the
        # largest tensor of the batch to the training process then costs nothing instead of one more copy.
        out = out.new(out.untyped_storage()._new_shared(math.prod(shape) * out.element_size()))
    out = out.resize_(shape)
    mask = torch.zeros(len(arrays), width, dtype=torch.bool)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = torch.from_numpy(a)
        out[i, a.shape[0] :] = 0
        mask[i, : a.shape[0]] = True
    return out, mask
