"""Load what the service needs beside the model, each on its own: probes, metrics, labeler, classifier.

Nothing here raises for a bad file: a refusal becomes a message the page shows, and the app runs
with what did load.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..models import Model
from ..probes import CLASS_MEANS, TASKS, ProbeBank, load_probe_dir

log = logging.getLogger(__name__)


def load_probes(model: Model, folder: Path) -> tuple[dict[str, ProbeBank], dict[str, ProbeBank], list[str]]:
    """Each probe file on its own: one that does not fit is refused (with the loader's message,
    which names the file) and the others are still used."""
    errors: list[str] = []
    try:
        loaded = load_probe_dir(folder, expect_sites=model.sites(), expect_image_size=model.image_size,
                                tasks=(*TASKS, CLASS_MEANS), expect_model_id=model.model_id, errors=errors,
                                expect_scheduler=model.scheduler_name)
    except Exception as err:  # noqa: BLE001 - Service.load never raises; the folder is untrusted input
        # load_probe_dir turns every refusal it knows into a message; this is the last line for
        # what it does not know, so that a bad file costs the readouts, not the app.
        log.exception("loading probes from %s failed", folder)
        return {}, {}, [f"The probe folder `{folder}` could not be read ({type(err).__name__}: {err}); "
                        "generation works without readouts."]
    refused = [f"A probe file does not fit this model and is not used: {err}" for err in errors]
    banks = {t: b for t, b in loaded.items() if t in TASKS}
    means = {t: loaded[t] for t in ("foreground", CLASS_MEANS) if t in loaded}
    return banks, means, refused


def load_metrics(folder: Path) -> tuple[dict[str, Any], str | None]:
    path = folder / "metrics.json"
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"`{path}` could not be read ({err}); default sites are used"
    except RecursionError:
        return {}, f"`{path}` is nested too deeply to read; default sites are used"
    if not isinstance(data, dict):
        return {}, f"`{path}` is not a JSON object; default sites are used"
    return data, None


def load_labeler(model: Model, notes: list[str]) -> Any:
    folder = model.extra_dir("labelers")
    if folder is None or not (folder / "labeler.safetensors").is_file():
        return None
    try:
        from ..toy.nets import ToyLabeler

        return ToyLabeler.load(folder)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        notes.append(f"The labeler in `{folder}` could not be loaded ({err}); masks come from the probes")
        return None


def load_classifier(model: Model, device: Any, notes: list[str]) -> Any:
    from ..classify import classifier_for

    try:
        return classifier_for(model, device=device)
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # ClassifierLoadError is a RuntimeError
        notes.append(f"No classifier for this model, so the Classifier tab shows only the probes: {err}")
        return None
