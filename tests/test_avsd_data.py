"""The AVSD loader on real-format files, feature loading, the embedded generator and their error messages."""

import json

import numpy as np
import pytest
import torch

import data
import embedded
from data import InputError


def write_avsd(root, dialogs, widths=None, lengths=(7, 7, 9)):
    """Real AVSD layout: annotations/{split}.json + features/{stream}/{image_id}.npy."""
    widths = widths or data.AVSD_STREAMS
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        (root / "annotations" / f"{split}.json").write_text(json.dumps({"dialogs": dialogs}))
    for (stream, width), length in zip(widths.items(), lengths, strict=True):
        (root / "features" / stream).mkdir(parents=True, exist_ok=True)
        for d in dialogs:
            np.save(root / "features" / stream / f"{d['image_id']}.npy", np.ones((length, width), np.float32))
    return root


def ten_turn_dialog(image_id="vid_01"):
    turns = [
        {"question": f"what's happening in part {i}?", "answer": f"the man's \"busy\", it's turn {i}!"}
        for i in range(10)
    ]
    return {
        "image_id": image_id,
        "caption": "A man, in a kitchen.",
        "summary": "He doesn't stop cooking.",
        "dialog": turns,
    }


def test_train_split_has_one_sample_per_turn_with_bounded_history(tmp_path):
    write_avsd(tmp_path, [ten_turn_dialog("a"), ten_turn_dialog("b")])
    samples = data.load_avsd(tmp_path / "annotations" / "train.json", train=True, max_turns=3)
    assert len(samples) == 20
    assert [len(s["history"]) for s in samples[:5]] == [0, 1, 2, 3, 3]
    fifth = samples[4]
    assert fifth["id"] == "a#4" and fifth["question"] == "what's happening in part 4?"
    assert fifth["history"][0] == ("what's happening in part 1?", "the man's \"busy\", it's turn 1!")
    assert fifth["caption"] == "A man, in a kitchen." and fifth["summary"] == "He doesn't stop cooking."
    assert len({s["id"] for s in samples}) == 20


def test_eval_split_has_one_sample_per_dialog_targeting_the_last_turn(tmp_path):
    write_avsd(tmp_path, [ten_turn_dialog("a"), ten_turn_dialog("b")])
    samples = data.load_avsd(tmp_path / "annotations" / "val.json", train=False, max_turns=3)
    assert [s["id"] for s in samples] == ["a", "b"]
    assert samples[0]["answer"] == "the man's \"busy\", it's turn 9!"
    assert [q for q, _ in samples[0]["history"]] == [f"what's happening in part {i}?" for i in (6, 7, 8)]


def multiref_dialog(image_id: str) -> dict:
    """A dialog as the real multi-reference test files hold it (DSTC10's test_set4DSTC10-AVSD_multiref+reason.json,
    DSTC7's test set as mock_test_set4DSTC10-AVSD_from_DSTC7_multiref.json): no caption or summary, and the last
    turn's "answer" a list of 6 references (read by the official evaluate.py), here beside its "reason"."""
    return {
        "image_id": image_id,
        "dialog": [
            {"question": "is it a man or a woman ?", "answer": "it is a man sitting on the bed"},
            {"question": "is he alone ?", "answer": "yes , he is the only one in the video"},
            {
                "question": "can you see what he is holding ?",
                "answer": [
                    "he holds a small red book",
                    "a book , i think it is red .",
                    "yes he is holding a red book in his hands .",
                    "it looks like a book",
                    "he has a book and reads it .",
                    "i can see a red book .",
                ],
                "reason": [{"timestamp": [0.0, 23.7], "sentence": "he holds a book"}],
            },
        ],
    }


def test_multi_reference_file_gives_every_reference_to_the_sample(tmp_path):
    write_avsd(tmp_path, [multiref_dialog("CGRUM"), multiref_dialog("M8TPH")])
    samples = data.load_avsd(tmp_path / "annotations" / "test.json", train=False, max_turns=3)
    assert [s["id"] for s in samples] == ["CGRUM", "M8TPH"]
    assert samples[0]["references"] == multiref_dialog("x")["dialog"][-1]["answer"]
    assert samples[0]["caption"] == "" and samples[0]["history"][1] == (
        "is he alone ?",
        "yes , he is the only one in the video",
    )
    single = data.load_avsd(
        write_avsd(tmp_path / "single", [ten_turn_dialog("a")]) / "annotations" / "val.json", train=False, max_turns=3
    )
    assert single[0]["references"] == [single[0]["answer"]]
    # A training file holds one answer per turn: a list there is refused, not trained on as text.
    with pytest.raises(InputError, match=r"dialog 0 \(image_id 'CGRUM'\), turn 2: 'answer' must be a string$"):
        data.load_avsd(tmp_path / "annotations" / "train.json", train=True, max_turns=3)


def test_features_are_aligned_to_the_shortest_stream_truncated_and_concatenated(tmp_path):
    write_avsd(tmp_path, [ten_turn_dialog("a")], lengths=(7, 7, 9))
    store = data.FeatureStore(tmp_path / "features", data.AVSD_STREAMS, max_len=100)
    assert store.load("a").shape == (7, 4224) and store.load("a").dtype == np.float32
    short = data.FeatureStore(tmp_path / "features", data.AVSD_STREAMS, max_len=5)
    assert short.load("a").shape == (5, 4224)
    only_audio = data.FeatureStore(tmp_path / "features", {"vggish": 128}, max_len=100)
    assert only_audio.load("a").shape == (9, 128)


def test_shuffled_features_come_from_another_video(tmp_path):
    dialogs = [ten_turn_dialog(f"v{i}") for i in range(5)]
    write_avsd(tmp_path, dialogs)
    for i in range(5):  # make each video's features recognisable
        np.save(tmp_path / "features" / "vggish" / f"v{i}.npy", np.full((9, 128), i, np.float32))
    samples = data.load_avsd(tmp_path / "annotations" / "val.json", train=False, max_turns=3)
    store = data.FeatureStore(tmp_path / "features", {"vggish": 128}, max_len=100)
    plain = data.FeatureDataset(samples, store)
    shuffled = data.FeatureDataset(samples, store, shuffle_features=True)
    assert [plain[i]["features"][0, 0] for i in range(5)] == [0, 1, 2, 3, 4]
    moved = [shuffled[i]["features"][0, 0] for i in range(5)]
    assert sorted(moved) == [0, 1, 2, 3, 4] and all(moved[i] != i for i in range(5))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_file", "annotation file not found"),
        ("bad_json", "malformed JSON in .*val.json, line 1"),
        ("missing_field", r"dialog 0 \(image_id 'a'\), turn 2: missing field\(s\) answer"),
        ("no_dialog_list", r"val.json: dialog 1 \(image_id 'b'\): missing field\(s\) dialog$"),
        ("no_image_id", r"val.json: dialog 1: missing field\(s\) image_id$"),
        ("references_mid_dialog", r"dialog 0 \(image_id 'a'\), turn 3: 'answer' must be a string$"),
        ("empty_references", r"turn 9: 'answer' must be a string or a non-empty list of references \(strings\)$"),
        ("missing_feature", r"missing feature file for id 'a': .*i3d_rgb/a.npy"),
        ("wrong_width", r"feature file for id 'a' has shape \(7, 100\), expected \(T, 2048\)"),
        ("truncated_feature", r"feature file for id 'a' is truncated .*i3d_flow/a.npy"),
        ("empty", "empty split"),
    ],
)
def test_bad_data_names_the_file_or_video(tmp_path, breakage, message):
    write_avsd(tmp_path, [ten_turn_dialog("a")])
    path = tmp_path / "annotations" / "val.json"
    if breakage == "no_file":
        path.unlink()
    elif breakage == "bad_json":
        path.write_text('{"dialogs": [}')
    elif breakage == "missing_field":
        bad = ten_turn_dialog("a")
        del bad["dialog"][2]["answer"]
        path.write_text(json.dumps({"dialogs": [bad]}))
    elif breakage in ("no_dialog_list", "no_image_id"):
        bad = ten_turn_dialog("b")
        del bad["dialog" if breakage == "no_dialog_list" else "image_id"]
        path.write_text(json.dumps({"dialogs": [ten_turn_dialog("a"), bad]}))
    elif breakage in ("references_mid_dialog", "empty_references"):
        bad = ten_turn_dialog("a")
        bad["dialog"][3 if breakage == "references_mid_dialog" else 9]["answer"] = [] if "empty" in breakage else ["x"]
        path.write_text(json.dumps({"dialogs": [bad]}))
    elif breakage == "missing_feature":
        (tmp_path / "features" / "i3d_rgb" / "a.npy").unlink()
    elif breakage == "wrong_width":
        np.save(tmp_path / "features" / "i3d_rgb" / "a.npy", np.ones((7, 100), np.float32))
    elif breakage == "truncated_feature":
        feature = tmp_path / "features" / "i3d_flow" / "a.npy"
        feature.write_bytes(feature.read_bytes()[:-4])  # a copy cut short: the header promises one float more
    elif breakage == "empty":
        path.write_text(json.dumps({"dialogs": []}))
    with pytest.raises(InputError, match=message):
        samples = data.load_avsd(path, train=False, max_turns=3)
        store = data.FeatureStore(tmp_path / "features", data.AVSD_STREAMS, max_len=100)
        data.FeatureDataset(samples, store)


def test_embedded_avsd_is_deterministic_real_format_and_cached(tmp_path):
    embedded.make_embedded_avsd(tmp_path / "a")
    embedded.make_embedded_avsd(tmp_path / "b")
    for rel in ["annotations/train.json", "features/vggish/val0003.npy", "features/i3d_rgb/train0007.npy"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    train = data.load_avsd(tmp_path / "a" / "annotations" / "train.json", train=True, max_turns=3)
    assert len(train) == embedded.EMBEDDED_SPLITS["train"] * 10
    store = data.FeatureStore(tmp_path / "a" / "features", data.AVSD_STREAMS, max_len=200)
    assert store.load("train0000").shape[1] == 4224

    calls = []
    root = embedded.embedded_root(tmp_path / "cache", "x", lambda p: calls.append(p) or (p / "f").write_text("1"))
    again = embedded.embedded_root(tmp_path / "cache", "x", lambda p: calls.append(p))
    assert root == again and len(calls) == 1 and (root / "f").read_text() == "1"


def test_resumable_sampler_skips_exactly_the_seen_indices():
    sampler = data.ResumableSampler(range(20), num_replicas=2, rank=1, shuffle=True, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.skip = 4
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4


def test_pad_left_and_right():
    assert data.pad([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert data.pad([[1, 2], [3]], 0, left=True).tolist() == [[1, 2], [0, 3]]


def test_embedded_features_look_like_real_ones(tmp_path):
    """What the recipe is tested against (data.py): I3D streams are non-negative averages of post-ReLU activations
    with a large shared mean and a per-video offset, the attributes the questions ask about a small part of the
    variance; VGGish is quantised to 0..255 as released."""
    embedded.make_embedded_avsd(tmp_path)
    dialogs = json.loads((tmp_path / "annotations" / "train.json").read_text())["dialogs"]
    videos = [np.load(tmp_path / "features" / "i3d_rgb" / f"{d['image_id']}.npy") for d in dialogs]
    frames = np.concatenate(videos)
    assert frames.min() >= 0 and 0.3 < frames.mean() < 0.5 and 0.05 < (frames < 0.01).mean() < 0.2
    mean = frames.mean(0)
    variance = ((frames - mean) ** 2).sum(1).mean()
    assert (mean**2).sum() > 1.5 * variance  # two random frames point the same way (cosine ~0.7)

    def share(groups: list) -> float:
        """Part of the variance that is between the groups' means (per frame)."""
        by_group = {g: np.concatenate([v for v, h in zip(videos, groups, strict=True) if h == g]) for g in set(groups)}
        return sum(len(f) * ((f.mean(0) - mean) ** 2).sum() for f in by_group.values()) / len(frames) / variance

    assert 0.6 < share(list(range(len(videos)))) < 0.9  # a per-video offset, shared by its frames
    colors = [
        next(c for c in embedded._ATTRIBUTES["color"][1] for t in d["dialog"] if f"is {c}." in t["answer"])
        for d in dialogs
    ]
    assert 0.01 < share(colors) < 0.1  # what a question asks about: a small part of the variance
    vggish = np.concatenate([np.load(p) for p in (tmp_path / "features" / "vggish").glob("train*.npy")])
    assert vggish.min() >= 0 and vggish.max() <= 255 and (vggish == np.round(vggish)).all()
    assert 110 < vggish.mean() < 145


def test_feature_stats_are_the_training_split_mean_and_std(tmp_path):
    """Every frame of every id (up to max_ids, evenly spaced over the sorted ids); constant dimensions get a floor."""
    features = {f"v{i}": np.random.default_rng(i).random((3 + i, 6)).astype(np.float32) for i in range(5)}
    (tmp_path / "s").mkdir()
    for name, frames in features.items():
        frames[:, 5] = 2.0  # a dead unit
        np.save(tmp_path / "s" / f"{name}.npy", frames)
    store = data.FeatureStore(tmp_path, {"s": 6}, max_len=100)
    dataset = data.FeatureDataset([{"id": n, "image_id": n} for n in features], store)
    mean, std = dataset.feature_stats()
    every = np.concatenate(list(features.values()))
    np.testing.assert_allclose(mean.numpy(), every.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[:5].numpy(), every.std(0)[:5], rtol=1e-4)
    assert std[5] == pytest.approx(0.01 * every.std(0)[:5].sum() / 6, rel=1e-4)
    broken = features["v4"].copy()
    broken[1, :3] = [np.nan, np.inf, -np.inf]
    np.save(tmp_path / "s" / "v4.npy", broken)
    with_broken, _ = dataset.feature_stats()
    assert torch.isfinite(with_broken).all() and with_broken[3] == mean[3]
    subset, _ = dataset.feature_stats(max_ids=2)  # ids v0, v3
    np.testing.assert_allclose(subset.numpy(), np.concatenate([features["v0"], features["v3"]]).mean(0), rtol=1e-5)
