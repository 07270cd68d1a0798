"""Many runs' curves aggregated per step, with the same classifier on real images (or renders) as reference."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import bundle
from ..models import Model
from ..sampler import DEFAULT_STEPS, config_for, sample
from ..seeds import CLASSIFY_SEED0, REFERENCE_SEED0
from .classifiers import IMAGE_SUFFIXES, Classifier, ReferenceImage, as_uint8_images
from .curves import RunCurves, _rounded, classify_run

# --------------------------------------------------------------------------------------------
# Batch evaluation
# --------------------------------------------------------------------------------------------


def toy_prompts_and_seeds(n: int, seed0: int = CLASSIFY_SEED0) -> list[tuple[str, int]]:
    """``n`` toy runs: each seed's scene caption as the prompt, the same seed for the noise."""
    return [(bundle.toy_prompt(seed), seed) for seed in range(seed0, seed0 + n)]


def toy_reference(n: int, size: int = 64, seed0: int = REFERENCE_SEED0) -> list[tuple[np.ndarray, str]]:
    """``n`` fresh renders (uint8 [size, size, 3], as the toy model was trained on) with their captions."""
    batch = bundle.toy_renders(range(seed0, seed0 + n), size=size)
    images = (batch["image"] * 255).round().astype(np.uint8)
    return list(zip(images, batch["prompt"]))


def photo_reference(folder: str | Path) -> list[tuple[Path, str]]:
    """Photos under ``folder`` with the prompt naming each (images are opened only when classified).

    A photo in a subfolder takes the subfolder's name as its prompt (``photos/lemon/1.jpg`` ->
    "lemon", ImageFolder style); one directly in ``folder`` takes its file name without a trailing
    number, underscores read as spaces (``granny_smith_02.jpg`` -> "granny smith").
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"photo folder {folder} does not exist")
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        if path.parent != folder:
            prompt = path.parent.name
        else:
            prompt = re.sub(r"[\s_-]*\d+$", "", path.stem)
        out.append((path, prompt.replace("_", " ").strip()))
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return out


def reference_accuracy(
    classifier: Classifier, reference_images: Sequence[tuple[ReferenceImage, str]], batch_size: int = 64
) -> dict[str, Any]:
    """The classifier's top-1 accuracy and mean prompted-class confidence on real (image, prompt) pairs.

    Pairs whose prompt names no class are counted in ``skipped`` and left out.
    """
    labelled = [(img, classifier.class_for_prompt(p)) for img, p in reference_images]
    kept = [(img, c) for img, c in labelled if c is not None]
    correct, confidence = [], []
    for i in range(0, len(kept), batch_size):
        chunk = kept[i : i + batch_size]
        probs = classifier.probabilities(as_uint8_images([img for img, _ in chunk]))
        labels = np.array([c for _, c in chunk])
        correct.extend(probs.argmax(axis=1) == labels)
        confidence.extend(probs[np.arange(len(chunk)), labels])
    return {
        "n": len(kept),
        "skipped": len(labelled) - len(kept),
        "top1_accuracy": float(np.mean(correct)) if correct else None,
        "mean_confidence": float(np.mean(confidence)) if confidence else None,
    }


def evaluate(
    model: Model,
    classifier: Classifier,
    prompts_and_seeds: Sequence[tuple[str, int]],
    steps: int = DEFAULT_STEPS,
    reference_images: Sequence[tuple[ReferenceImage, str]] | None = None,
    guidance: float | None = None,
    top_k: int = 5,
    reference_source: str = "real images",
    progress: bool = False,
    on_run: Callable[[int, RunCurves], None] | None = None,
) -> dict[str, Any]:
    """Generate each (prompt, seed), classify every step's x0 preview, and aggregate per step.

    Returns a JSON-ready dict: ``per_step`` (step, mean prompted-class confidence, top-1 and
    top-k accuracy), ``first_correct`` (a histogram over steps plus ``never``, and its median),
    ``reference`` (the classifier on ``reference_images``, (image, prompt) pairs: renders for the
    toy world, photos for SD; None when not given), one summary per run in ``runs``, and the
    prompts naming no class in ``skipped`` (not generated). ``on_run(i, curves)`` sees each run's
    full curves (e.g. to draw examples). ``guidance`` defaults to the model's own.
    """
    from tqdm import tqdm

    # The model's own guidance setting wherever the caller gives none; every run shares it.
    setting = config_for(model, "a", 0, steps, guidance)

    runs, skipped, conf, ranks, firsts = [], [], [], [], []
    for i, (prompt, seed) in enumerate(tqdm(prompts_and_seeds, desc="classify", disable=not progress)):
        if classifier.class_for_prompt(prompt) is None:
            skipped.append({"prompt": prompt, "seed": int(seed), "reason": "names no class of the classifier"})
            continue
        config = replace(setting, prompt=prompt, seed=int(seed))
        previews = [s.preview for s in sample(model, config, previews=True, decode_final=False)]
        curves = classify_run(classifier, previews, prompt, top_k=top_k)
        if on_run is not None:
            on_run(i, curves)
        conf.append(curves.prompted_confidence)
        ranks.append(curves.prompted_rank)
        firsts.append(curves.first_correct_step)
        runs.append({"seed": int(seed), **curves.to_dict()})
    if not runs:
        raise ValueError("no prompt names a class of the classifier: nothing to evaluate")
    n_steps = len(conf[0])
    conf_m, rank_m = np.stack(conf), np.stack(ranks)
    histogram = [sum(f == s for f in firsts) for s in range(n_steps)]
    found = [f for f in firsts if f is not None]
    reference = None
    if reference_images is not None:
        reference = {"source": reference_source, **reference_accuracy(classifier, reference_images)}
    return {
        "format": 1,
        "model": model.model_id,
        "classifier": classifier.name,
        "num_classes": len(classifier.classes),
        "steps": n_steps,
        "guidance": float(setting.guidance),
        "late_guidance": setting.late_guidance, "late_from": setting.late_from,
        "top_k": int(top_k),
        "n": len(runs),
        "per_step": {
            "step": list(range(n_steps)),
            "mean_confidence": _rounded(conf_m.mean(axis=0)),
            "top1_accuracy": _rounded((rank_m == 1).mean(axis=0)),
            "topk_accuracy": _rounded((rank_m <= top_k).mean(axis=0)),
        },
        "first_correct": {
            "histogram": histogram,
            "never": len(firsts) - len(found),
            "median": float(np.median(found)) if found else None,
        },
        "reference": reference,
        "runs": runs,
        "skipped": skipped,
    }
