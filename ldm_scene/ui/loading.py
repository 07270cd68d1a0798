"""Load what the service needs: the model, then each on its own its probes, metrics, labeler and classifier.

Nothing here raises for a bad file: a refusal becomes a message the page shows, and the app runs
with what did load.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from .. import bundle
from ..models import ALIASES, TOY_MODEL_DIR, Model, ModelLoadError, load_model
from ..probes import CLASS_MEANS, GROUP_FILE, TASKS, GroupProbe, ProbeBank, ProbeError, load_probe_dir

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


def load_group_probe(model: Model, folder: Path) -> tuple[GroupProbe | None, list[str]]:
    """The folder's foreground probe over a group of sites (:data:`~ldm_scene.probes.GROUP_FILE`), if
    it has one that fits the model; one that does not is refused with the loader's message."""
    path = folder / GROUP_FILE
    if not path.is_file():
        return None, []
    try:
        group = GroupProbe.load(path, expect_sites=model.sites(), expect_image_size=model.image_size,
                                expect_model_id=model.model_id, expect_scheduler=model.scheduler_name)
    except (ProbeError, OSError) as err:
        return None, [f"A probe file does not fit this model and is not used: {err}"]
    except Exception as err:  # noqa: BLE001 - as in load_probes: a bad file costs its readout, not the app
        log.exception("loading %s failed", path)
        return None, [f"`{path}` could not be read ({type(err).__name__}: {err}) and is not used."]
    return group, []


def load_metrics(folder: Path) -> tuple[dict[str, Any], str | None]:
    path = bundle.metrics_path(folder)
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
    folder = model.extra_dir(bundle.LABELERS_DIR)
    if not bundle.has_labeler(folder):
        return None
    try:
        return bundle.load_labeler(folder)
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


@dataclass
class Parts:
    """What :meth:`~.service.Service.load` assembles: ``model`` None when it could not be loaded
    (``problems`` says why); the rest as :class:`~.service.Service` takes them."""

    model: Model | None
    banks: dict[str, ProbeBank] = field(default_factory=dict)
    intervention_banks: dict[str, ProbeBank] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    probe_dir: Path | None = None
    labeler: Any = None
    classifier: Any = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    group_probe: GroupProbe | None = None


def load_parts(model_name: str, probe_dir: str | Path | None, device: Any, classifier: Any) -> Parts:
    """The model and its probe set, labeler and classifier (see :meth:`~.service.Service.load`);
    every failure becomes a message in ``problems`` or ``notes``, never an exception."""
    problems: list[str] = []
    notes: list[str] = []
    try:
        model = load_model(model_name, device=device)
        model.sites()  # a UNet without SD v1.4's layout has no probe sites: refuse it here
    except (ModelLoadError, OSError, ValueError, RecursionError) as err:
        shown = ALIASES.get(model_name, model_name)
        problems.append(f"The model `{shown}` could not be loaded: {err}")
        if model_name == "toy" or Path(shown) == TOY_MODEL_DIR:
            problems.append("The embedded toy model is built by `python -m ldm_scene.toy train` into "
                            "`weights/toy-scenes` (see the README).")
        return Parts(None, problems=problems)
    banks, means, metrics, folder, group = {}, {}, {}, None, None
    if probe_dir is not None:
        folder = Path(probe_dir)
    else:
        folder = model.extra_dir(bundle.PROBES_DIR)
    if folder is None:
        problems.append(
            f"No probe set for `{model.model_id}`: it ships no `{bundle.PROBES_DIR}/` folder. Generation works; "
            "probe readouts and the intervention need one (`--probes DIR`)."
        )
    elif not folder.is_dir():
        problems.append(f"The probe folder `{folder}` does not exist; generation works without readouts.")
        folder = None
    else:
        banks, means, refused = load_probes(model, folder)
        problems.extend(refused)
        group, refused_group = load_group_probe(model, folder)
        problems.extend(refused_group)
        if not banks and not refused:
            problems.append(f"`{folder}` holds no probe files (`foreground/depth/shading.safetensors`).")
        metrics, metric_problem = load_metrics(folder)
        if metric_problem:
            notes.append(metric_problem)
    labeler = load_labeler(model, notes)
    if classifier is True:
        classifier = load_classifier(model, device, notes)
    elif classifier is False:
        classifier = None
    return Parts(model, banks, means, metrics, folder, labeler, classifier, problems, notes, group)
