"""Probe names and metadata: tasks, tensor names in a bank file, and :class:`ProbeMeta`."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Mapping

from ..sites import SITE_KEYS, as_hw

TASKS: tuple[str, ...] = ("foreground", "depth", "shading")
FORMAT_VERSION = 1
#: Key under the safetensors ``__metadata__`` that holds the JSON of :class:`ProbeMeta`.
METADATA_KEY = "ldm_scene"
#: The paper's depth normalisation (``probe_src/probe_depth_datasets.py: scale_and_norm``):
#: targets were ``(midas_depth - DEPTH_MEAN) / DEPTH_STD``.
DEPTH_MEAN = 15.740597
DEPTH_STD = 9.281932

_TENSOR_NAME = re.compile(r"^(?P<site>.+)\.step(?P<step>\d+)\.(?P<kind>weight|bias)$")


class ProbeError(ValueError):
    """A probe file or probe call that does not fit: the message says what differs or is wrong."""


def task_outputs(task: str) -> int:
    """Number of probe outputs K for ``task``: 2 logits for foreground, 1 value otherwise."""
    if task not in TASKS:
        raise ProbeError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return 2 if task == "foreground" else 1


def tensor_name(site: str, step: int, kind: str = "weight") -> str:
    """The safetensors name of a probe tensor: ``"<site>.step<NN>.<weight|bias>"``."""
    return f"{site}.step{int(step):02d}.{kind}"


def parse_tensor_name(name: str) -> tuple[str, int, str]:
    """Split a probe tensor name into ``(site, step, kind)``; ``ProbeError`` if it does not parse."""
    m = _TENSOR_NAME.match(name)
    if m is None or m["site"] not in SITE_KEYS:
        raise ProbeError(
            f"tensor name {name!r} is not '<site>.step<NN>.weight|bias' with a known site"
        )
    return m["site"], int(m["step"]), m["kind"]


def _site_order(site: str) -> int:
    return SITE_KEYS.index(site)


@dataclass(frozen=True)
class ProbeMeta:
    """What a probe bank was fit for and how: checked against the model before the bank is used.

    ``sites`` maps each site key to ``(channels, height, width)`` of its token grid at
    ``image_size`` (pixels, ``(height, width)``). Depth/shading probes predict
    ``(target - target_mean) / target_std``; foreground probes are not normalised (0, 1).
    ``training`` records how the bank was made (method, penalty, number of images, seeds, ...)
    and must be JSON-serialisable.
    """

    task: str
    model_id: str
    image_size: tuple[int, int]
    scheduler: str
    num_steps: int
    sites: dict[str, tuple[int, int, int]]
    target_mean: float = 0.0
    target_std: float = 1.0
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ProbeError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ProbeError("model_id must be a non-empty string")
        if not isinstance(self.scheduler, str) or not self.scheduler:
            raise ProbeError("scheduler must be a non-empty string")
        if self.format_version != FORMAT_VERSION:
            raise ProbeError(
                f"format_version {self.format_version!r}; this version of ldm_scene reads {FORMAT_VERSION}"
            )
        try:
            image_size = as_hw(self.image_size)
        except (TypeError, ValueError) as exc:
            raise ProbeError(f"image_size must be (height, width), got {self.image_size!r}") from exc
        if min(image_size) < 1:
            raise ProbeError(f"image_size must be positive, got {image_size}")
        object.__setattr__(self, "image_size", image_size)
        if isinstance(self.num_steps, bool) or int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ProbeError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        object.__setattr__(self, "num_steps", int(self.num_steps))
        if not isinstance(self.sites, Mapping):
            raise ProbeError(f"sites must map site keys to (channels, height, width), got {self.sites!r}")
        sites = {}
        for site, sizes in self.sites.items():
            if site not in SITE_KEYS:
                raise ProbeError(f"unknown site {site!r} in sites; known sites: {', '.join(SITE_KEYS)}")
            try:
                c, h, w = (int(v) for v in sizes)
            except (TypeError, ValueError) as exc:
                raise ProbeError(f"site {site}: expected (channels, height, width), got {sizes!r}") from exc
            if min(c, h, w) < 1:
                raise ProbeError(f"site {site}: sizes must be positive, got {(c, h, w)}")
            sites[site] = (c, h, w)
        object.__setattr__(self, "sites", dict(sorted(sites.items(), key=lambda kv: _site_order(kv[0]))))
        mean, std = float(self.target_mean), float(self.target_std)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ProbeError(f"target normalisation must be finite with std > 0, got mean={mean}, std={std}")
        if self.task == "foreground" and (mean, std) != (0.0, 1.0):
            raise ProbeError("foreground probes output logits: target_mean/target_std must be 0/1")
        object.__setattr__(self, "target_mean", mean)
        object.__setattr__(self, "target_std", std)
        if not isinstance(self.training, Mapping):
            raise ProbeError(f"training must be a dict, got {type(self.training).__name__}")
        try:
            json.dumps(self.training, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ProbeError(f"training must be JSON-serialisable: {exc}") from exc
        # a JSON round trip: a deep copy that compares equal to what a saved file gives back
        object.__setattr__(self, "training", json.loads(json.dumps(self.training)))

    @property
    def outputs(self) -> int:
        """Number of probe outputs K for this task."""
        return task_outputs(self.task)

    def to_json(self) -> str:
        """The JSON string stored in a probe file's metadata."""
        return json.dumps(dataclasses.asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "ProbeMeta":
        """Parse :meth:`to_json` output; ``ProbeError`` on bad JSON, unknown or missing fields."""
        if not isinstance(text, str):
            raise ProbeError(f"metadata must be a JSON string, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProbeError(f"metadata is not valid JSON: {exc}") from exc
        except RecursionError:
            # Python's json recurses once per nesting level: a hostile file could otherwise
            # take down whatever loads it (the app, at start-up).
            raise ProbeError("metadata is not a probe description: its JSON is nested too deeply to read") from None
        if not isinstance(data, dict):
            raise ProbeError(f"metadata must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ProbeError(
                f"format_version {version!r}; this version of ldm_scene reads {FORMAT_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ProbeError(f"unknown metadata field(s) {unknown}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ProbeError(f"metadata lacks field(s) {missing}")
        try:
            return cls(**data)
        except ProbeError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            # e.g. a string where a number belongs: int("x") / float({}) inside __post_init__
            raise ProbeError(f"metadata has a value of the wrong kind: {exc}") from exc
