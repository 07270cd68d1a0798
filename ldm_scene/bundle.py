"""What a model directory ships beside its diffusers folders, and the loaders for each part.

A model directory (``weights/toy-scenes``, or any local ``from_pretrained`` folder) may hold, next
to ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``:

| path | what | written by |
|---|---|---|
| ``probes/<task>.safetensors``, ``probes/metrics.json`` | probe banks and their evaluation | ``ldm-scene probes run`` |
| ``labelers/labeler.safetensors`` (+ ``.json``) | the toy world's labeler network (mask, depth, shading) | ``ldm-scene toy train`` |
| ``labelers/classifier.safetensors`` (+ ``.json``) | the toy world's shape classifier (VGG-16's role) | ``ldm-scene toy train`` |
| ``probes/foreground_group.safetensors``, ``probes/groups.{json,md,png}`` | the foreground probe over the up-block sites read together (the app's default foreground readout) and the page that scores it | ``ldm-scene probes groups`` |
| ``ldm_scene.json`` | settings: the model's own guidance schedule | ``ldm-scene toy guidance-sweep --apply`` |

This module spells those names (the probe files inside ``probes/`` are named by :mod:`ldm_scene.probes`,
the groups page by :mod:`ldm_scene.training.site_groups`), and is the only way the core (training,
classify, intervention, the app) reaches the toy world's networks and renderer (:mod:`ldm_scene.toy`):
everything else asks here. Loaders import the toy package only when called.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "PROBES_DIR",
    "LABELERS_DIR",
    "SETTINGS_FILE",
    "METRICS_FILE",
    "LABELER_FILE",
    "CLASSIFIER_FILE",
    "model_directory",
    "probes_dir",
    "labelers_dir",
    "settings_path",
    "metrics_path",
    "has_labeler",
    "has_classifier",
    "load_labeler",
    "load_classifier",
    "toy_prompt",
    "toy_prompts",
    "toy_renders",
    "toy_prompt_words",
]

#: The probe folder of a model directory (one ``<task>.safetensors`` per task, ``metrics.json``).
PROBES_DIR = "probes"
#: The folder of the toy world's labeler and shape classifier.
LABELERS_DIR = "labelers"
#: ldm-scene's settings for a model: ``{"guidance": 7.5, "late_guidance": 2.5, "late_from": 0.8}``.
SETTINGS_FILE = "ldm_scene.json"
#: The probe evaluation a probe folder ships (the app's results tab, the classifier report).
METRICS_FILE = "metrics.json"
LABELER_FILE = "labeler.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"


def model_directory(model_or_name: Any) -> Path | None:
    """The local directory of a loaded model (its ``directory``) or of a model name or alias
    (``"toy"``, a path); None for Hub ids and models built in memory."""
    if isinstance(model_or_name, (str, os.PathLike)):
        from .models import ALIASES

        path = Path(ALIASES.get(str(model_or_name), str(model_or_name)))
        return path if path.is_dir() else None
    directory = getattr(model_or_name, "directory", None)
    if directory is None:
        # a Model wrapping a pipeline loaded by hand: its own name_or_path
        name = getattr(getattr(model_or_name, "pipe", None), "name_or_path", None)
        directory = name or None
    path = Path(directory) if directory else None
    return path if path is not None and path.is_dir() else None


def _part(directory: str | os.PathLike | None, name: str) -> Path | None:
    return None if directory is None else Path(directory) / name


def probes_dir(directory: str | os.PathLike | None) -> Path | None:
    """``<directory>/probes`` (whether or not it exists), or None without a directory."""
    return _part(directory, PROBES_DIR)


def labelers_dir(directory: str | os.PathLike | None) -> Path | None:
    """``<directory>/labelers`` (whether or not it exists), or None without a directory."""
    return _part(directory, LABELERS_DIR)


def settings_path(directory: str | os.PathLike | None) -> Path | None:
    """``<directory>/ldm_scene.json`` (whether or not it exists), or None without a directory."""
    return _part(directory, SETTINGS_FILE)


def metrics_path(probe_dir: str | os.PathLike | None) -> Path | None:
    """A probe folder's ``metrics.json`` (whether or not it exists)."""
    return _part(probe_dir, METRICS_FILE)


def has_labeler(labeler_dir: str | os.PathLike | None) -> bool:
    """Whether a labelers folder holds the toy labeler network."""
    return labeler_dir is not None and (Path(labeler_dir) / LABELER_FILE).is_file()


def has_classifier(labeler_dir: str | os.PathLike | None) -> bool:
    """Whether a labelers folder holds the toy shape classifier."""
    return labeler_dir is not None and (Path(labeler_dir) / CLASSIFIER_FILE).is_file()


def load_labeler(labeler_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """The toy labeler network (:class:`ldm_scene.toy.nets.ToyLabeler`) saved in ``labeler_dir``."""
    from .toy.nets import ToyLabeler

    return ToyLabeler.load(labeler_dir, **kwargs)


def load_classifier(labeler_dir: str | os.PathLike) -> Any:
    """The toy shape classifier network (:class:`ldm_scene.toy.nets.ToyClassifier`) saved in ``labeler_dir``."""
    from .toy.nets import ToyClassifier

    return ToyClassifier.load(labeler_dir)


def toy_prompt(seed: int) -> str:
    """The toy renderer's caption for the scene ``seed`` draws (``"a red cone"``)."""
    from .toy.render import scene_from_seed

    return scene_from_seed(int(seed)).prompt


def toy_prompts(seeds: Iterable[int]) -> list[str]:
    """:func:`toy_prompt` for each seed."""
    return [toy_prompt(s) for s in seeds]


def toy_renders(seeds: Sequence[int] | range, size: int) -> dict[str, "np.ndarray"]:
    """Toy scenes rendered for ``seeds`` at ``size`` px (:func:`ldm_scene.toy.render.render_batch`)."""
    from .toy.render import render_batch

    return render_batch(seeds, size=size)


def toy_prompt_words() -> dict[str, Any]:
    """The toy world's prompt vocabulary: ``{"prompt": PROMPT_WORDS, "place": PLACE_WORDS}``."""
    from .toy.render import PLACE_WORDS, PROMPT_WORDS

    return {"prompt": PROMPT_WORDS, "place": PLACE_WORDS}
