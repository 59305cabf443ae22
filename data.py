"""Datasets: reading real annotation/feature layouts, generating the embedded defaults, samplers and padding.

Everything here is task-agnostic except the dataset formats (AVSD, ...), which live here so that a task in
`tasks.py` only says which format it reads. Visual input is pre-extracted features (one `.npy` per video or image,
memory-mapped so that a dataset much larger than RAM costs nothing until a batch touches it) or raw pixels (images
and videos decoded and transformed in the loader workers, for a vision tower: `Pixels`, `MediaDataset`).
"""

import itertools
import json
import math
import mmap
import os
import sys
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
        dtype = np.float16 if all(a.dtype == np.float16 for a in arrays) else np.float32  # float16 files stay so
        return np.concatenate([np.asarray(a[:length], dtype=dtype) for a in arrays], axis=1)


class FeatureDataset(Dataset):
    """Annotation samples (dicts) joined with the features of their `image_id` under `"features"`.

    `shuffle_features` is the ablation that proves a model uses its visual input: each sample gets the features of
    another sample's video (a fixed permutation over distinct feature ids), so text-only shortcuts keep working and
    everything grounded in the video breaks.
    """

    def __init__(self, samples: list[dict], features: FeatureStore | None, shuffle_features=False, root=None):
        if not samples:
            raise InputError("empty split: no samples")
        self.samples, self.features, self.root = samples, features, root  # root: where the split was read from
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
        self.processor, self.num_frames, self.size = processor, num_frames, None
        if processor is None:  # a pretrained VLM: its own processor takes the images (models.ChatFormat)
            return
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        self.size = (size.get("height"), size.get("width"))
        if None in self.size:
            raise InputError(f"image processor {type(processor).__name__} gives no fixed size (height, width)")

    def __call__(self, path: Path, rng: np.random.Generator | None, check: bool = False) -> torch.Tensor | None:
        """(F, 3, H, W) float32 (no processor: the F images, cropped at their own size); `rng` None: the evaluation
        transform. `check`: only what is cheap, before training: the file exists, its header (image) or its container
        and video stream (video) can be read."""
        from PIL import Image

        if not path.is_file():
            raise InputError(f"missing {'video' if path.suffix in VIDEO_EXTENSIONS else 'image'} file: {path}")
        images = self.read_video(path, rng, check) if path.suffix in VIDEO_EXTENSIONS else [read_image(path, check)]
        if check:
            return None
        if rng is not None:
            box, flip = crop_box(images[0].size, rng), rng.random() < 0.5
            size = self.size[::-1] if self.size else images[0].size
            images = [image.resize(size, Image.Resampling.BICUBIC, box=box) for image in images]
            images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images] if flip else images
        if self.processor is None:
            return images
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

    def __init__(self, samples, features, shuffle, root, media: dict, pixels: Pixels, skip_bad: bool, train, seed):
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
        super().__init__([s for s in samples if s["image_id"] not in bad], features, shuffle, root)
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


IMAGE_FEATURE_DIM = 768  # ViT-B/16 (CLIP, BLIP) patch/pooled width
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


def collate_in_worker(collate, samples: list, train: bool) -> dict:
    """The loaders' collate_fn: the task's collate of the samples whose file could be read (None: could not, with
    --data.skip-bad-files)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise InputError("no sample of a batch could be read (--data.skip-bad-files): see the warnings above")
    return collate(kept, train=train)


def stack_features(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length (T, D) features into (B, T_max, D), in their files' dtype (float16 files cross to
    the training process, and to the GPU, at half the bytes), plus a (B, T_max) bool mask of real frames."""
    width = max(a.shape[0] for a in arrays)
    out = batch_tensor((len(arrays), width, arrays[0].shape[1]), torch.from_numpy(arrays[0][:0]).dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = torch.from_numpy(a)
        out[i, a.shape[0] :] = 0
    return out, torch.arange(width) < torch.tensor([a.shape[0] for a in arrays])[:, None]


def batch_tensor(shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker, in shared memory (as torch's default_collate builds a batch): sending
    the largest tensor of a batch to the training process then costs no copy into shared memory on the way."""
    out = torch.empty(shape, dtype=dtype)
    return out.share_memory_() if torch.utils.data.get_worker_info() is not None else out


def stack_pixels(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """(F, 3, H, W) per sample → (B, F, 3, H, W)."""
    return torch.stack(list(pixels), out=batch_tensor((len(pixels), *pixels[0].shape)))
