"""Classifiers over each step's decoded x0 preview, and the per-step confidence curves they give.

Chen et al. report that VGG-16 names the prompted object only late in denoising (after step 11 of
15), while linear probes read the scene's layout by step 3. This module is the classifier side of
that comparison. A :class:`Classifier` maps images to class probabilities and a prompt to the class
it asks for: :class:`VGGClassifier` (torchvision's VGG-16, ImageNet classes) for Stable Diffusion,
:class:`ToyShapeClassifier` (the shipped shape classifier) for the toy world; :func:`classifier_for`
picks one for a model. :func:`classify_run` and :class:`CurveTracker` turn one run's previews into
:class:`RunCurves`; :func:`evaluate` aggregates many runs, with the same classifier on real images
as the reference line; the figure functions draw curves with matplotlib (no pyplot state).

Modules: :mod:`.classifiers` (the classifiers and :func:`classifier_for`), :mod:`.curves` (one
run), :mod:`.evaluate` (many runs and the reference), :mod:`.report` (json, figures, README),
:mod:`.command` (the command's options and run). Command line: ``ldm-scene classify --model toy
--n 100 --out DIR`` (``python -m ldm_scene.classify`` is an alias).
"""
from __future__ import annotations

from ..seeds import CLASSIFY_SEED0, REFERENCE_SEED0
from .classifiers import (
    IMAGE_SUFFIXES,
    Classifier,
    ClassifierLoadError,
    ImageLike,
    ReferenceImage,
    ToyShapeClassifier,
    VGGClassifier,
    as_uint8_images,
    classifier_for,
    imagenet_categories,
    match_class,
    model_directory,
)
from .command import read_prompts
from .curves import CurveTracker, RunCurves, classify_run, first_correct_step
from .evaluate import evaluate, photo_reference, reference_accuracy, toy_prompts_and_seeds, toy_reference
from .report import plot_run_curves, plot_timelines, readme_from_json, write_report


def main(argv: list[str] | None = None) -> int:
    """``python -m ldm_scene.classify ARGS``: the same as ``ldm-scene classify ARGS``."""
    from ..cli import main as cli_main

    return cli_main(argv, command="classify", prog="python -m ldm_scene.classify")


__all__ = [
    "CLASSIFY_SEED0", "REFERENCE_SEED0", "IMAGE_SUFFIXES", "Classifier", "ClassifierLoadError", "ImageLike",
    "ReferenceImage", "ToyShapeClassifier", "VGGClassifier", "as_uint8_images", "classifier_for",
    "imagenet_categories", "match_class", "model_directory", "read_prompts", "CurveTracker", "RunCurves",
    "classify_run", "first_correct_step", "evaluate", "photo_reference", "reference_accuracy",
    "toy_prompts_and_seeds", "toy_reference", "plot_run_curves", "plot_timelines", "readme_from_json",
    "write_report", "main",
]
