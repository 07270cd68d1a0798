"""One run's per-step classifier confidence curves (:class:`RunCurves`) and the first correct step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .classifiers import Classifier, ImageLike

# --------------------------------------------------------------------------------------------
# Per-run curves
# --------------------------------------------------------------------------------------------


def first_correct_step(correct: Sequence[bool], steps: Sequence[int] | None = None) -> int | None:
    """The first step from which ``correct`` stays True to the end; None if the last is not correct.

    ``correct[i]`` says whether the prompted class was top-1 at the i-th step seen; ``steps`` maps
    positions to step indices (default: the position itself). ``[F, F, F, T, T]`` -> 3;
    ``[F, F, T, F, F, T, T]`` -> 5 (being right at step 2 does not count: it did not stay right).
    """
    flags = [bool(c) for c in correct]
    if steps is not None and len(steps) != len(flags):
        raise ValueError(f"got {len(flags)} flags but {len(steps)} steps")
    if not flags or not flags[-1]:
        return None
    i = len(flags)
    while i > 0 and flags[i - 1]:
        i -= 1
    return int(steps[i]) if steps is not None else i


@dataclass(frozen=True)
class RunCurves:
    """One run's classification at each step seen.

    ``probabilities`` is [S, C] over ``classes`` for ``steps`` (0-based, increasing); ``top_k`` per
    step lists (class name, confidence) best first. ``prompted_class`` is the class the prompt
    names (None when it names none; then the prompted fields are None). ``prompted_rank`` is
    1-based (1 = top-1; ties go to the lower class index, as ``argmax`` does), and
    ``first_correct_step`` the step from which the prompted class stays top-1 (see
    :func:`first_correct_step`) among the steps seen.
    """

    prompt: str
    classes: tuple[str, ...]
    prompted_class: int | None
    steps: tuple[int, ...]
    probabilities: np.ndarray
    top_k: tuple[tuple[tuple[str, float], ...], ...]
    prompted_confidence: np.ndarray | None
    prompted_rank: np.ndarray | None
    first_correct_step: int | None

    @classmethod
    def from_probabilities(
        cls,
        prompt: str,
        classes: Sequence[str],
        prompted_class: int | None,
        steps: Sequence[int],
        probabilities: np.ndarray,
        top_k: int = 5,
    ) -> "RunCurves":
        """Derive every per-step field from the [S, C] probability matrix."""
        probs = np.asarray(probabilities, dtype=np.float32).reshape(len(steps), len(classes))
        steps = tuple(int(s) for s in steps)
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must increase, got {steps}")
        order = np.argsort(-probs, axis=1, kind="stable")  # ties: lower index first, like argmax
        k = max(1, min(int(top_k), len(classes)))
        tops = tuple(tuple((classes[j], float(row[j])) for j in idx[:k]) for row, idx in zip(probs, order))
        if prompted_class is None:
            conf = rank = None
            first = None
        else:
            conf = probs[:, prompted_class].copy()
            rank = np.argmax(order == prompted_class, axis=1).astype(np.int64) + 1
            first = first_correct_step(rank == 1, steps)
        return cls(prompt, tuple(classes), prompted_class, steps, probs, tops, conf, rank, first)

    @property
    def top1(self) -> np.ndarray:
        """The top-1 class index at each step, [S]."""
        return self.probabilities.argmax(axis=1) if len(self.steps) else np.zeros(0, np.int64)

    @property
    def correct(self) -> np.ndarray | None:
        """Whether the prompted class is top-1 at each step, [S] bool (None with no prompted class)."""
        return None if self.prompted_rank is None else self.prompted_rank == 1

    def to_dict(self, with_probabilities: bool = False) -> dict[str, Any]:
        """JSON-ready summary (the full matrix only if asked: 1000 ImageNet classes per step add up)."""
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "prompted_class": None if self.prompted_class is None else self.classes[self.prompted_class],
            "steps": list(self.steps),
            "first_correct_step": self.first_correct_step,
            "top1": [self.classes[i] for i in self.top1],
            "top_k": [[[name, round(p, 5)] for name, p in step] for step in self.top_k],
            "prompted_confidence": None if self.prompted_confidence is None else _rounded(self.prompted_confidence),
            "prompted_rank": None if self.prompted_rank is None else [int(r) for r in self.prompted_rank],
        }
        if with_probabilities:
            out["classes"] = list(self.classes)
            out["probabilities"] = [_rounded(row) for row in self.probabilities]
        return out


def _rounded(values: Iterable[float], digits: int = 5) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), digits) for v in values]


def classify_run(
    classifier: Classifier,
    previews: Sequence[ImageLike] | np.ndarray,
    prompt: str,
    top_k: int = 5,
    steps: Sequence[int] | None = None,
) -> RunCurves:
    """Classify one run's previews (one image per step, in step order) in one batch.

    ``steps`` are the previews' step indices (default 0, 1, ...).
    """
    steps = list(range(len(previews))) if steps is None else list(steps)
    if len(steps) != len(previews):
        raise ValueError(f"got {len(previews)} previews but {len(steps)} step indices")
    probs = classifier.probabilities(previews)
    return RunCurves.from_probabilities(
        prompt, classifier.classes, classifier.class_for_prompt(prompt), steps, probs, top_k
    )


class CurveTracker:
    """Builds a run's curves one step at a time, for drawing them live while the sampler streams.

    ``update(step, preview)`` classifies one preview and returns the curves so far; a
    ``first_correct_step`` then holds for the steps seen so far and may move later (or vanish)
    as more arrive. Steps must increase; :meth:`reset` starts a new run.
    """

    def __init__(self, classifier: Classifier, prompt: str, top_k: int = 5):
        self.classifier = classifier
        self.prompt = prompt
        self.top_k = top_k
        self.prompted_class = classifier.class_for_prompt(prompt)
        self._steps: list[int] = []
        self._rows: list[np.ndarray] = []

    def reset(self) -> None:
        self._steps.clear()
        self._rows.clear()

    def update(self, step: int, preview: ImageLike) -> RunCurves:
        """Add step ``step``'s preview (PIL or uint8 [H, W, 3]) and return the curves so far."""
        if self._steps and int(step) <= self._steps[-1]:
            raise ValueError(f"steps must increase: got step {step} after step {self._steps[-1]}")
        self._rows.append(self.classifier.probabilities([preview])[0])
        self._steps.append(int(step))
        return self.curves

    @property
    def curves(self) -> RunCurves:
        """The curves over the steps seen so far (empty before the first update)."""
        probs = np.stack(self._rows) if self._rows else np.zeros((0, len(self.classifier.classes)), np.float32)
        return RunCurves.from_probabilities(
            self.prompt, self.classifier.classes, self.prompted_class, self._steps, probs, self.top_k
        )
