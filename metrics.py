"""Metrics: how a task's results become numbers, with the official scorers (COCO captions, VQA accuracy as LAVIS
vendors it, LAVIS's retrieval recalls). Pure functions of predictions and references: no model, no distributed code.
"""

import collections
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------------------
# Caption metrics (captioning, dialogue): the COCO caption scorer


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Bleu_1..4, METEOR, ROUGE_L, CIDEr with pycocoevalcap. The PTB tokenizer and METEOR need Java; without it
    the text is tokenized in Python and METEOR is skipped (said on stderr), so numbers stay comparable otherwise."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    scorers = [(functools.partial(Bleu(4).compute_score, verbose=0), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    if shutil.which("java"):
        res = ptb_tokenize({i: [predictions[i]] for i in ids})
        gts = ptb_tokenize({i: references[i] for i in ids})
        scorers.append((meteor_scorer().compute_score, ["METEOR"]))
    else:
        print("warning: java not found: Python tokenizer instead of PTB, METEOR skipped", file=sys.stderr)
        res = {i: [simple_tokenize(predictions[i])] for i in ids}
        gts = {i: [simple_tokenize(r) for r in references[i]] for i in ids}
    scorers += [(Rouge().compute_score, ["ROUGE_L"]), (Cider().compute_score, ["CIDEr"])]
    metrics = {}
    for compute_score, names in scorers:
        score, _ = compute_score(gts, res)
        metrics.update(zip(names, score if isinstance(score, list) else [score], strict=True))
    return {k: float(v) for k, v in metrics.items()}


def ptb_tokenize(texts: dict[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer.tokenize (its jar, flags and punctuation filter, the same output), with the Java
    process's stderr captured: its "PTBTokenizer tokenized N tokens at ..." line stays off the console, and a
    failure raises with what Java said instead of scoring empty text."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    keys = [k for k, v in texts.items() for _ in v]
    lines = "\n".join(t.replace("\n", " ") for v in texts.values() for t in v)
    jar, main = ptb.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer"
    command = ["java", "-cp", jar, main, "-preserveLines", "-lowerCase"]
    done = subprocess.run(command, cwd=Path(ptb.__file__).parent, input=lines.encode(), capture_output=True)
    tokenized = done.stdout.decode().split("\n")
    if done.returncode or len(tokenized) < len(keys):
        raise RuntimeError(f"PTB tokenizer failed (exit {done.returncode}): {done.stderr.decode().strip()[-2000:]}")
    out = {k: [] for k in texts}
    for k, line in zip(keys, tokenized, strict=False):  # the output may end in an empty line
        out[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return out


@functools.cache
def meteor_scorer():
    """One METEOR Java process for the whole run: starting it loads its paraphrase tables (seconds, every eval)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def simple_tokenize(text: str) -> str:
    """Fallback for the PTB tokenizer: lower case, punctuation removed (what PTB + COCO's filter amount to)."""
    kept = "".join(c if c.isalnum() or c.isspace() or c == "'" else " " for c in text.lower())
    return " ".join(kept.split())


# ----------------------------------------------------------------------------------------------------------------
# VQA


# The official VQA accuracy: the VQA team's vqaEval.py as LAVIS vendors it (lavis/common/vqa_tools/vqa_eval.py). Its
# behaviour, quirks included, is matched exactly (tests/test_vqa_official.py compares with a literal transcription):
# - The prediction gets the punctuation processing, then lower case, number words → digits, articles dropped,
#   contractions. The human answers get the punctuation processing only, and only when the ten are not all
#   identical: "Two", "Yes" or "a dog" among them never match any prediction; ten identical "yes." match nothing.
# - Punctuation marks are deleted when the text has that mark next to a space anywhere, or a digit,digit anywhere
#   ("1,000" → "1000", but also "red-blue 1,000" → "redblue 1000"); otherwise they become spaces.
# - Its period regex `(?!<=\d)(\.)(?!\d)` was meant as "not after a digit" but is a lookahead: it removes every
#   period not followed by a digit. It is passed re.UNICODE where `sub` takes `count`: at most 32 periods go.
# - Contractions are looked up after lower-casing, so the table's capitalised keys (Im → I'm, Ive, Id've) never
#   apply, and its "somebody'd" maps to "somebodyd", the other way round from the rest of the table.
# - A prediction's accuracy is the mean over the leave-one-answer-out subsets (by position: the official code
#   compares answer dicts, which differ by answer_id) of min(1, matching answers / 3); the overall and per answer
#   type accuracies are means over questions. The official rounding to 2 decimals is presentation only: not done.
# The VQA team's own repository changed in March 2021 ("Fixed processing answers bug"): there both sides get the full
# processing when the ten answers differ, and neither side any when they are identical. LAVIS keeps the version above.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_PERIOD = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_NUMBER_WORDS = {"none": "0", **{word: str(n) for n, word in enumerate(_DIGITS)}}
# The official contraction table maps each of these, spelled with exactly one apostrophe left out, to itself.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()  # noqa: SIM905 (a word list reads better as text)
_CONTRACTIONS = {word[:i] + word[i + 1 :]: word for word in _CONTRACTED for i, c in enumerate(word) if c == "'"}
_CONTRACTIONS["somebody'd"] = "somebodyd"


def process_punctuation(text: str) -> str:
    """The official punctuation processing (what the human answers get), quirks included (see above)."""
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=32)


def normalize_answer(answer: str) -> str:
    """The official processing of a prediction: tabs and newlines to spaces, stripped, the punctuation processing,
    then lower case, number words → digits, articles dropped, contractions given their apostrophe."""
    text = process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def answer_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers (processed as described above)."""
    prediction = normalize_answer(prediction)
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    matches = [a == prediction for a in answers]
    return sum(min(1.0, (sum(matches) - m) / 3) for m in matches) / len(matches)


def vqa_accuracy(results: list[dict]) -> dict[str, float]:
    """Overall and per answer type ("yes/no" → accuracy_yes_no, ...) accuracy in percent."""
    by_type = collections.defaultdict(list)
    for r in results:
        accuracy = answer_accuracy(r["prediction"], r["answers"])
        by_type["accuracy"].append(accuracy)
        if r.get("answer_type"):
            by_type["accuracy_" + re.sub(r"\W+", "_", r["answer_type"])].append(accuracy)
    return {name: 100 * sum(values) / len(values) for name, values in by_type.items()}


def consensus_answer(answers: list[str]) -> str:
    """The training target: the most common of the answers processed as predictions are (the first one given, on a
    tie). Not a metric: it is the canonical form the model should say, whatever spelling the humans used."""
    return collections.Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]


# ----------------------------------------------------------------------------------------------------------------
# Retrieval and classification


def retrieval_ranks(queries, query_groups, gallery, gallery_groups, k: int, chunk: int):
    """For each query (normalised embeddings), the rank (0 = first) of its best-scoring positive in the gallery
    (positive: same group, i.e. same image) and the indices of its top-k gallery items, `chunk` queries at a time.
    Rank = how many gallery items score strictly higher than the best positive."""
    ranks, tops = [], []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk].float() @ gallery.float().T
        positive = query_groups[start : start + chunk, None] == gallery_groups[None, :]
        best = scores.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
        ranks.append((scores > best).sum(1))
        tops.append(scores.topk(min(k, gallery.shape[0]), dim=1).indices)
    return torch.cat(ranks), torch.cat(tops)


def recall_metrics(text_ranks: list[int], image_ranks: list[int]) -> dict[str, float]:
    """LAVIS's retrieval report: txt_r@k (image→text: an image query's best caption in the top k), img_r@k
    (text→image), in percent, their means and r_mean. agg_metrics (the best checkpoint's pick) is r_mean, both
    directions; LAVIS's code uses txt_r_mean alone, which ignores text→image retrieval."""
    metrics = {}
    for name, ranks in (("txt", torch.tensor(text_ranks)), ("img", torch.tensor(image_ranks))):
        for k in (1, 5, 10):
            metrics[f"{name}_r{k}"] = 100 * (ranks < k).float().mean().item()
        metrics[f"{name}_r_mean"] = sum(metrics[f"{name}_r{k}"] for k in (1, 5, 10)) / 3
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["agg_metrics"] = metrics["r_mean"]
    return metrics


def accuracy_metrics(predictions: list, labels: list, classes) -> dict[str, float]:
    """accuracy (= agg_metrics) and acc_{class} (accuracy among the samples of that class), in percent."""
    hits = [p == y for p, y in zip(predictions, labels, strict=True)]
    metrics = {"accuracy": 100 * sum(hits) / len(hits)}
    for c in classes:
        of_class = [h for h, y in zip(hits, labels, strict=True) if y == c]
        if of_class:
            metrics[f"acc_{c}"] = 100 * sum(of_class) / len(of_class)
    metrics["agg_metrics"] = metrics["accuracy"]
    return metrics
