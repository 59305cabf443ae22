"""Datasets: reading real annotation/feature layouts, generating the embedded defaults, samplers and padding.

Everything here is task-agnostic except the dataset formats (AVSD, ...), which live here so that a task in
`tasks.py` only says which format it reads. Visual input is pre-extracted features (one `.npy` per video or image,
memory-mapped so that a dataset much larger than RAM costs nothing until a batch touches it) or raw pixels (images
and videos decoded and transformed in the loader workers, for a vision tower: `Pixels`, `MediaDataset`).
"""

import functools
import itertools
import json
import math
import mmap
import os
import shutil
import sys
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
    (shape (D,)) is treated as one frame. A stream of width None takes the width of its first file (a cache written
    by --cache-features), which every other file must then have.
    """

    def __init__(self, root: Path, streams: dict[str, int | None], max_len: int):
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
                header = npy.read_array_header_1_0 if npy.read_magic(f) == (1, 0) else npy.read_array_header_2_0
                shape, fortran_order, dtype = header(f)
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read feature file for id {feature_id!r}: {path} ({e})") from None
        if dtype.hasobject:
            raise InputError(f"cannot read feature file for id {feature_id!r}: {path} (an object array)")
        if len(shape) == 1:  # one vector per id: one frame
            shape = (1, *shape)
        width = self.streams[stream] = width or shape[-1]
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
    """Annotation samples (dicts) joined with the features of their `image_id` under `"features"`.

    `shuffle_features` is the ablation that proves a model uses its visual input: each sample gets the features of
    another sample's video (a fixed permutation over distinct feature ids), so text-only shortcuts keep working and
    everything grounded in the video breaks.
    """

    def __init__(self, samples: list[dict], features: FeatureStore | None, shuffle_features: bool = False):
        if not samples:
            raise InputError("empty split: no samples")
        self.samples, self.features = samples, features
        ids = sorted({s["image_id"] for s in samples})
        for feature_id in ids if features is not None else []:
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
        return {**sample, "features": self.features.load(self.remap[sample["image_id"]])}

    def feature_stats(self, max_ids: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation over every frame of up to `max_ids` of the split's videos (or
        images), evenly spaced over the sorted ids: the same on every rank, and a dataset of any size costs at most
        `max_ids` feature files. Non-finite values are left out (a broken file must not turn every feature into
        NaN; its own samples still do, for --nan-policy to deal with). A dimension that hardly varies (a dead unit)
        gets a floor of 1% of the typical deviation (and at least 1e-6: a constant dimension becomes 0), so
        normalising it does not blow its rounding noise up to the size of real signal."""
        ids = sorted(self.remap)
        ids = ids[:: math.ceil(len(ids) / max_ids)]
        total, squares, count = np.zeros((3, self.features.dim))
        for feature_id in ids:
            frames = self.features.load(feature_id).astype(np.float64)
            finite = np.isfinite(frames)
            frames[~finite] = 0
            total += frames.sum(0)
            squares += (frames * frames).sum(0)
            count += finite.sum(0)
        count = np.maximum(count, 1)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean * mean, 0))
        std = np.maximum(std, max(0.01 * std.mean(), 1e-6))
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


# ----------------------------------------------------------------------------------------------------------------
# Raw pixels (--model.vision): ROOT/images/{entry's "image"} or ROOT/videos/{image_id}.{mp4,webm,avi,mkv}, decoded
# and transformed in the loader workers into the tower's input, (F, 3, H, W) per sample (F = 1 for an image).

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv")


class Pixels:
    """Files → the tower's `pixel_values`, through its image processor; in training (unless --data.no-augment) first a
    random resized crop to its output size (crop_box; bicubic, as BLIP and open_clip fine-tune) and a horizontal flip,
    the same for every frame of a video. Images: EXIF orientation applied, any mode made RGB. Videos (PyAV):
    `num_frames` frames at the centres of equal segments (training: anywhere in each), decoded in one forward pass
    (frames_on_screen)."""

    def __init__(self, processor, num_frames: int):
        self.processor, self.num_frames = processor, num_frames
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        self.size = (size.get("height"), size.get("width"))
        if None in self.size:
            raise InputError(f"image processor {type(processor).__name__} gives no fixed size (height, width)")

    def __call__(self, path: Path, rng: np.random.Generator | None, check: bool = False) -> torch.Tensor | None:
        """(F, 3, H, W) float32; `rng` None: the evaluation transform. `check`: only what is cheap, before training:
        the file exists, its header (image) or its container and video stream (video) can be read."""
        from PIL import Image

        if not path.is_file():
            raise InputError(f"missing {'video' if path.suffix in VIDEO_EXTENSIONS else 'image'} file: {path}")
        images = self.read_video(path, rng, check) if path.suffix in VIDEO_EXTENSIONS else [read_image(path, check)]
        if check:
            return None
        if rng is not None:
            box, flip = crop_box(images[0].size, rng), rng.random() < 0.5
            images = [image.resize(self.size[::-1], Image.Resampling.BICUBIC, box=box) for image in images]
            images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images] if flip else images
        return torch.from_numpy(self.processor(images=images, return_tensors="np")["pixel_values"])

    def read_video(self, path: Path, rng: np.random.Generator | None, check: bool = False) -> list:
        import av
        from PIL import Image

        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]  # IndexError: none
                start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
                duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
                duration = duration or (container.duration or 0) / av.time_base
                if duration <= 0:
                    raise ValueError("no duration")
                offsets = rng.random(self.num_frames) if rng is not None else np.full(self.num_frames, 0.5)
                if check:
                    return []
                # frame threads: faster where cores idle, at some more CPU time (bench.py video), so at most this
                # process's share of the cores among the DataLoader workers of every rank on the machine
                worker = torch.utils.data.get_worker_info()
                share = (worker.num_workers if worker else 1) * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
                stream.thread_type, stream.thread_count = "AUTO", max(1, (os.cpu_count() or 1) // share)
                times = start + duration / self.num_frames * (np.arange(self.num_frames) + offsets)  # ascending
                # to_image's pixels, without its copy row by row, and on one thread: PyAV 17 starts a pool of
                # threads for each frame converted by default
                rgb = {"format": "rgb24"} | ({"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {})
                frames = frames_on_screen(container, stream, times.tolist())
                return [Image.fromarray(frame.to_ndarray(**rgb)) for frame in frames]  # AttributeError: none decoded
        except Exception as e:  # PyAV's errors, a missing stream or frame
            raise InputError(f"cannot decode video {path}: {type(e).__name__}: {e}") from None


def frames_on_screen(container, stream, times: list[float]) -> list:
    """The frame on screen at each of the ascending `times` (seconds): the last one starting at or before it (the
    first frame, for a time before it). One seek, to the first time (packets_from); then forward through the packets a
    group at a time (a keyframe and the packets up to the next one), each decoded only as far as a time left lies
    before the next group's start: nothing is decoded twice, and where keyframes are frequent, what lies between the
    times is skipped."""
    frames, held = [], None

    def pending() -> float:  # the first time still without its frame
        return times[len(frames)] if len(frames) < len(times) else math.inf

    def decode(packets, until: float = math.inf) -> None:  # stops once the first time left is at or past `until`
        nonlocal held
        for packet in packets:
            for frame in stream.decode(packet):  # None drains the decoder (its frames carry no time base)
                while held is not None and float(frame.pts * stream.time_base) > pending():
                    frames.append(held)  # frames come out in presentation order: each settles the times before it
                held = frame
            if pending() >= until:
                return

    def advance(group: list, next_start: float) -> None:  # at the end of `group`: decode it if it may hold a frame
        first = group[0]
        start = float(first.pts * stream.time_base) if first.is_keyframe and first.pts is not None else None
        closed = start is not None and all(p.pts is not None and p.pts >= first.pts for p in group)
        if closed and pending() < start:  # none of its frames shows before its keyframe: the decoder's last ones do
            decode([None])
            while held is not None and pending() < start:
                frames.append(held)
            stream.codec_context.flush_buffers()
        if pending() < next_start:
            decode(group, next_start)
        if pending() >= next_start:  # the rest of the group shows before the times left: the next one decoded
            stream.codec_context.flush_buffers()  # starts afresh, as after a seek

    group = []
    for packet in packets_from(container, stream, times[0]):
        if packet.is_keyframe and packet.pts is not None and group:
            advance(group, float(packet.pts * stream.time_base))
            group = []
            if len(frames) == len(times):
                return frames
        if packet.size:  # demux ends with an empty packet
            group.append(packet)
    if group:
        advance(group, math.inf)
    decode([None])
    return frames + [held] * (len(times) - len(frames))


def packets_from(container, stream, t: float):
    """The stream's packets from the last keyframe shown at or before `t` (seconds; the first keyframe if none is).
    A demuxer may seek by decoding time (MP4 does): when it lands on a keyframe shown after `t`, this steps back."""
    import av

    target = max(int(t / stream.time_base), stream.start_time or 0)  # AVI refuses a seek before its start
    container.seek(target, stream=stream, backward=True)
    while True:
        packets = container.demux(stream)
        first = next(packets)  # at the end, an empty packet
        earlier = None if first.pts is None else min(first.pts, first.pts if first.dts is None else first.dts) - 1
        if earlier is None or float(first.pts * stream.time_base) <= t or earlier >= target:
            return itertools.chain([first], packets)
        try:
            container.seek(earlier, stream=stream, backward=True)
        except av.error.FFmpegError:  # nothing before it (AVI)
            container.seek(target, stream=stream, backward=True)
            return container.demux(stream)
        target = earlier


def read_image(path: Path, check: bool = False):
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            return image.size if check else ImageOps.exif_transpose(image).convert("RGB")
    except Exception as e:  # PIL raises many types for a bad file
        raise InputError(f"cannot {'read' if check else 'decode'} image {path}: {e}") from None


def image_file(root: Path, sample: dict) -> Path:
    """ROOT/images/{the entry's "image"}."""
    if not sample.get("image"):
        raise InputError(f"sample {sample['id']}: no 'image' field (the image file under {root / 'images'})")
    return root / "images" / sample["image"]


def video_file(root: Path, sample: dict) -> Path:
    """ROOT/videos/{image_id}.{mp4,webm,avi,mkv}: the first that exists (the .mp4, named as missing, if none)."""
    candidates = [root / "videos" / f"{sample['image_id']}{extension}" for extension in VIDEO_EXTENSIONS]
    return next((path for path in candidates if path.is_file()), candidates[0])


def crop_box(size: tuple[int, int], rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A random crop (left, top, right, bottom) of 0.5-1 of the area, aspect ratio 3/4-4/3 (torchvision's
    RandomResizedCrop: 10 tries, then the whole image clamped to that ratio)."""
    width, height = size
    for _ in range(10):
        area, ratio = width * height * rng.uniform(0.5, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            return left, top, left + w, top + h
    w, h = min(width, round(height * 4 / 3)), min(height, round(width * 4 / 3))
    return (width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2


class MediaDataset(FeatureDataset):
    """Samples joined with their image or video as `pixels` (F, 3, H, W), and with `features` (extra streams, e.g.
    VGGish audio beside the frames) if given; `media`: feature id → file. Every file is checked (cheaply) here: a
    bad one is an InputError naming it, or with `skip_bad` its samples are left out, counted on stderr. One that
    fails later, in a loader worker, is the same error, or one warning line and its sample left out of the batch
    (collate_in_worker). Training randomness comes from (seed, epoch, index), the sampler passing (epoch, index):
    a resumed run draws the crops, flips and frame times of the uninterrupted one, whichever worker loads them."""

    per_epoch = True  # ResumableSampler yields (epoch, index)

    def __init__(self, samples, features, shuffle, media: dict, pixels: Pixels, skip_bad: bool, train: bool, seed):
        bad = {}
        for feature_id in sorted(media):
            try:
                pixels(media[feature_id], None, check=True)
            except InputError as e:
                bad[feature_id] = str(e)
                if not skip_bad:
                    raise
        if bad and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            first = next(iter(bad.values()))
            message = f"warning: skipped {len(bad)} of {len(media)} files that cannot be read, first: {first}"
            print(message, file=sys.stderr)
        super().__init__([s for s in samples if s["image_id"] not in bad], features, shuffle)
        self.media, self.pixels, self.skip_bad, self.train, self.seed = media, pixels, skip_bad, train, seed
        self.frames = max(pixels.num_frames if path.suffix in VIDEO_EXTENSIONS else 1 for path in media.values())

    def __getitem__(self, key) -> dict | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        source = self.remap[sample["image_id"]]
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        try:
            pixels = self.pixels(self.media[source], rng)
        except InputError as e:
            if not self.skip_bad:
                raise
            print(f"warning: skipped: {e} (--data.skip-bad-files)", file=sys.stderr, flush=True)
            return None
        features = {"features": self.features.load(source)} if self.features is not None else {}
        return {**sample, "pixels": pixels, **features}


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
        image_id = str(dialog["image_id"])
        context = {"image_id": image_id, "caption": dialog.get("caption", ""), "summary": dialog.get("summary", "")}
        for t in range(len(turns)) if train else [target]:
            history = [(h["question"], h["answer"]) for h in turns[max(0, t - max_turns) : t]]
            turn = turns[t]
            references = turn["answer"] if isinstance(turn["answer"], list) else [turn["answer"]]
            sample = {**context, "id": f"{image_id}#{t}" if train else image_id, "history": history}
            samples.append({**sample, "question": turn["question"], "answer": references[0], "references": references})
    if not samples:
        raise InputError(f"empty split: no dialogs in {path}")
    return samples


# Realistic features for the embedded datasets: a recipe tuned on fixed directions plus Gaussian noise fails on real
# features, so the generators copy what those are made of: a large mean shared by every video or image, per-video
# (per-image) content the questions never ask about, and the attributes they ask about as a small part of the
# variance. The statistics are in the README ("Realistic embedded features"), checked by tests/test_avsd_data.py and
# tests/test_captioning.py.


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
        image = {"image_id": image_id, "image": entry.get("image")}
        if train:
            samples += [{"id": f"{image_id}#{n}.{k}", **image, "caption": c} for k, c in enumerate(captions)]
        elif image_id in by_image:
            by_image[image_id]["references"] += captions
        else:
            by_image[image_id] = {"id": image_id, **image, "references": list(captions)}
    return samples if train else list(by_image.values())


def load_vqa(path: Path, train: bool) -> list[dict]:
    """VQAv2 style entries {"question_id", "question", "answer": [answers], "image"} (+ optional "answer_type",
    "image_id"). One sample per question; "answer" may be a single string. Eval entries may lack answers (a test
    split scored elsewhere): they get an empty list, and scoring them is refused; a split must not mix both."""
    samples = []
    for n, entry in enumerate(read_entries(path, ["question_id", "question", *(["answer"] if train else [])])):
        answers = entry.get("answer", [])
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or (train and not answers):
            where = f"{path}: entry {n} (question_id {entry['question_id']!r})"
            raise InputError(f"{where}: 'answer' must be a string or a list of strings")
        sample = {"id": str(entry["question_id"]), "image_id": image_feature_id(entry), "image": entry.get("image")}
        sample["question"] = entry["question"]
        samples.append({**sample, "answers": answers, "answer_type": entry.get("answer_type")})
    if len({s["id"] for s in samples}) != len(samples):
        raise InputError(f"{path}: question_id values are not unique")
    unanswered = [s["id"] for s in samples if not s["answers"]]
    if 0 < len(unanswered) < len(samples):
        raise InputError(f"{path}: question {unanswered[0]} has no answers while others have")
    return samples


# The embedded image datasets: every image has hidden attributes that the captions and answers name, so they can
# only be read off the features, made as a CLIP/BLIP ViT-B's last layer gives them (the pooled token, then patch
# tokens): a large mean shared by every image, a few outlier dimensions ~30x the rest (a ViT's massive activations),
# the image's content (low rank) shared by its tokens, the patches seeing it at `patch_share` of the pooled token's
# weight beside their own local content. Attributes weigh more than in I3D: CLIP encodes what captions name.
IMAGE_FEATURE_DIM = 768  # ViT-B/16 (CLIP, BLIP) patch/pooled width
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
        sample = {"id": n, "image_id": image_feature_id(entry), "image": entry.get("image")}
        samples.append({**sample, "sentence": entry["sentence"], "label": label})
    return samples


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


# ----------------------------------------------------------------------------------------------------------------
# Sampling and padding


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: `skip` indices of this rank are dropped from the front,
    so a resumed run sees exactly the batches the interrupted one had not seen yet (without loading the others).
    For a dataset that draws per-sample randomness (`per_epoch`, e.g. MediaDataset) it yields (epoch, index)."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.skip :]
        return iter([(self.epoch, i) for i in indices] if getattr(self.dataset, "per_epoch", False) else indices)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad lists of ints into a (B, max_len) long tensor, on the right (training) or on the left (generation)."""
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), value, dtype=np.int64)  # numpy: filling rows from lists is 4x torch's cost
    for i, s in enumerate(seqs):
        start = width - len(s) if left else 0
        out[i, start : start + len(s)] = s
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
    """The loaders' collate_fn: the task's collate, its result made cheap to send (see share_tensors). Samples whose
    file could not be read (None, with --data.skip-bad-files) are left out."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise InputError("no sample of a batch could be read (--data.skip-bad-files): see the warnings above")
    return share_tensors(collate(kept, train=train))


def stack_features(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length (T, D) features into (B, T_max, D) plus a (B, T_max) bool mask of real frames."""
    width = max(a.shape[0] for a in arrays)
    out = batch_tensor((len(arrays), width, arrays[0].shape[1]))
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = torch.from_numpy(a)
        out[i, a.shape[0] :] = 0
    return out, torch.arange(width) < torch.tensor([a.shape[0] for a in arrays])[:, None]


def batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float tensor; in a DataLoader worker, in shared memory (as torch's default_collate builds a batch):
    sending the largest tensor of a batch to the training process then costs nothing instead of one more copy."""
    out = torch.empty(0)
    if torch.utils.data.get_worker_info() is not None:
        out = out.new(out.untyped_storage()._new_shared(math.prod(shape) * out.element_size()))
    return out.resize_(shape)


def stack_pixels(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """(F, 3, H, W) per sample → (B, F, 3, H, W)."""
    return torch.stack(list(pixels), out=batch_tensor((len(pixels), *pixels[0].shape)))
