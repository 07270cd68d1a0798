"""What every phase of a probe run shares (:class:`RunContext`), and :func:`prepare`, which makes it."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import bundle
from ..models import Model, load_model
from ..probes import TASKS
from ..sampler import GenerationConfig, config_for, describe_guidance
from ..sites import SiteInfo
from . import controls as ctl
from .config import WORK_FORMAT, Layout, RunConfig
from .dataset import Record, make_records, read_prompts
from .labelers import Labeler, build_labeler
from .trace import permuted_copy


# --- context ------------------------------------------------------------------------------

@dataclass
class RunContext:
    """What every phase of a run needs: config, model, labeler, records, sites, layout."""

    config: RunConfig
    model: Model
    labeler: Labeler
    records: list[Record]
    sites: list[SiteInfo]
    layout: Layout
    _permuted: torch.nn.Module | None = None

    @property
    def work(self) -> Path:
        return self.config.work_dir

    @property
    def out(self) -> Path:
        return self.config.out_dir

    @property
    def image_size(self) -> tuple[int, int]:
        return self.model.image_size

    @property
    def latent_hw(self) -> tuple[int, int]:
        f = self.model.vae_scale_factor
        return self.image_size[0] // f, self.image_size[1] // f

    @property
    def fit_records(self) -> list[Record]:
        return [r for r in self.records if r.fits]

    @property
    def test_records(self) -> list[Record]:
        return [r for r in self.records if r.split == "test"]

    @property
    def adam_keys(self) -> list[tuple[str, int]]:
        if self.config.adam_keys is not None:
            return [(s, int(t)) for s, t in self.config.adam_keys]
        last = self.config.steps - 1
        keys = []
        for site in ("up_blocks.1.attentions.1", "up_blocks.2.attentions.1"):
            for step in sorted({min(4, last), last}):
                keys.append((site, step))
        return keys

    @property
    def adam_indices(self) -> set[int]:
        if not self.adam_keys:
            return set()
        return {r.index for r in self.fit_records[: self.config.adam_images]}

    def generation(self, record: Record) -> GenerationConfig:
        """The generation of ``record``'s image: its prompt and seed under the run's guidance schedule."""
        c = self.config
        return config_for(self.model, record.prompt, record.seed, c.steps, c.guidance, c.late_guidance, c.late_from)

    @property
    def guidance(self) -> dict[str, Any]:
        """The guidance schedule every image of the run is generated with, resolved against the model."""
        g = config_for(self.model, "schedule", 0, self.config.steps, self.config.guidance,
                       self.config.late_guidance, self.config.late_from)
        if any(getattr(self.config, k) is not None for k in ("guidance", "late_guidance", "late_from")):
            source = "set for this run"
        elif self.model.directory is not None and bundle.settings_path(self.model.directory).is_file():
            source = f"the model's own, from its {bundle.SETTINGS_FILE}"
        else:
            source = "the paper's; the model recommends none"
        return {
            "guidance": float(g.guidance),
            "late_guidance": None if g.late_guidance is None else float(g.late_guidance),
            "late_from": float(g.late_from),
            "per_step": [g.guidance_at(s) for s in range(self.config.steps)],
            "text": describe_guidance(float(g.guidance), g.late_guidance, g.late_from),
            "source": source,
        }

    @property
    def prompt_index(self) -> dict[str, int]:
        """Rows of the per-prompt label sums (:func:`~.controls.shared_prompts`)."""
        by_split = {split: [r.prompt for r in self.records if r.split == split] for split in ("train", "val", "test")}
        return {p: k for k, p in enumerate(ctl.shared_prompts(by_split["train"], by_split["val"], by_split["test"]))}

    @property
    def test_partners(self) -> dict[int, list[Record]]:
        """Each test record's index -> the other test records with its prompt (the same-prompt control)."""
        tests = self.test_records
        return {tests[i].index: [tests[j] for j in js]
                for i, js in enumerate(ctl.same_prompt_partners([r.prompt for r in tests]))}

    @property
    def permuted_unet(self) -> torch.nn.Module:
        if self._permuted is None:
            self._permuted = permuted_copy(self.model.unet, self.config.permute_seed)
        return self._permuted

    def fingerprint(self) -> dict[str, Any]:
        """What the saved state depends on; a resumed run must match it."""
        c = self.config
        prompts = hashlib.sha256("\n".join(r.prompt for r in self.records).encode()).hexdigest()[:16]
        g = self.guidance
        return {
            "format": WORK_FORMAT, "model": self.model.model_id, "n": c.n, "steps": c.steps,
            "guidance": [g["guidance"], g["late_guidance"], g["late_from"]], "seed": c.seed,
            "labeler": self.labeler.name, "tasks": list(self.layout.tasks), "prompts_sha256": prompts,
            "splits": [c.train_fraction, c.val_fraction], "latent": c.latent_baseline, "permuted": c.permuted,
            "permute_seed": c.permute_seed, "adam_keys": [list(k) for k in self.adam_keys], "adam_images": c.adam_images,
            "image_size": list(self.image_size), "dtype": str(self.model.dtype),
        }


def labeler_for(model_name: str, spec: str | None = None, device: Any = None) -> Labeler:
    """The labeler ``spec`` names, or by default the model directory's toy labeler when it ships one,
    else DPT depth + saliency (SD v1.4's, as in the paper)."""
    model_dir = bundle.model_directory(model_name)
    if spec is None:
        spec = "toy" if bundle.has_labeler(bundle.labelers_dir(model_dir)) else "dpt+tracer"
    return build_labeler(spec, model_dir=model_dir, device=device)


def prepare(config: RunConfig, labeler: Labeler | None = None, model: Model | None = None) -> RunContext:
    """Load the model and labeler, make the records and check ``out/work`` belongs to this run.

    A work directory written by a run with another fingerprint (model, N, steps, seeds, labeler,
    ...) is refused with a message, never silently mixed in.
    """
    if model is None:
        model = load_model(config.model, device=config.device)
    if labeler is None:
        labeler = labeler_for(config.model, config.labeler, model.device)
    tasks = tuple(t for t in TASKS if t in labeler.tasks)
    if not tasks:
        raise ValueError(f"labeler {labeler.name} provides none of the tasks {TASKS}")
    prompts = read_prompts(config.prompts) if config.prompts else None
    records = make_records(config.n, config.seed, prompts, config.train_fraction, config.val_fraction)
    ctx = RunContext(config, model, labeler, records, model.sites(), Layout(tasks))
    ctx.work.mkdir(parents=True, exist_ok=True)
    fp_path = ctx.work / "run.json"
    fp = ctx.fingerprint()
    if fp_path.exists():
        old = json.loads(fp_path.read_text())
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise ValueError(
                f"{ctx.work} holds the state of another run (differs in {', '.join(diff)}); "
                "use another --out or delete that work directory"
            )
    else:
        write_text(fp_path, json.dumps(fp, indent=1))
    return ctx


def write_text(path: Path, text: str) -> None:
    # per-process temporary name: under accelerate every rank may write the same file at once
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
