"""``ldm-scene classify``: the options and the run of the classifier-curves command (parsed in :mod:`ldm_scene.cli`)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import bundle
from ..sampler import DEFAULT_STEPS
from ..seeds import CLASSIFY_SEED0
from .classifiers import ClassifierLoadError, ToyShapeClassifier, classifier_for, model_directory
from .curves import RunCurves
from .evaluate import evaluate, photo_reference, toy_prompts_and_seeds, toy_reference
from .report import write_report

if TYPE_CHECKING:
    import argparse

#: The command's description (``--help``).
DESCRIPTION = "Classifiers over each step's decoded x0 preview, and the per-step confidence curves they give."

def read_prompts(path: str | Path) -> list[tuple[str, int | None]]:
    """A prompt file: one prompt a line, optionally ``<TAB>seed``; blank lines and ``#`` comments skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, _, seed = line.partition("\t")
        out.append((prompt.strip(), int(seed) if seed.strip() else None))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with parsed options that argparse cannot check, or None."""
    return "--n must be at least 1" if args.n < 1 else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``classify`` command's options."""
    parser.add_argument("--model", default="toy", help="Hub id, local model directory, 'toy' or 'tiny'")
    parser.add_argument("--n", type=int, default=100, help="number of runs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", help="prompt file (one a line, optional TAB seed); cycled to --n runs. "
                        "Default: the toy scenes' captions for a toy model, else N ImageNet class names")
    parser.add_argument("--photos", help="folder of real photos (subfolder or file name = prompt) for the reference")
    parser.add_argument("--reference-n", type=int, default=500, help="fresh renders for the toy reference")
    parser.add_argument("--seed0", type=int, default=CLASSIFY_SEED0, help="seed of the first run")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's own (7.5 unless its ldm_scene.json says)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--examples", type=int, default=4, help="runs drawn as per-run curve figures")
    parser.add_argument("--metrics", help="probes metrics.json (default: the model's probes/metrics.json)")
    parser.add_argument("--vgg-weights", default="IMAGENET1K_V1", help="'none' for random weights")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default). "
                        "The toy model's many small ops run fastest on one, far slower when cores are shared")


def run(args: argparse.Namespace) -> int:
    """Generate ``--n`` runs, classify every step's preview, and write the report to ``--out``."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from ..models import ModelLoadError, load_model

    try:
        model = load_model(args.model, device=args.device)
        weights = None if args.vgg_weights.lower() == "none" else args.vgg_weights
        classifier = classifier_for(model, device=args.device, vgg_weights=weights)
    except (ModelLoadError, ClassifierLoadError) as err:
        print(f"error: {err}")
        return 2
    is_toy = isinstance(classifier, ToyShapeClassifier)
    if args.prompts:
        listed = read_prompts(args.prompts)
        pairs = []
        for i in range(args.n):
            prompt, seed = listed[i % len(listed)]
            # A listed seed is used on the first pass only: cycled prompts get fresh seeds.
            pairs.append((prompt, seed if seed is not None and i < len(listed) else args.seed0 + i))
    elif is_toy:
        pairs = toy_prompts_and_seeds(args.n, args.seed0)
    else:
        picks = np.random.default_rng(0).choice(len(classifier.classes), size=min(args.n, len(classifier.classes)), replace=False)
        names = [classifier.classes[j] for j in picks]
        pairs = [(names[i % len(names)], args.seed0 + i) for i in range(args.n)]
    if args.photos:
        reference, source = photo_reference(args.photos), f"photos ({Path(args.photos).name})"
    elif is_toy:
        reference, source = toy_reference(args.reference_n, size=model.image_size[0]), "fresh renders"
    else:
        reference, source = None, ""
        print("no --photos given: the report has no real-image reference line")

    examples: list[tuple[int, RunCurves]] = []

    def keep(i: int, curves: RunCurves) -> None:
        if len(examples) < args.examples:
            examples.append((i, curves))

    data = evaluate(model, classifier, pairs, steps=args.steps, reference_images=reference, guidance=args.guidance,
                    top_k=args.top_k, reference_source=source, progress=True, on_run=keep)
    metrics = args.metrics
    if metrics is None and model_directory(model) is not None:
        metrics = bundle.metrics_path(bundle.probes_dir(model_directory(model)))
    written = write_report(data, args.out, examples, metrics)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
