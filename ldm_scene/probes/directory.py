"""A model's probe folder: where each bank lives and :func:`load_probe_dir`, which loads what fits."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..sites import SiteInfo
from .bank import ProbeBank
from .meta import TASKS, ProbeError, task_outputs

def probe_path(directory: str | os.PathLike, task: str) -> Path:
    """Where a task's bank lives in a model's probe directory: ``<directory>/<task>.safetensors``."""
    task_outputs(task)
    return Path(directory) / f"{task}.safetensors"


#: A bank a probe directory may hold beside the task banks: per (site, step) background and
#: foreground mean activations (:func:`class_means_bank`), which steering edits along.
CLASS_MEANS = "foreground_means"
_MEANS_FILES = {CLASS_MEANS: "foreground"}


def load_probe_dir(
    directory: str | os.PathLike,
    expect_sites: Sequence[SiteInfo] | None = None,
    expect_image_size: int | Sequence[int] | None = None,
    expect_num_steps: int | None = None,
    tasks: Sequence[str] = TASKS,
    expect_model_id: str | None = None,
    errors: list[str] | None = None,
    expect_scheduler: str | None = None,
) -> dict[str, ProbeBank]:
    """Load ``<name>.safetensors`` for each of ``tasks`` (task names or :data:`CLASS_MEANS`) that
    exists in ``directory``, a model's probe folder (``weights/<model>/probes``).

    Names without a file are left out. A missing directory raises :class:`ProbeError`. So does a
    file that does not fit (sites, image size, steps, ``expect_model_id``, ``expect_scheduler``
    (a probe reads the activations of one sampler's trajectory), or metadata naming another task),
    unless ``errors`` is given: then that file is left out, its message (which
    names the file) is appended to ``errors``, and the other files are still loaded.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ProbeError(f"{directory}: probe directory does not exist")
    banks = {}
    for task in tasks:
        path = directory / f"{task}.safetensors" if task in _MEANS_FILES else probe_path(directory, task)
        if not path.is_file():
            continue
        try:
            bank = ProbeBank.load(path, expect_sites, expect_image_size, expect_num_steps,
                                  expect_model_id=expect_model_id, expect_scheduler=expect_scheduler)
            if bank.meta.task != _MEANS_FILES.get(task, task):
                expected = f"{path.name} must hold task {_MEANS_FILES[task]!r}" if task in _MEANS_FILES else \
                    f"the file name says {task!r}"
                raise ProbeError(f"{path}: metadata says task {bank.meta.task!r}, {expected}")
        except (ProbeError, OSError) as err:
            if errors is None:
                raise
            errors.append(str(err))
            continue
        banks[task] = bank
    return banks
