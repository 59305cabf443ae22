"""The embedded datasets: small synthetic versions of every task's real data, in the real layouts (AVSD, COCO
captions, VQAv2, SNLI-VE), generated once into a cache so that every task runs with no download. Features are made
as the real extractors' are (see "Realistic features" below); with `pixels`, images and videos are drawn instead.
Nothing here is read by a real dataset's loading: data.py reads what this writes like any other root.
"""

import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from data import AVSD_STREAMS, IMAGE_FEATURE_DIM

# Realistic features for the embedded datasets: a recipe tuned on fixed directions plus Gaussian noise fails on real
# features, so the generators copy what those are made of: a large mean shared by every video or image, per-video
# (per-image) content the questions never ask about, and the attributes they ask about as a small part of the
# variance. The statistics are in docs/embedded_data.md ("Realistic embedded features"), checked by
# tests/test_avsd_data.py and tests/test_captioning.py.


def _low_rank(rng: np.random.Generator, k: int, width: int, variance: float) -> np.ndarray:
    """(k, width): k random directions with a power-law spectrum (a few large, many small), scaled so that
    unit-normal coefficients give `variance` per dimension on average."""
    spectrum = np.arange(1, k + 1) ** -0.5
    spectrum *= math.sqrt(variance / (spectrum**2).sum())
    return (spectrum[:, None] * rng.standard_normal((k, width))).astype(np.float32)


def _varying(rng: np.random.Generator, n: int, basis: np.ndarray, rho: float, noise: float) -> np.ndarray:
    """(n, width): content in `basis` that changes from one frame (or patch) to the next with correlation `rho`
    (AR(1): slow drift when rho is near 1), plus independent noise of variance `noise`."""
    z = rng.standard_normal((n, len(basis)), dtype=np.float32)
    for t in range(1, n):
        z[t] = rho * z[t - 1] + math.sqrt(1 - rho**2) * z[t]
    return z @ basis + math.sqrt(noise) * rng.standard_normal((n, basis.shape[1]), dtype=np.float32)


def _relu_average(pre: np.ndarray) -> np.ndarray:
    """E[relu(z)] for z ~ N(pre, 1): a ReLU activation averaged over the positions of a pooling window, as I3D's
    features are (non-negative, near zero where the pre-activation is well below zero, linear above)."""
    t = torch.from_numpy(pre)
    return (t * torch.special.ndtr(t) + torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)).numpy()


# The embedded default: a generated AVSD in the real layout and feature sizes. Each video has hidden attributes,
# written into one feature stream each, so the answers to the questions below can only be read off the features
# (the caption names the place, nothing else).
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
EMBEDDED_VERSION = "avsd-embedded-v6"


# How each AVSD stream is generated, in pre-activation units: the variance per dimension of a video's content (low
# rank, shared by its frames) and of its isotropic part, of each attribute in the stream (small: action-recognition
# features hardly encode objects and colours), of the slow drift (AR(1), `rho` from one frame to the next) and of
# frame noise; then a per-dimension bias and gain. I3D values are a ReLU average of that. VGGish: PCA-whitened
# embeddings shifted and scaled per dimension (another domain than AudioSet's), clipped to [-2, 2] and quantised to
# 0..255 as AudioSet released them (AVSD's vggish .npy files are taken to hold those integers as floats).
_AVSD_STREAM_MODEL = {
    "i3d": {"content": 0.25, "isotropic": 0.06, "attribute": 0.025, "drift": 0.2, "rho": 0.85, "noise": 0.08},
    "vggish": {"content": 0.35, "isotropic": 0.1, "attribute": 0.06, "drift": 0.2, "rho": 0.7, "noise": 0.15},
}
_CONTENT_RANK = 32


def make_embedded_avsd(root: Path, seed: int = 0, pixels: bool = False) -> None:
    """Write the embedded AVSD into `root` (all splits, annotations and features). `pixels`: the same dialogs, with
    a video per dialog (ROOT/videos/, see write_video) and only the vggish features."""
    rng = np.random.default_rng(seed)
    streams = {}
    for stream, width in AVSD_STREAMS.items():
        model = _AVSD_STREAM_MODEL["vggish" if stream == "vggish" else "i3d"]
        bias, log_gain = ((0.0, 0.3), (0.0, 0.2)) if stream == "vggish" else ((-0.5, 0.8), (0.0, 0.4))
        streams[stream] = {
            **model,
            "basis": _low_rank(rng, _CONTENT_RANK, width, model["content"]),
            "drift_basis": _low_rank(rng, _CONTENT_RANK, width, model["drift"]),
            "bias": rng.normal(*bias, width).astype(np.float32),
            "gain": np.exp(rng.normal(*log_gain, width)).astype(np.float32),
        }
    directions = {
        (attr, value): math.sqrt(streams[stream]["attribute"]) * rng.standard_normal(AVSD_STREAMS[stream])
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
                s = streams[stream]
                video = rng.standard_normal(_CONTENT_RANK) @ s["basis"]
                video += math.sqrt(s["isotropic"]) * rng.standard_normal(width)
                video += sum(directions[a, value] for a, value in attrs.items() if _ATTRIBUTES[a][0] == stream)
                pre = video.astype(np.float32) + _varying(rng, lengths[stream], s["drift_basis"], s["rho"], s["noise"])
                if stream == "vggish":
                    frames = np.round((np.clip(s["bias"] + s["gain"] * pre, -2, 2) + 2) * 255 / 4)
                else:
                    frames = s["gain"] * np.maximum(_relu_average(s["bias"] + pre), 0)
                if not pixels or stream == "vggish":
                    np.save(root / "features" / stream / f"{video_id}.npy", frames.astype(np.float32))
            if pixels:
                extension = {4: ".mkv", 8: ".avi"}.get(i % 10, ".mp4")
                values = [values.index(attrs[attr]) for attr, (_, values) in _ATTRIBUTES.items()]
                write_video(root / "videos" / f"{video_id}{extension}", *values[:4], np.random.default_rng([seed, i]))
            grounded = [phrasings[rng.integers(2)] for phrasings in _QUESTIONS.values()]
            grounded = [(q, a.format(**attrs)) for q, a in grounded]
            small_talk = [_SMALL_TALK[k] for k in rng.permutation(len(_SMALL_TALK))[:5]]
            target = grounded.pop(rng.integers(len(grounded)))  # the eval target always asks about the video
            turns = grounded + small_talk
            turns = [turns[k] for k in rng.permutation(len(turns))] + [target]
            caption, summary = f"a person in the {place}.", f"it's a quiet {place}."
            dialog = [{"question": q, "answer": a} for q, a in turns]
            dialogs.append({"image_id": video_id, "caption": caption, "summary": summary, "dialog": dialog})
        (root / "annotations" / f"{split}.json").write_text(json.dumps({"dialogs": dialogs}, indent=1))


# The embedded image datasets: every image has hidden attributes that the captions and answers name, so they can
# only be read off the features, made as a CLIP/BLIP ViT-B's last layer gives them (the pooled token, then patch
# tokens): a large mean shared by every image, a few outlier dimensions ~30x the rest (a ViT's massive activations),
# the image's content (low rank) shared by its tokens, the patches seeing it at `patch_share` of the pooled token's
# weight beside their own local content. Attributes weigh more than in I3D: CLIP encodes what captions name.
_IMAGE_PATCHES = 4  # the pooled token and 3 patches
_IMAGE_ATTRIBUTES = {
    "color": ["red", "blue", "green", "yellow", "black", "white"],
    "thing": ["cup", "book", "phone", "towel", "bicycle", "laptop"],
    "place": ["kitchen", "bedroom", "street", "garden", "office", "beach"],
    "count": ["one", "two", "three", "four"],
}
# Variances per dimension, before the per-dimension gain: image content (low rank) and its isotropic part, each
# attribute, the patches' local content (low rank) and noise, the pooled token's noise.
_IMAGE_MODEL = {"content": 0.3, "isotropic": 0.04, "attribute": 0.06, "patch_share": 0.6}
_IMAGE_MODEL |= {"local": 0.2, "patch_noise": 0.1, "pooled_noise": 0.02}
_IMAGE_OUTLIERS = 6  # outlier dimensions


def _make_images(root: Path, splits: dict[str, int], seed: int, pixels: bool, n_values: int | None = None):
    """Per split (name → number of images): write its feature files (`pixels`: images, see draw_image), yield (split,
    the images' ids and hidden attributes, the rng the annotations go on drawing from). Attributes are drawn from
    their first `n_values` values (None: all); features are drawn for images too: both versions share annotations."""
    rng = np.random.default_rng(seed)
    model, m, width = _image_model(rng), _IMAGE_MODEL, IMAGE_FEATURE_DIM
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n_images in splits.items():
        (root / "images" / split if pixels else root / "features").mkdir(parents=True, exist_ok=True)
        images = []
        for i in range(n_images):
            attrs = {attr: values[rng.integers(len(values[:n_values]))] for attr, values in _IMAGE_ATTRIBUTES.items()}
            content = rng.standard_normal(_CONTENT_RANK, dtype=np.float32) @ model["basis"]
            content += math.sqrt(m["isotropic"]) * rng.standard_normal(width, dtype=np.float32)
            content += sum(model[attr, value] for attr, value in attrs.items())
            tokens = np.stack([content] + [m["patch_share"] * content] * (_IMAGE_PATCHES - 1))
            tokens[0] += math.sqrt(m["pooled_noise"]) * rng.standard_normal(width, dtype=np.float32)
            tokens[1:] += _varying(rng, _IMAGE_PATCHES - 1, model["local_basis"], 0.0, m["patch_noise"])
            image_id = f"{split}{i:04d}"
            image = f"{split}/{image_id}.jpg"
            if pixels:
                values = [_IMAGE_ATTRIBUTES[attr].index(attrs[attr]) for attr in ("color", "thing", "place", "count")]
                draw_image(root / "images" / image, *values, np.random.default_rng([*split.encode(), i]))
            else:
                features = model["mean"] + model["gain"] * tokens
                np.save(root / "features" / f"{image_id}.npy", features.astype(np.float32))
            images.append({"image_id": image_id, "image": image, **attrs})
        yield split, images, rng


# Pixels of the embedded datasets: each hidden attribute drawn. Colours by index of the "color" values; shapes by
# index of the "thing" values (circle, square, triangle, upright bar, flat bar, cross: polygons in a unit box); an
# image's background by its "place".
_RGB = [(220, 30, 30), (30, 60, 220), (30, 170, 50), (240, 220, 30), (15, 15, 15), (245, 245, 245)]
_BACKGROUNDS = [(150, 120, 90), (170, 140, 190), (110, 110, 120), (120, 160, 120), (90, 130, 160), (200, 180, 140)]
_a, _b = 1 / 3, 2 / 3
_SHAPES = [
    None,
    [(0, 0), (1, 0), (1, 1), (0, 1)],
    [(0.5, 0), (1, 1), (0, 1)],
    [(_a, 0), (_b, 0), (_b, 1), (_a, 1)],
    [(0, _a), (1, _a), (1, _b), (0, _b)],
    [(_a, 0), (_b, 0), (_b, _a), (1, _a), (1, _b), (_b, _b), (_b, 1), (_a, 1), (_a, _b), (0, _b), (0, _a), (_a, _a)],
]


def draw_shape(image, shape: int, color: int, x: float, y: float, w: float, h: float) -> None:
    """Shape `shape` in colour `color`, centred at (x, y), w x h."""
    from PIL import ImageDraw

    box = [(x + (u - 0.5) * w, y + (v - 0.5) * h) for u, v in _SHAPES[shape] or [(0, 0), (1, 1)]]
    draw = ImageDraw.Draw(image)
    (draw.ellipse if _SHAPES[shape] is None else draw.polygon)(box, fill=_RGB[color])


def draw_image(path: Path, color: int, shape: int, place: int, count: int, rng: np.random.Generator) -> None:
    """A 64x48 image: `count` + 1 shapes in random cells of a 2x2 grid on the place's background. As among real
    COCO files, a few are no plain RGB JPEG: a PNG named .jpg, grayscale, CMYK, or stored rotated with an EXIF
    orientation that turns it upright."""
    from PIL import Image

    image = Image.new("RGB", (64, 48), _BACKGROUNDS[place])
    for cell in rng.permutation(4)[: count + 1]:
        x, y = 32 * (cell % 2) + rng.integers(12, 18), 24 * (cell // 2) + rng.integers(10, 14)
        draw_shape(image, shape, color, x, y, 20, 16)
    kind, exif = int(rng.integers(20)), Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display" (kind 3)
    stored = {1: image.convert("L"), 2: image.convert("CMYK"), 3: image.transpose(Image.Transpose.ROTATE_90)}
    image = stored.get(kind, image)
    image.save(path, "PNG" if kind == 0 else "JPEG", quality=90, **({"exif": exif} if kind == 3 else {}))


def write_video(path: Path, color: int, shape: int, motion: int, count: int, rng: np.random.Generator) -> None:
    """2 s at 8 fps, 48x48 (H.264 or MPEG-4): `count` + 1 shapes side by side on grey that move up, move down,
    stay, grow, shrink or blink (`motion`): none of these changes under a horizontal flip."""
    import av
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    dx, dy = rng.integers(-3, 4, size=2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 48, "yuv420p"
        for k in range(16):
            image, t = Image.new("RGB", (48, 48), (128, 128, 128)), k / 15
            y = [38 - 28 * t, 10 + 28 * t, 24, 24, 24, 24][motion] + dy
            size = [12, 12, 12, 4 + 12 * t, 16 - 12 * t, 12 * (k // 2 % 2 == 0)][motion]
            for j in range(count + 1) if size else []:
                draw_shape(image, shape, color, 48 * (j + 0.5) / (count + 1) + dx, y, size, size)
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())


def _image_model(rng: np.random.Generator) -> dict:
    """The fixed parts of the embedded image features: shared mean and per-dimension gain (outliers included),
    the bases of image and patch content, and a direction per attribute value."""
    mean = rng.normal(0, 0.5, IMAGE_FEATURE_DIM)
    gain = np.exp(rng.normal(0, 0.3, IMAGE_FEATURE_DIM))
    outliers = rng.permutation(IMAGE_FEATURE_DIM)[:_IMAGE_OUTLIERS]
    mean[outliers] = rng.choice([-1, 1], _IMAGE_OUTLIERS) * rng.uniform(8, 15, _IMAGE_OUTLIERS)
    gain[outliers] *= 4
    model = {
        "mean": mean.astype(np.float32),
        "gain": gain.astype(np.float32),
        "basis": _low_rank(rng, _CONTENT_RANK, IMAGE_FEATURE_DIM, _IMAGE_MODEL["content"]),
        "local_basis": _low_rank(rng, _CONTENT_RANK, IMAGE_FEATURE_DIM, _IMAGE_MODEL["local"]),
    }
    scale = math.sqrt(_IMAGE_MODEL["attribute"])
    for attr, values in _IMAGE_ATTRIBUTES.items():
        for value in values:
            model[attr, value] = scale * rng.standard_normal(IMAGE_FEATURE_DIM, dtype=np.float32)
    return model


_CAPTIONS = [
    "a {color} {thing} in the {place}.",
    "there is a {color} {thing} in a {place}.",
    "a photo of a {color} {thing} in the {place}.",
    "the {place} has a {color} {thing} in it.",
]
CAPTIONS_SPLITS = {"train": 160, "val": 40, "test": 40}  # images; train has 2 captions per image, eval 3 references
CAPTIONS_VERSION = "captions-embedded-v2"


def make_embedded_captions(root: Path, seed: int = 0, pixels: bool = False) -> None:
    for split, images, rng in _make_images(root, CAPTIONS_SPLITS, seed, pixels):
        entries = []
        for image in images:
            key = {"image": image["image"], "image_id": image["image_id"]}
            captions = [_CAPTIONS[k].format(**image) for k in rng.permutation(len(_CAPTIONS))]
            if split == "train":  # the Karpathy layout: one entry per caption
                entries += [{**key, "caption": c} for c in captions[:2]]
            else:
                entries.append({**key, "caption": captions[:3]})
        (root / "annotations" / f"{split}.json").write_text(json.dumps(entries, indent=1))


VQA_SPLITS = {"train": 160, "val": 30, "test": 30}  # images, 3 questions each
VQA_VERSION = "vqa-embedded-v2"


def make_embedded_vqa(root: Path, seed: int = 0, pixels: bool = False) -> None:
    """Questions of three answer types; the 10 human answers vary in spelling ("two", "2", "Red.") as real VQA
    answers do, and one or two annotators of ten disagree, so the consensus and the official accuracy's answer
    processing (which matches only some spellings) matter."""
    digits = {"one": "1", "two": "2", "three": "3", "four": "4"}
    for split, images, rng in _make_images(root, VQA_SPLITS, seed, pixels):
        entries = []
        for image in images:
            asked_color = _IMAGE_ATTRIBUTES["color"][rng.integers(6)] if rng.random() < 0.5 else image["color"]
            plain, period, title = str, "{}.".format, str.title
            thing, yes_no = image["thing"], "yes" if asked_color == image["color"] else "no"
            questions = [
                (f"what color is the {thing}?", "other", image["color"], [plain, period, title]),
                ("what is the object in the picture?", "other", thing, [plain, "a {}".format, "the {}".format]),
                (f"how many {thing}s are there?", "number", image["count"], [plain, digits.get]),
                (f"is the {thing} {asked_color}?", "yes/no", yes_no, [plain, title]),
            ]
            for q in rng.permutation(len(questions))[:3]:
                question, answer_type, answer, spellings = questions[q]
                answers = [spellings[rng.integers(len(spellings))](answer) for _ in range(10)]
                pool = {"number": _IMAGE_ATTRIBUTES["count"], "yes/no": ["yes", "no"]}.get(answer_type)
                pool = pool or _IMAGE_ATTRIBUTES["color" if "color" in question else "thing"]
                for k in rng.permutation(10)[: rng.integers(0, 3)]:  # disagreeing annotators
                    answers[k] = pool[rng.integers(len(pool))]
                entry = {"question_id": 100_000 * list(VQA_SPLITS).index(split) + len(entries), "image": image["image"]}
                entries.append({**entry, "question": question, "answer": answers, "answer_type": answer_type})
        (root / "annotations" / f"{split}.json").write_text(json.dumps(entries, indent=1))


SNLI_VE_SPLITS = {"train": 400, "val": 60, "test": 60}  # images, three sentences each
SNLI_VE_VERSION = "snli-ve-embedded-v2"
# Colours and things used. Comparing words with realistic features is slow to learn for the small model from
# scratch: with 2 it reads the thing off the image after ~150 steps (66.7% accuracy: neutral is right) and the
# colour too after ~350 (100%, in a 500-step run); with 3, not even the thing within 250 steps.
SNLI_VE_VALUES = 2


def make_embedded_snli_ve(root: Path, seed: int = 0, pixels: bool = False) -> None:
    """Three sentences per image, one per label. Entailment names the image's thing and colour; contradiction its
    thing with another colour; neutral another thing (whose colour the image cannot tell). Every sentence is
    equally likely under every label, so only the image decides."""
    colors, things = _IMAGE_ATTRIBUTES["color"][:SNLI_VE_VALUES], _IMAGE_ATTRIBUTES["thing"][:SNLI_VE_VALUES]
    for split, images, rng in _make_images(root, SNLI_VE_SPLITS, seed, pixels, SNLI_VE_VALUES):
        entries = []
        for image in images:
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


PIXELS_VERSION = "pixels-v1"  # appended to an embedded dataset's version for its version with images or videos


def embedded_root(cache_dir: Path | None, name: str, make, pixels: bool = False) -> Path:
    """Generate an embedded dataset once into `cache_dir/name` and reuse it (`pixels`: its version with images or
    videos). Safe to race: every process builds in its own temp dir and renames it into place; the loser of the race
    throws its copy away."""
    if pixels:
        name, make = f"{name}-{PIXELS_VERSION}", functools.partial(make, pixels=True)
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vltasks"
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
