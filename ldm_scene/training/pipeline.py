"""Fit and evaluate linear probes for every (task, site, step) in one streamed pass per image.

The run, for N seeded images split train / val / test (:mod:`.dataset`):

1. **Fit pass** (train and val images). Each image is generated once with every site hooked. The
   conditional activations of that one image (16 sites x all steps) are kept until the image is
   done, because the labels come from the labeler applied to the *final* image (the paper's
   protocol); then each ``(site, step)`` activation ``[T, C]`` updates a
   :class:`~ldm_scene.training.fit.RidgeStats` against the labels area-averaged to the site's grid
   (for foreground: the fraction of the token's cell that is foreground, a soft target), and the
   activations are dropped. One accumulator per ``(site, step)`` holds all tasks' targets as
   columns (``X^T X`` is shared), so memory is ``O(sites x steps x C^2)`` whatever N is. The
   same image also feeds:
   - the *latent baseline*: the same fit on the 4-channel UNet input ``x_t`` at each step;
   - the *permuted control*: the same fit on the activations of a copy of the UNet whose every
     parameter tensor was shuffled with a seeded generator (the paper's control), run on the real
     trajectory's inputs ``(x_t, t, text)`` (a permuted UNet cannot denoise, so its own samples
     would have no labels); all steps go through it in one batched forward;
   - pixel statistics of the labels (for depth/shading normalisation) and their per-pixel mean
     maps (the layout prior);
   - for a few chosen ``(site, step)``s, the activations themselves (on disk) for the paper's Adam
     trainer, to compare it with ridge.
   Statistics are checkpointed every ``checkpoint_every`` images (one safetensors file with the
   progress in its metadata, replaced atomically), so an interrupted run resumes exactly.
   Under ``accelerate launch`` each process fits its own share of the images and rank 0 merges the
   shards' statistics (:meth:`RidgeStats.merge`).
2. **Solve**. Per ``(task, site, step)`` the ridge penalty is chosen on the validation images
   (:func:`~ldm_scene.training.fit.choose_penalty`) and the probe refit on train + val; depth and
   shading probes predict targets normalised by the fitting images' pixel mean and std. The best
   site per step is the one with the highest validation R^2. Banks are saved with full metadata.
3. **Evaluation pass** (test images, regenerated from their seeds, never used for fitting): every
   probe, the latent and permuted probes, the labeler applied to each step's decoded x0 preview,
   and the layout prior are scored against the labels of the final image (:mod:`.evaluate`);
   per-image scores are written to disk, so this pass resumes too.
   Readouts are upsampled bilinearly to the labels' resolution before thresholding or ranking
   (:func:`~.evaluate.upsample`). The same pass scores the prompt-only baseline and each site
   grid's ceiling (:mod:`.controls`), and keeps the readouts and labels of every test image that
   shares its prompt with another test image.
4. **Same-prompt control** (:func:`control_pass`): each such image's readouts scored against the
   other same-prompt test images' labels.
5. **Report** (:mod:`.report`): ``metrics.json``, figures and ``README.md`` in the output directory.

Every image is generated under the model's own guidance schedule (:func:`~ldm_scene.sampler.config_for`)
unless the run sets one; probe metadata and ``metrics.json`` record it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..capture import capture, hook_sites
from ..models import ALIASES, SETTINGS_FILE, Model, load_model
from ..probes import CLASS_MEANS, TASKS, ProbeBank, ProbeMeta, class_means_bank, load_probe_dir, probe_path, tensor_name, task_outputs
from ..sampler import DEFAULT_STEPS, GenerationConfig, config_for, decode, describe_guidance, sample
from ..sites import SITE_KEYS, SiteInfo
from . import controls as ctl
from . import evaluate as ev
from . import report as rep
from .dataset import Record, Shard, make_records, read_prompts
from .fit import DEFAULT_PENALTY_GRID, RidgeStats, choose_penalty, ridge_targets, to_normalised, train_adam
from .labelers import Labeler, build_labeler, check_labels

__all__ = [
    "RunConfig",
    "RunContext",
    "Layout",
    "FitState",
    "LATENT",
    "prepare",
    "new_fit_state",
    "load_fit_state",
    "generate_trace",
    "label_images",
    "accumulate",
    "Solution",
    "load_solution",
    "permuted_copy",
    "site_targets",
    "fit_pass",
    "merge_fits",
    "solve",
    "train_adam_probes",
    "eval_pass",
    "control_pass",
    "report",
    "run",
]

#: The pseudo-site of the latent baseline (the UNet's 4-channel input at each step).
LATENT = "latent"
#: Statistics groups: the model's own UNet, and its permuted copy.
UNET, PERMUTED = "unet", "permuted"
_META_KEY = "ldm_scene_fit"
#: Version of the work directory's layout; a work directory of another version is refused.
#: 2: per-prompt label sums in the fit state, prompt-only and same-prompt controls, bilinear read-out.
WORK_FORMAT = 2


@dataclass(frozen=True)
class RunConfig:
    """One probe run. ``out`` receives the probes, metrics and figures; ``out/work`` the resumable state.

    ``guidance``, ``late_guidance`` and ``late_from`` are the generation's guidance schedule; each
    None takes the model's own (its ``ldm_scene.json``, see :func:`~ldm_scene.sampler.config_for`;
    7.5 throughout for a model without one, the paper's). Pass ``late_guidance=guidance`` for a
    constant scale on a model that lowers it late. Probes are fit and evaluated under the same
    schedule, which their metadata and ``metrics.json`` record.
    ``labeler`` is a :func:`~.labelers.build_labeler` spec (default: ``toy`` when the model
    directory has ``labelers/``, else ``dpt+tracer``). ``prompts`` is a file of prompts (default:
    the toy renderer's prompt for each seed). ``preview_images`` caps how many test images get the
    labeler-on-x0 baseline (None: all). ``adam_keys`` are ``(site, step)`` pairs for the Adam vs
    ridge comparison (None: a default few; empty: skip it), trained on the first ``adam_images``
    fitting images. ``bootstrap_resamples`` resamples of the test images (a generator seeded with
    ``seed``) give the 95% confidence intervals of the margins over the baselines.
    """

    model: str
    n: int
    out: str
    steps: int = DEFAULT_STEPS
    guidance: float | None = None
    late_guidance: float | None = None
    late_from: float | None = None
    seed: int = 0
    labeler: str | None = None
    prompts: str | None = None
    train_fraction: float = 0.4
    val_fraction: float = 0.2
    penalties: tuple[float, ...] = DEFAULT_PENALTY_GRID
    checkpoint_every: int = 25
    latent_baseline: bool = True
    permuted: bool = True
    permute_seed: int = 0
    preview_images: int | None = None
    adam_keys: tuple[tuple[str, int], ...] | None = None
    adam_images: int = 128
    adam_epochs: int = 30
    n_examples: int = 3
    figures: bool = True
    device: str | None = None
    bootstrap_resamples: int = 1000

    def __post_init__(self) -> None:
        if self.n < 3:
            raise ValueError(f"n must be >= 3 (train, val and test images), got {self.n}")
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be in 1..200, got {self.steps}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1): the penalty is chosen on validation images")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not self.penalties or any(p < 0 or not math.isfinite(p) for p in self.penalties):
            raise ValueError(f"penalties must be finite and >= 0, got {self.penalties}")
        if self.adam_images < 1 or self.adam_epochs < 1 or self.n_examples < 0:
            raise ValueError("adam_images and adam_epochs must be >= 1, n_examples >= 0")
        for name in ("guidance", "late_guidance"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 30):
                raise ValueError(f"{name} must be between 0 and 30 (or None: the model's own), got {value}")
        if self.late_from is not None and not 0 <= self.late_from <= 1:
            raise ValueError(f"late_from must be a fraction of the steps in [0, 1] (or None), got {self.late_from}")
        if self.bootstrap_resamples < 10:
            raise ValueError(f"bootstrap_resamples must be >= 10, got {self.bootstrap_resamples}")
        for key in self.adam_keys or ():
            if key[0] not in SITE_KEYS or not 0 <= int(key[1]) < self.steps:
                raise ValueError(f"adam key {key} is not (site, step) with a known site and step < {self.steps}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def work_dir(self) -> Path:
        return Path(self.out) / "work"


# --- column layout: all tasks' targets side by side in one accumulator -----------------------

@dataclass(frozen=True)
class Layout:
    """Where each task's target columns sit in the shared accumulators (foreground takes 2: [1-p, p])."""

    tasks: tuple[str, ...]

    @property
    def columns(self) -> dict[str, slice]:
        cols, start = {}, 0
        for task in self.tasks:
            k = task_outputs(task)
            cols[task] = slice(start, start + k)
            start += k
        return cols

    @property
    def width(self) -> int:
        return sum(task_outputs(t) for t in self.tasks)

    def targets(self, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[T, K]`` float64 from per-token labels ``{task: [T]}``."""
        return torch.cat([ridge_targets(t, labels[t].to(torch.float64)) for t in self.tasks], dim=1)


def slice_stats(stats: RidgeStats, cols: slice) -> RidgeStats:
    """The accumulator of a subset of target columns (``X^T X`` is shared by every column)."""
    out = RidgeStats.__new__(RidgeStats)
    out.channels, out.outputs = stats.channels, cols.stop - cols.start
    out.n = stats.n
    out.xtx = stats.xtx
    out.xty = stats.xty[:, cols]
    out.yty = stats.yty[cols]
    return out


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
        elif self.model.directory is not None and (Path(self.model.directory) / SETTINGS_FILE).is_file():
            source = f"the model's own, from its {SETTINGS_FILE}"
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


def _model_dir(name: str) -> Path | None:
    path = Path(ALIASES.get(name, name))
    return path if path.is_dir() else None


def labeler_for(model_name: str, spec: str | None = None, device: Any = None) -> Labeler:
    """The labeler ``spec`` names, or by default the model directory's toy labeler when it ships one,
    else DPT depth + saliency (SD v1.4's, as in the paper)."""
    model_dir = _model_dir(model_name)
    if spec is None:
        has_toy = model_dir is not None and (model_dir / "labelers" / "labeler.safetensors").is_file()
        spec = "toy" if has_toy else "dpt+tracer"
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
        _write_text(fp_path, json.dumps(fp, indent=1))
    return ctx


def _write_text(path: Path, text: str) -> None:
    # per-process temporary name: under accelerate every rank may write the same file at once
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the permuted control -------------------------------------------------------------------

@torch.no_grad()
def permuted_copy(unet: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``unet`` whose every parameter tensor has its entries randomly shuffled.

    The permutation of each tensor is drawn, in ``named_parameters`` order, from one CPU
    generator seeded with ``seed``: the same seed gives the same network. Each tensor keeps its
    own values (so the weight statistics of every layer are unchanged), but all learned structure
    is gone.
    """
    gen = torch.Generator("cpu").manual_seed(int(seed))
    out = copy.deepcopy(unet).eval()
    for module in out.modules():
        # a copy made while someone's hooks were attached must not carry them
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    for _, p in out.named_parameters():
        perm = torch.randperm(p.numel(), generator=gen).to(p.device)
        p.copy_(p.reshape(-1)[perm].reshape(p.shape))
        p.requires_grad_(False)
    return out


# --- one image --------------------------------------------------------------------------------

@dataclass
class ImageTrace:
    """One generated image with what the fit and evaluation need of it.

    ``acts[site]`` is ``[S, T, C]`` (conditional half, the model's dtype and device), ``inputs``
    the UNet input of the conditional half per step ``[S, 4, h, w]``, ``timesteps`` ``[S]``,
    ``embeds`` the conditional text embedding ``[1, L, D]``, ``x0`` ``[S, 4, h, w]`` and
    ``image`` uint8 ``[H, W, 3]``.
    """

    record: Record
    acts: dict[str, torch.Tensor]
    inputs: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    x0: torch.Tensor
    image: np.ndarray
    seconds: float = 0.0


@contextmanager
def unet_inputs(unet: torch.nn.Module, guided: bool) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Record ``(sample, timestep, encoder_hidden_states)`` of the conditional half of each UNet call."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        e = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        if guided:
            x, e = x.chunk(2)[1], e.chunk(2)[1]
        t = torch.as_tensor(t).reshape(-1)[:1]
        calls.append((x.detach().clone(), t.detach().clone(), e.detach().clone()))

    with ExitStack() as stack:
        stack.callback(unet.register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield calls


def generate_trace(ctx: RunContext, record: Record, previews: bool = False) -> ImageTrace:
    """Generate ``record``'s image keeping every site's conditional activation at every step."""
    config = ctx.generation(record)
    unet = ctx.model.unet
    start = time.perf_counter()
    x0s, image = [], None
    with capture(unet, SITE_KEYS, split_guidance=config.uses_guidance, to_cpu=False) as cap, unet_inputs(
        unet, config.uses_guidance
    ) as calls:
        for state in sample(ctx.model, config):
            x0s.append(state.x0)
            if state.image is not None:
                image = np.asarray(state.image.convert("RGB"), dtype=np.uint8)
    steps = len(x0s)
    acts = {site: torch.cat([cap.values[(site, s)] for s in range(steps)]) for site in SITE_KEYS}
    trace = ImageTrace(
        record=record,
        acts=acts,
        inputs=torch.cat([x for x, _, _ in calls]),
        timesteps=torch.cat([t for _, t, _ in calls]),
        embeds=calls[0][2],
        x0=torch.cat(x0s),
        image=image,
    )
    trace.seconds = time.perf_counter() - start
    return trace


@torch.no_grad()
def permuted_acts(ctx: RunContext, trace: ImageTrace) -> dict[str, torch.Tensor]:
    """The permuted UNet's site activations ``[S, T, C]`` on the trace's inputs, all steps in one batch."""
    unet = ctx.permuted_unet
    kept: dict[str, torch.Tensor] = {}

    def keep(site: str, step: int, act: torch.Tensor) -> None:
        kept[site] = act.detach().clone()

    steps = trace.inputs.shape[0]
    embeds = trace.embeds.expand(steps, *trace.embeds.shape[1:])
    with hook_sites(unet, SITE_KEYS, keep, split_guidance=False):
        unet(trace.inputs, trace.timesteps.to(trace.inputs.device), encoder_hidden_states=embeds, return_dict=False)
    return kept


def label_images(ctx: RunContext, images: np.ndarray, seeds: Sequence[int] | None) -> dict[str, np.ndarray]:
    """The labeler's maps ``{task: [N, H, W]}`` at the image size, validated."""
    raw = ctx.labeler(images, seeds=seeds)
    return check_labels(raw, ctx.layout.tasks, len(images), ctx.image_size)


def site_targets(labels: dict[str, np.ndarray], hw: tuple[int, int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Each label map ``[H, W]`` area-averaged to the token grid ``hw`` and flattened row-major: ``{task: [h*w]}``.

    For foreground (a 0/1 mask) the average is the fraction of the token's cell that is foreground.
    """
    out = {}
    for task, y in labels.items():
        t = torch.as_tensor(np.asarray(y), dtype=torch.float64)[None, None]
        out[task] = F.adaptive_avg_pool2d(t, hw).reshape(-1).to(device)
    return out


def _latent_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[S, 4, h, w]`` -> ``[S, h*w, 4]`` (row-major tokens, as the UNet flattens its grids)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


# --- fitting state --------------------------------------------------------------------------

@dataclass
class FitState:
    """Everything the fit pass accumulates, for one shard or merged.

    ``stats[group][split][(key, step)]``: group ``"unet"`` or ``"permuted"``, split ``"train"`` or
    ``"val"``, key a site or :data:`LATENT`. ``pixels[task]`` is ``[sum, sum of squares, count]``
    over every label pixel of the fitting images (train and val) and ``maps[task]`` the per-pixel
    sum ``[H, W]`` of the label maps over ``n_images`` images. ``prompt_sums[split][task]`` is
    ``[P + 1, H, W]``: the label sums of that split's images per prompt of
    :attr:`RunContext.prompt_index` (row P: every image of the split), ``prompt_counts[split]``
    ``[P + 1]`` their image counts (the prompt-only baseline). ``done`` counts processed images.
    """

    stats: dict[str, dict[str, dict[tuple[str, int], RidgeStats]]]
    pixels: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    prompt_sums: dict[str, dict[str, torch.Tensor]]
    prompt_counts: dict[str, torch.Tensor]
    n_images: int = 0
    done: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def merge(self, other: "FitState") -> None:
        for group, splits in other.stats.items():
            for split, keyed in splits.items():
                for key, s in keyed.items():
                    self.stats[group][split][key].merge(s)
        for task in self.pixels:
            self.pixels[task] += other.pixels[task]
            self.maps[task] += other.maps[task]
        for split, per_task in other.prompt_sums.items():
            for task, v in per_task.items():
                self.prompt_sums[split][task] += v
            self.prompt_counts[split] += other.prompt_counts[split]
        self.n_images += other.n_images
        self.done += other.done
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


def new_fit_state(ctx: RunContext) -> FitState:
    device = ctx.model.device
    k = ctx.layout.width
    groups = [UNET] + ([PERMUTED] if ctx.config.permuted else [])
    stats: dict[str, dict[str, dict[tuple[str, int], RidgeStats]]] = {}
    for group in groups:
        stats[group] = {}
        for split in ("train", "val"):
            keyed = {}
            for info in ctx.sites:
                for step in range(ctx.config.steps):
                    keyed[(info.key, step)] = RidgeStats(info.channels, k, device=device)
            if group == UNET and ctx.config.latent_baseline:
                channels = int(ctx.model.unet.config.in_channels)
                for step in range(ctx.config.steps):
                    keyed[(LATENT, step)] = RidgeStats(channels, k, device=device)
            stats[group][split] = keyed
    h, w = ctx.image_size
    pixels = {t: torch.zeros(3, dtype=torch.float64) for t in ctx.layout.tasks}
    maps = {t: torch.zeros(h, w, dtype=torch.float64) for t in ctx.layout.tasks}
    rows = len(ctx.prompt_index) + 1
    prompt_sums = {split: {t: torch.zeros(rows, h, w, dtype=torch.float64) for t in ctx.layout.tasks} for split in ("train", "val")}
    prompt_counts = {split: torch.zeros(rows, dtype=torch.float64) for split in ("train", "val")}
    return FitState(stats, pixels, maps, prompt_sums, prompt_counts)


def _state_tensors(state: FitState) -> dict[str, torch.Tensor]:
    out = {}
    for group, splits in state.stats.items():
        for split, keyed in splits.items():
            for (key, step), s in keyed.items():
                for name, tensor in s.state_dict().items():
                    out[f"stats/{group}/{split}/{key}/{step:03d}/{name}"] = tensor.contiguous()
    for task in state.pixels:
        out[f"pixels/{task}"] = state.pixels[task].contiguous()
        out[f"maps/{task}"] = state.maps[task].contiguous()
    for split, per_task in state.prompt_sums.items():
        for task, v in per_task.items():
            out[f"prompt_sums/{split}/{task}"] = v.contiguous()
        out[f"prompt_counts/{split}"] = state.prompt_counts[split].contiguous()
    return out


def save_fit_state(state: FitState, path: Path, fingerprint: dict) -> None:
    """One safetensors file, replaced atomically, with the progress in its metadata."""
    meta = {"done": state.done, "n_images": state.n_images, "seconds": state.seconds, "run": fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_state_tensors(state), str(tmp), metadata={_META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load_fit_state(ctx: RunContext, path: Path) -> FitState:
    """Read a checkpoint written by :func:`save_fit_state` for this run."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[_META_KEY])
    if meta["run"] != ctx.fingerprint():
        raise ValueError(f"{path} was written by another run; delete it or use another --out")
    tensors = load_file(str(path), device="cpu")
    state = new_fit_state(ctx)
    device = ctx.model.device
    grouped: dict[tuple[str, str, str, int], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parts = name.split("/")
        if parts[0] == "stats":
            _, group, split, key, step, stat = parts
            grouped.setdefault((group, split, key, int(step)), {})[stat] = tensor
        elif parts[0] == "pixels":
            state.pixels[parts[1]] = tensor.clone()
        elif parts[0] == "maps":
            state.maps[parts[1]] = tensor.clone()
        elif parts[0] == "prompt_sums":
            state.prompt_sums[parts[1]][parts[2]] = tensor.clone()
        elif parts[0] == "prompt_counts":
            state.prompt_counts[parts[1]] = tensor.clone()
    for (group, split, key, step), sd in grouped.items():
        state.stats[group][split][(key, step)] = RidgeStats.from_state_dict(sd, device=device)
    expected = sum(len(k) for s in state.stats.values() for k in s.values())
    if len(grouped) != expected:
        raise ValueError(f"{path} holds {len(grouped)} accumulators, this run has {expected}")
    state.done, state.n_images, state.seconds = int(meta["done"]), int(meta["n_images"]), dict(meta["seconds"])
    return state


def _fit_path(ctx: RunContext, shard: Shard) -> Path:
    return ctx.work / "fit" / f"{shard.tag}.safetensors"


def accumulate(ctx: RunContext, state: FitState, trace: ImageTrace, labels: dict[str, np.ndarray]) -> None:
    """Add one image (its kept activations and its final image's labels) to the fit state."""
    split = trace.record.split
    layout = ctx.layout
    device = ctx.model.device
    t0 = time.perf_counter()
    keyed = state.stats[UNET][split]
    targets_by_hw: dict[tuple[int, int], torch.Tensor] = {}

    def targets(hw: tuple[int, int]) -> torch.Tensor:
        if hw not in targets_by_hw:
            targets_by_hw[hw] = layout.targets(site_targets(labels, hw, device))
        return targets_by_hw[hw]

    for info in ctx.sites:
        y = targets((info.height, info.width))
        acts = trace.acts[info.key]
        for step in range(acts.shape[0]):
            keyed[(info.key, step)].update(acts[step], y)
    if ctx.config.latent_baseline:
        y = targets(ctx.latent_hw)
        tokens = _latent_tokens(trace.inputs)
        for step in range(tokens.shape[0]):
            keyed[(LATENT, step)].update(tokens[step], y)
    t1 = time.perf_counter()
    if ctx.config.permuted:
        perm = permuted_acts(ctx, trace)
        t2 = time.perf_counter()
        pkeyed = state.stats[PERMUTED][split]
        for info in ctx.sites:
            y = targets((info.height, info.width))
            for step in range(perm[info.key].shape[0]):
                pkeyed[(info.key, step)].update(perm[info.key][step], y)
        t3 = time.perf_counter()
        state.seconds["permuted_forward"] = state.seconds.get("permuted_forward", 0.0) + t2 - t1
        state.seconds["permuted_update"] = state.seconds.get("permuted_update", 0.0) + t3 - t2
    index = ctx.prompt_index
    rows = [len(index)] + ([index[trace.record.prompt]] if trace.record.prompt in index else [])  # the split's row, the prompt's
    for task in layout.tasks:
        y = torch.from_numpy(labels[task]).to(torch.float64)
        state.pixels[task] += torch.stack([y.sum(), (y * y).sum(), torch.tensor(float(y.numel()), dtype=torch.float64)])
        state.maps[task] += y
        state.prompt_sums[split][task][rows] += y
    state.prompt_counts[split][rows] += 1
    state.n_images += 1
    state.seconds["update"] = state.seconds.get("update", 0.0) + t1 - t0


def _save_adam_acts(ctx: RunContext, trace: ImageTrace, labels: dict[str, np.ndarray]) -> None:
    tensors = {}
    for site, step in ctx.adam_keys:
        tensors[f"{site}.step{step:02d}.act"] = trace.acts[site][step].to(torch.float16).cpu().contiguous()
    for info in ctx.sites:
        if any(site == info.key for site, _ in ctx.adam_keys):
            y = site_targets(labels, (info.height, info.width))
            for task, v in y.items():
                tensors[f"{info.key}.{task}"] = v.to(torch.float32).contiguous()
    path = ctx.work / "adam" / f"{trace.record.index:06d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def fit_image(ctx: RunContext, state: FitState, record: Record) -> tuple["ImageTrace", dict[str, np.ndarray]]:
    """Generate one fitting image with every site kept, label its final image, update the statistics."""
    trace = generate_trace(ctx, record)
    t0 = time.perf_counter()
    labels = {t: v[0] for t, v in label_images(ctx, trace.image[None], [record.seed]).items()}
    state.seconds["label"] = state.seconds.get("label", 0.0) + time.perf_counter() - t0
    state.seconds["generate"] = state.seconds.get("generate", 0.0) + trace.seconds
    accumulate(ctx, state, trace, labels)
    return trace, labels


def fit_pass(ctx: RunContext, shard: Shard = Shard(), limit: int | None = None, progress: bool = True) -> FitState:
    """Stream this shard's train and val images into the fit state, resuming from its checkpoint.

    Saves a checkpoint every ``checkpoint_every`` images and at the end. ``limit`` stops after that
    many newly processed images (a time-boxed run; rerun to continue). Returns the shard's state.
    """
    path = _fit_path(ctx, shard)
    state = load_fit_state(ctx, path) if path.exists() else new_fit_state(ctx)
    todo = shard.select(ctx.fit_records)
    adam = ctx.adam_indices
    fp = ctx.fingerprint()
    bar = tqdm(total=len(todo), initial=state.done, desc=f"fit {shard.tag}", disable=not progress, unit="img")
    processed = 0
    try:
        for record in todo[state.done :]:
            if limit is not None and processed >= limit:
                break
            trace, labels = fit_image(ctx, state, record)
            if record.index in adam:
                _save_adam_acts(ctx, trace, labels)
            del trace
            state.done += 1
            processed += 1
            bar.update(1)
            if state.done % ctx.config.checkpoint_every == 0:
                save_fit_state(state, path, fp)
    finally:
        bar.close()
    save_fit_state(state, path, fp)
    return state


def merge_fits(ctx: RunContext, world: int) -> FitState:
    """Merge the ``world`` shards' checkpoints (rank order) into one state; every shard must be complete."""
    merged = None
    for rank in range(world):
        shard = Shard(rank, world)
        path = _fit_path(ctx, shard)
        if not path.exists():
            raise FileNotFoundError(f"shard {shard.tag} has no fit checkpoint at {path}")
        state = load_fit_state(ctx, path)
        expected = len(shard.select(ctx.fit_records))
        if state.done != expected:
            raise RuntimeError(f"shard {shard.tag} fit {state.done} of its {expected} images; rerun to finish it")
        if merged is None:
            merged = state
        else:
            merged.merge(state)
    assert merged is not None
    return merged


# --- solve ------------------------------------------------------------------------------------

@dataclass
class Solution:
    """Solved probes and what evaluation needs, as saved in ``out`` and ``out/work``.

    ``weights[group][task][(key, step)] = (w [K, C], b [K])`` predicting normalised targets;
    ``val_r2[group][task][key]`` per step; ``best[group][task]`` the site per step with the highest
    validation R^2; ``norm[task] = (mean, std)``; ``priors[task]`` the per-pixel mean label map.
    The prompt-only baseline: ``prompt_maps[task]`` ``[P, H, W]``, the fitting images' mean label
    per prompt of ``prompts`` (nan rows for a prompt without fitting images); ``train_prompt_maps``
    and ``train_priors`` the same over the train images alone (for choosing its foreground threshold
    on the validation images), and ``prompt_threshold`` that threshold.
    """

    weights: dict[str, dict[str, dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]]]
    penalties: dict[str, dict[str, dict[tuple[str, int], float]]]
    val_r2: dict[str, dict[str, dict[str, list[float]]]]
    best: dict[str, dict[str, list[str]]]
    best_site: dict[str, str]
    norm: dict[str, tuple[float, float]]
    priors: dict[str, torch.Tensor]
    n_fit: dict[str, int]
    thresholds: dict[str, dict[tuple[str, int], float]] | None = None
    prompts: list[str] = field(default_factory=list)
    prompt_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    train_prompt_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    train_priors: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_threshold: float | None = None

    def prompt_only(self, task: str, prompt: str) -> tuple[torch.Tensor, bool]:
        """The prompt-only map ``[H, W]`` for a test image's prompt, and whether same-prompt images made it."""
        index = {p: k for k, p in enumerate(self.prompts)}
        return ctl.prompt_map(prompt, index, self.prompt_maps[task], self.priors[task])


def _val_r2(val: RidgeStats, mse: float) -> float:
    var = float((val.target_std() ** 2).mean())
    return 1.0 - mse / var if var > 0 else math.nan


def _best_sites(val_r2: dict[str, list[float]], steps: int) -> tuple[list[str], str]:
    sites = [s for s in val_r2 if s != LATENT]
    per_step = []
    for step in range(steps):
        per_step.append(max(sites, key=lambda s: -math.inf if math.isnan(val_r2[s][step]) else val_r2[s][step]))
    tail = range(max(0, steps - 5), steps)

    def tail_mean(s: str) -> float:
        vals = [val_r2[s][t] for t in tail if not math.isnan(val_r2[s][t])]
        return sum(vals) / len(vals) if vals else -math.inf

    return per_step, max(sites, key=tail_mean)


def solve(ctx: RunContext, state: FitState, progress: bool = True) -> Solution:
    """Choose penalties on validation, refit on train + val, normalise, pick best sites; save everything."""
    c = ctx.config
    cols = ctx.layout.columns
    norm: dict[str, tuple[float, float]] = {}
    for task in ctx.layout.tasks:
        if task == "foreground":
            norm[task] = (0.0, 1.0)
            continue
        total, sq, count = (float(v) for v in state.pixels[task])
        mean = total / count
        std = math.sqrt(max(sq / count - mean * mean, 0.0))
        norm[task] = (mean, std if std > 0 else 1.0)
    priors = {t: (state.maps[t] / max(state.n_images, 1)).to(torch.float32) for t in ctx.layout.tasks}
    prompt_maps, train_prompt_maps, train_priors = {}, {}, {}
    for t in ctx.layout.tasks:
        sums = state.prompt_sums["train"][t] + state.prompt_sums["val"][t]
        counts = state.prompt_counts["train"] + state.prompt_counts["val"]
        prompt_maps[t] = ctl.prompt_means(sums[:-1], counts[:-1]).to(torch.float32)
        train = ctl.prompt_means(state.prompt_sums["train"][t], state.prompt_counts["train"]).to(torch.float32)
        train_prompt_maps[t], train_priors[t] = train[:-1], train[-1]
    weights: dict = {}
    penalties: dict = {}
    val_r2: dict = {}
    best: dict = {}
    best_site: dict = {}
    for group, splits in state.stats.items():
        weights[group], penalties[group], val_r2[group], best[group] = {}, {}, {}, {}
        keys = list(splits["train"])
        for task in ctx.layout.tasks:
            weights[group][task], penalties[group][task] = {}, {}
            r2: dict[str, list[float]] = {}
            mean, std = norm[task]
            for key in tqdm(keys, desc=f"solve {group} {task}", disable=not progress, leave=False):
                train = slice_stats(splits["train"][key], cols[task])
                val = slice_stats(splits["val"][key], cols[task])
                penalty, _, _, scores = choose_penalty(train, val, c.penalties, refit=False)
                both = RidgeStats(train.channels, train.outputs, device=train.device)
                both.merge(train)
                both.merge(val)
                w, b = both.solve(penalty)
                if task != "foreground":
                    w, b = to_normalised(w, b, mean, std)
                weights[group][task][key] = (w, b)
                penalties[group][task][key] = penalty
                r2.setdefault(key[0], [math.nan] * c.steps)[key[1]] = _val_r2(val, scores[penalty])
            val_r2[group][task] = r2
            per_step, overall = _best_sites(r2, c.steps)
            best[group][task] = per_step
            if group == UNET:
                best_site[task] = overall
    n_fit = {
        "train": sum(1 for r in ctx.records if r.split == "train"),
        "val": sum(1 for r in ctx.records if r.split == "val"),
    }
    sol = Solution(weights, penalties, val_r2, best, best_site, norm, priors, n_fit, prompts=list(ctx.prompt_index),
                   prompt_maps=prompt_maps, train_prompt_maps=train_prompt_maps, train_priors=train_priors)
    save_solution(ctx, sol)
    if "foreground" in cols and UNET in state.stats:
        save_class_means(ctx, sol, state)
    return sol


def _meta(ctx: RunContext, sol: Solution, task: str, group: str) -> ProbeMeta:
    c = ctx.config
    mean, std = sol.norm[task]
    seeds = [r.seed for r in ctx.records]
    g = ctx.guidance
    return ProbeMeta(
        task=task,
        model_id=ctx.model.model_id,
        image_size=ctx.image_size,
        scheduler=ctx.model.scheduler_name,
        num_steps=c.steps,
        sites={i.key: (i.channels, i.height, i.width) for i in ctx.sites},
        target_mean=mean,
        target_std=std,
        training={
            "method": "ridge",
            "unet": "permuted (control)" if group == PERMUTED else "as trained",
            "penalty": {tensor_name(s, t, "weight")[: -len(".weight")]: p for (s, t), p in sol.penalties[group][task].items() if s != LATENT},
            "penalty_grid": list(c.penalties),
            "penalty_scale": "relative: lambda = penalty * trace(centred X^T X) / C",
            "penalty_chosen_on": "validation MSE; probe refit on train + val",
            "targets": "labels of the final image, area-averaged to each site's token grid"
            + ("; foreground as [1 - p, p] with p the cell's foreground fraction" if task == "foreground" else ""),
            "n_images": sol.n_fit["train"] + sol.n_fit["val"],
            "n_train": sol.n_fit["train"],
            "n_val": sol.n_fit["val"],
            "seeds": {"first": min(seeds), "count": len(seeds), "fit": [r.seed for r in ctx.fit_records]},
            "labeler": ctx.labeler.name,
            "guidance": g["guidance"],
            "late_guidance": g["late_guidance"],
            "late_from": g["late_from"],
            "guidance_schedule": g["text"],
            "guidance_per_step": g["per_step"],
            "readout_upsampling": ev.UPSAMPLING,
            "bias": True,
            **({"decision_threshold": {
                "chosen_on": "validation images, highest mean Dice over a grid of thresholds on the ridge "
                             "prediction p, folded into the bias so that softmax probability > 0.5 means p > threshold",
                "threshold": {tensor_name(s, t, "weight")[: -len(".weight")]: v
                              for (s, t), v in sol.thresholds[group].items() if s != LATENT},
            }} if task == "foreground" and sol.thresholds and group in sol.thresholds else {}),
            "best_site_per_step": sol.best[group][task],
            "best_site": sol.best_site.get(task),
        },
    )


def _bank(ctx: RunContext, sol: Solution, task: str, group: str) -> ProbeBank:
    ws = {k: v[0] for k, v in sol.weights[group][task].items() if k[0] != LATENT}
    bs = {k: v[1] for k, v in sol.weights[group][task].items() if k[0] != LATENT}
    return ProbeBank(_meta(ctx, sol, task, group), ws, bs)


def save_class_means(ctx: RunContext, sol: Solution, state: FitState) -> None:
    """The background / foreground mean activation per (site, step), read off the statistics.

    With foreground targets ``[1 - p, p]``, column k of ``X^T Y`` sums the activations weighted by
    each token's background / foreground fraction and its bias row sums the weights, so their
    ratio is the class mean. The steering intervention moves tokens along their difference.
    """
    cols = ctx.layout.columns["foreground"]
    sums, counts = {}, {}
    for (key, step), train in state.stats[UNET]["train"].items():
        if key == LATENT:
            continue
        xty = train.xty[:, cols] + state.stats[UNET]["val"][(key, step)].xty[:, cols]
        sums[(key, step)] = xty[: train.channels].T
        counts[(key, step)] = xty[train.channels]
    bank = class_means_bank(sums, counts, _bank(ctx, sol, "foreground", UNET))
    bank.save(Path(ctx.out) / f"{CLASS_MEANS}.safetensors")


def save_solution(ctx: RunContext, sol: Solution) -> None:
    """Banks to ``out/<task>.safetensors`` (and the permuted control's to ``work/permuted/``);
    the latent probes, priors and selection to ``work/solution.*``."""
    for group in sol.weights:
        for task in ctx.layout.tasks:
            bank = _bank(ctx, sol, task, group)
            bank.save(probe_path(ctx.out if group == UNET else ctx.work / "permuted", task))
    tensors = {f"prior/{t}": p.contiguous() for t, p in sol.priors.items()}
    for t in sol.prompt_maps:
        tensors[f"prompt/fit/{t}"] = sol.prompt_maps[t].contiguous()
        tensors[f"prompt/train/{t}"] = sol.train_prompt_maps[t].contiguous()
        tensors[f"prompt/train_prior/{t}"] = sol.train_priors[t].contiguous()
    for task, keyed in sol.weights.get(UNET, {}).items():
        for (key, step), (w, b) in keyed.items():
            if key == LATENT:
                tensors[f"latent/{task}/{step:03d}/weight"] = w.contiguous()
                tensors[f"latent/{task}/{step:03d}/bias"] = b.contiguous()
    save_file(tensors, str(ctx.work / "solution.safetensors"))
    info = {
        "val_r2": sol.val_r2, "best": sol.best, "best_site": sol.best_site, "norm": sol.norm, "n_fit": sol.n_fit,
        "latent_penalty": {t: [sol.penalties[UNET][t].get((LATENT, s)) for s in range(ctx.config.steps)] for t in ctx.layout.tasks},
        "prompts": sol.prompts, "prompt_threshold": sol.prompt_threshold,
    }
    _write_text(ctx.work / "solution.json", ev.dumps(info))


def load_solution(ctx: RunContext) -> Solution:
    """Read what :func:`save_solution` wrote (every evaluation process reads it from disk)."""
    info = json.loads((ctx.work / "solution.json").read_text())
    tensors = load_file(str(ctx.work / "solution.safetensors"))
    weights: dict = {}
    groups = [UNET] + ([PERMUTED] if ctx.config.permuted else [])
    for group in groups:
        weights[group] = {}
        banks = load_probe_dir(ctx.out if group == UNET else ctx.work / "permuted", expect_sites=ctx.sites, tasks=ctx.layout.tasks)
        for task in ctx.layout.tasks:
            bank = banks[task]
            weights[group][task] = {k: (bank.weights[k], bank.biases[k]) for k in bank.keys()}
    for name, tensor in tensors.items():
        parts = name.split("/")
        if parts[0] == "latent" and parts[3] == "weight":
            task, step = parts[1], int(parts[2])
            weights[UNET][task][(LATENT, step)] = (tensor, tensors[f"latent/{task}/{parts[2]}/bias"])
    priors = {name.split("/")[1]: t for name, t in tensors.items() if name.startswith("prior/")}
    prompt = {kind: {name.split("/")[2]: t for name, t in tensors.items() if name.startswith(f"prompt/{kind}/")}
              for kind in ("fit", "train", "train_prior")}
    nan_fix = lambda d: {g: {t: {s: [math.nan if v is None else v for v in vals] for s, vals in st.items()} for t, st in gd.items()} for g, gd in d.items()}  # noqa: E731
    return Solution(
        weights=weights, penalties={}, val_r2=nan_fix(info["val_r2"]), best=info["best"], best_site=info["best_site"],
        norm={t: tuple(v) for t, v in info["norm"].items()}, priors=priors, n_fit=info["n_fit"],
        prompts=info["prompts"], prompt_maps=prompt["fit"], train_prompt_maps=prompt["train"],
        train_priors=prompt["train_prior"], prompt_threshold=info["prompt_threshold"],
    )


#: Thresholds on the ridge foreground prediction p (targets are cell fractions in [0, 1]) that
#: the calibration tries; 0.5 is the uncalibrated argmax.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 13))


def calibrate_foreground(ctx: RunContext, sol: Solution, progress: bool = True) -> None:
    """Choose each foreground probe's decision threshold on the validation images and fold it into the bias.

    A ridge probe regresses each token's foreground fraction; objects cover a small part of the
    image, so its predictions shrink towards the background and ``p > 0.5`` under-segments. The
    threshold that maximises mean Dice on the validation images (never the test split) is chosen
    per (site, step), for the latent and permuted-UNet baselines too, so every row of the table
    gets the same treatment; the prediction is upsampled bilinearly to the labels' resolution
    before thresholding (:func:`~.evaluate.foreground_mask`), as on the test images. The
    prompt-only baseline's threshold is chosen on the same images by the same rule, from the
    train images' per-prompt means (a validation image never votes for its own map). The
    thresholds go to ``work/calibration.json``; a resumed run reuses them. Edits ``sol`` in place
    and saves it.
    """
    if "foreground" not in ctx.layout.tasks:
        return
    path = ctx.work / "calibration.json"
    groups = [g for g in (UNET, PERMUTED) if g in sol.weights]
    if path.exists():
        saved = json.loads(path.read_text())
        thresholds = {g: {(k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])): v for k, v in saved[g].items()} for g in groups}
        prompt_threshold = saved["prompt_only"]
    else:
        grid = torch.tensor(THRESHOLD_GRID, dtype=torch.float64)
        size = ctx.image_size
        sums = {g: {} for g in groups}
        readouts = {g: _Readout(ctx, {"foreground": sol.weights[g]["foreground"]}, sol) for g in groups}
        records = [r for r in ctx.records if r.split == "val"]
        index = {p: k for k, p in enumerate(sol.prompts)}
        prompt_maps, masks = [], []
        for record in tqdm(records, desc="calibrate foreground", disable=not progress, unit="img"):
            trace = generate_trace(ctx, record)
            label = torch.from_numpy(label_images(ctx, trace.image[None], [record.seed])["foreground"][0] > 0.5)
            masks.append(label)
            prompt_maps.append(ctl.prompt_map(record.prompt, index, sol.train_prompt_maps["foreground"],
                                              sol.train_priors["foreground"])[0])
            sources = {UNET: {**trace.acts, **({LATENT: _latent_tokens(trace.inputs)} if ctx.config.latent_baseline else {})}}
            if PERMUTED in groups:
                sources[PERMUTED] = permuted_acts(ctx, trace)
            for group, acts in sources.items():
                for key, x in acts.items():
                    hw = ctx.latent_hw if key == LATENT else next((i.height, i.width) for i in ctx.sites if i.key == key)
                    z = readouts[group].logits(key, x).cpu().to(torch.float64)  # [S, T, 2]
                    p = ((z[..., 1] - z[..., 0] + 1) / 2).reshape(-1, *hw)  # the ridge prediction of the cell fraction
                    full = ev.upsample(p, size)  # [S, H, W]
                    for step in range(x.shape[0]):
                        dice = torch.from_numpy(ev.dice_rows(full[step][None] > grid[:, None, None], label))
                        sums[group][(key, step)] = sums[group].get((key, step), 0) + dice
        thresholds = {g: {k: THRESHOLD_GRID[int(torch.argmax(v))] for k, v in sums[g].items()} for g in groups}
        prompt_threshold, _ = ctl.choose_threshold(torch.stack(prompt_maps).to(torch.float64),
                                                   torch.stack(masks).to(torch.float64), THRESHOLD_GRID)
        saved = {g: {f"{k}@{t}": v for (k, t), v in thresholds[g].items()} for g in groups}
        _write_text(path, json.dumps({**saved, "prompt_only": prompt_threshold}, indent=1))
    for group in groups:
        for key, tau in thresholds[group].items():
            w, b = sol.weights[group]["foreground"][key]
            shift = (2 * tau - 1) / 2  # margin z1 - z0 = 2p - 1 must exceed 2 * tau - 1
            sol.weights[group]["foreground"][key] = (w, b + torch.tensor([shift, -shift], dtype=b.dtype))
    sol.thresholds = thresholds
    sol.prompt_threshold = float(prompt_threshold)
    save_solution(ctx, sol)


# --- the paper's Adam trainer, for comparison -----------------------------------------------

def train_adam_probes(ctx: RunContext, sol: Solution, progress: bool = True) -> dict[str, Any]:
    """Fit Adam probes (the paper's trainer) and ridge probes on the same kept activations.

    Uses the first ``adam_images`` fitting images' activations at ``adam_keys`` (saved during the
    fit pass). Ridge uses the penalty chosen for that (task, site, step) in the main fit. Saves
    ``work/adam.safetensors`` (both kinds of weights) and returns timing and sizes.
    """
    c = ctx.config
    keys = ctx.adam_keys
    indices = sorted(ctx.adam_indices)
    if not keys or not indices:
        return {}
    files = [load_file(str(ctx.work / "adam" / f"{i:06d}.safetensors")) for i in indices]
    out: dict[str, torch.Tensor] = {}
    seconds = {"adam": 0.0, "ridge": 0.0}
    cols = ctx.layout.columns
    for site, step in tqdm(keys, desc="adam vs ridge", disable=not progress):
        acts = torch.stack([f[f"{site}.step{step:02d}.act"] for f in files])  # [N, T, C] fp16
        for task in ctx.layout.tasks:
            y = torch.stack([f[f"{site}.{task}"] for f in files]).to(torch.float64)  # [N, T] raw
            mean, std = sol.norm[task]
            y_norm = y if task == "foreground" else (y - mean) / std
            t0 = time.perf_counter()
            stats = RidgeStats(acts.shape[2], task_outputs(task))
            for a, t in zip(acts, y):
                stats.update(a.to(torch.float64), ridge_targets(task, t))
            penalty = sol_penalty(ctx, sol, task, site, step)
            w, b = stats.solve(penalty)
            if task != "foreground":
                w, b = to_normalised(w, b, mean, std)
            seconds["ridge"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            wa, _ = train_adam(acts, y_norm.to(torch.float32), task, epochs=c.adam_epochs, seed=c.seed)
            seconds["adam"] += time.perf_counter() - t0
            stem = f"{task}/{site}/{step:03d}"
            out[f"ridge/{stem}/weight"], out[f"ridge/{stem}/bias"] = w.contiguous(), b.contiguous()
            out[f"adam/{stem}/weight"] = wa.contiguous()
            out[f"adam/{stem}/bias"] = torch.zeros(wa.shape[0])
    meta = {"n_images": len(indices), "epochs": c.adam_epochs, "lr": 1e-3, "batch_size": 4, "seconds": seconds}
    save_file(out, str(ctx.work / "adam.safetensors"), metadata={_META_KEY: json.dumps(meta)})
    return meta


def sol_penalty(ctx: RunContext, sol: Solution, task: str, site: str, step: int) -> float:
    """The penalty chosen for ``(task, site, step)`` (from memory, or the saved bank's metadata)."""
    if sol.penalties:
        return sol.penalties[UNET][task][(site, step)]
    bank = ProbeBank.load(probe_path(ctx.out, task))
    return float(bank.meta.training["penalty"][tensor_name(site, step, "weight")[: -len(".weight")]])


def _load_adam(ctx: RunContext) -> tuple[dict[str, dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]]], dict]:
    path = ctx.work / "adam.safetensors"
    if not path.exists():
        return {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[_META_KEY])
    tensors = load_file(str(path))
    out: dict = {"adam": {}, "ridge": {}}
    for name, tensor in tensors.items():
        kind, task, site, step, what = name.split("/")
        if what == "weight":
            out[kind][(task, site, int(step))] = (tensor, tensors[f"{kind}/{task}/{site}/{step}/bias"])
    return out, meta


# --- evaluation -----------------------------------------------------------------------------

class _Readout:
    """Stacked probe weights for fast readouts of one group at every (site, step)."""

    def __init__(self, ctx: RunContext, weights: dict[str, dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]], sol: Solution):
        self.layout = Layout(tuple(t for t in ctx.layout.tasks if t in weights))
        self.steps = ctx.config.steps
        device = ctx.model.device
        self.w: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        keys = {k[0] for k in next(iter(weights.values()))}
        for key in keys:
            ws, bs = [], []
            for step in range(self.steps):
                ws.append(torch.cat([weights[t][(key, step)][0] for t in self.layout.tasks]))
                bs.append(torch.cat([weights[t][(key, step)][1] for t in self.layout.tasks]))
            self.w[key] = torch.stack(ws).to(device=device, dtype=torch.float32)  # [S, K, C]
            self.b[key] = torch.stack(bs).to(device=device, dtype=torch.float32)  # [S, K]
        scale, shift = [], []
        for t in self.layout.tasks:
            mean, std = sol.norm[t]
            k = task_outputs(t)
            scale += [1.0 if t == "foreground" else std] * k
            shift += [0.0 if t == "foreground" else mean] * k
        self.scale = torch.tensor(scale, device=device)
        self.shift = torch.tensor(shift, device=device)

    def logits(self, key: str, acts: torch.Tensor) -> torch.Tensor:
        """The probes' raw outputs ``[S, T, K]`` for ``acts`` ``[S, T, C]`` (all steps at once)."""
        return torch.einsum("stc,skc->stk", acts.to(torch.float32), self.w[key]) + self.b[key][:, None, :]

    def maps(self, key: str, acts: torch.Tensor, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Readouts on the token grid ``{task: [S, h, w]}``: depth/shading in label units; foreground
        the logit margin ``z1 - z0`` (:data:`FOREGROUND_THRESHOLD`: foreground above 0).

        The margin, not the softmax probability, is what is upsampled: it is linear in the
        activations (``2 (p - threshold)`` for a calibrated ridge probe), so its bilinear upsampling
        above 0 is exactly the upsampled ridge prediction above the threshold chosen on validation.
        """
        z = self.logits(key, acts)
        z = z * self.scale + self.shift
        z = z.reshape(z.shape[0], hw[0], hw[1], -1)
        out = {}
        for task, sl in self.layout.columns.items():
            if task == "foreground":
                out[task] = z[..., sl.start + 1] - z[..., sl.start]
            else:
                out[task] = z[..., sl.start]
        return out


#: Foreground readouts of probes are logit margins: the mask is the upsampled margin above 0.
FOREGROUND_THRESHOLD = 0.0


def _eval_path(ctx: RunContext, record: Record) -> Path:
    return ctx.work / "eval" / f"{record.index:06d}.npz"


def _pairs_path(ctx: RunContext, record: Record) -> Path:
    return ctx.work / "pairs" / f"{record.index:06d}.safetensors"


def _control_path(ctx: RunContext, record: Record) -> Path:
    return ctx.work / "control" / f"{record.index:06d}.npz"


def _score(ctx: RunContext, maps: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], priors: dict[str, torch.Tensor], ranks: dict,
           threshold: float = FOREGROUND_THRESHOLD) -> dict[str, np.ndarray]:
    """Score readouts ``{task: [M, h, w]}`` against one image's labels (``threshold``: the foreground one)."""
    out = {}
    for task, pred in maps.items():
        scores = ev.score_maps(task, pred, labels[task], priors.get(task) if task == "depth" else None, ranks[task], threshold)
        for name, v in scores.items():
            out[f"{task}/{name}"] = v
    return out


def eval_image(ctx: RunContext, sol: Solution, readouts: dict[str, _Readout], adam: dict, record: Record, previews: bool, example: bool) -> dict[str, np.ndarray]:
    """All scores for one test image: ``{"<source>/<task>/<score>": array}`` (see :func:`eval_pass`)."""
    device = ctx.model.device
    size = ctx.image_size
    trace = generate_trace(ctx, record)
    labels_np = {t: v[0] for t, v in label_images(ctx, trace.image[None], [record.seed]).items()}
    labels = {t: torch.from_numpy(v).to(device) for t, v in labels_np.items()}
    priors = {t: p.to(device) for t, p in sol.priors.items()}
    ranks = {t: ev.target_ranks_for(t, labels[t], priors.get(t) if t == "depth" else None) for t in labels}
    out: dict[str, np.ndarray] = {}
    steps = ctx.config.steps
    example_maps: dict[str, np.ndarray] = {}

    def add(prefix: str, scores: dict[str, np.ndarray], row: int | None = None, rows: int | None = None) -> None:
        for name, v in scores.items():
            key = f"{prefix}/{name}"
            if row is None:
                out[key] = v
            else:
                out.setdefault(key, np.full((rows, steps), np.nan))[row] = v

    # probes at every site, and the permuted control (scored without the residual, which is
    # computed below at its validation-chosen site per step only)
    perm = permuted_acts(ctx, trace) if ctx.config.permuted else None
    perm_maps: dict[str, dict[str, torch.Tensor]] = {}
    # an image with same-prompt partners keeps its readouts and labels for the control pass
    pairs: dict[str, torch.Tensor] | None = {} if ctx.test_partners.get(record.index) else None
    for row, info in enumerate(ctx.sites):
        hw = (info.height, info.width)
        maps = readouts[UNET].maps(info.key, trace.acts[info.key], hw)
        add("probe", _score(ctx, maps, labels, priors, ranks), row, len(ctx.sites))
        if pairs is not None:
            for task, v in maps.items():
                pairs[f"pred/{task}/{info.key}"] = v.to(torch.float32).cpu().contiguous()
        if example:
            for task in ctx.layout.tasks:
                if sol.best_site.get(task) == info.key:
                    shown = torch.sigmoid(maps[task]) if task == "foreground" else maps[task]  # margin -> probability
                    example_maps[f"probe/{task}"] = shown.cpu().numpy().astype(np.float32)
        if perm is not None:
            perm_maps[info.key] = readouts[PERMUTED].maps(info.key, perm[info.key], hw)
            add("permuted", _score(ctx, perm_maps[info.key], labels, {}, ranks), row, len(ctx.sites))
    if perm is not None and "depth" in labels:
        best = sol.best[PERMUTED]["depth"]
        stack = torch.stack([ev.upsample(perm_maps[best[t]]["depth"][t : t + 1], size)[0] for t in range(steps)])
        res = ev.score_maps("depth", stack, labels["depth"], priors["depth"], ranks["depth"])["residual"]
        out["permuted_best/depth/residual"] = res
    if ctx.config.latent_baseline:
        maps = readouts[LATENT].maps(LATENT, _latent_tokens(trace.inputs), ctx.latent_hw)
        add("latent", _score(ctx, maps, labels, priors, ranks))
    # the layout prior, the same map at every step (foreground: the mean mask above 0.5)
    pmaps = {t: priors[t][None] for t in ctx.layout.tasks}
    prior_scores = {k: np.repeat(v, steps) for k, v in _score(ctx, pmaps, labels, priors, ranks, 0.5).items()}
    if "depth/residual" in prior_scores:
        # prior minus prior is constant: no rank information, score 0 by definition
        prior_scores["depth/residual"] = np.zeros(steps)
    add("prior", prior_scores)
    # the prompt-only map (the fitting images' mean label for this prompt), the same at every step
    prompt_scores: dict[str, np.ndarray] = {}
    for task in ctx.layout.tasks:
        pmap, seen = sol.prompt_only(task, record.prompt)
        tau = sol.prompt_threshold if sol.prompt_threshold is not None else 0.5
        scores = _score(ctx, {task: pmap.to(device)[None]}, labels, priors, ranks, tau)
        if not seen and f"{task}/residual" in scores:
            scores[f"{task}/residual"] = np.zeros(1)  # the prior's own map: 0 by definition, as above
        prompt_scores.update({k: np.repeat(v, steps) for k, v in scores.items()})
    add("prompt_only", prompt_scores)
    # the grid ceiling of each site: the exact label pooled to its grid and upsampled back
    grids = [(i.height, i.width) for i in ctx.sites]
    for task in ctx.layout.tasks:
        by_grid = ctl.grid_ceiling_scores(task, labels[task], grids, priors.get(task) if task == "depth" else None, ranks[task])
        for name in next(iter(by_grid.values())):
            out[f"ceiling/{task}/{name}"] = np.array([by_grid[hw][name] for hw in grids])
    # the labeler on each step's decoded x0 preview
    if previews or example:
        preview_images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in decode(ctx.model, trace.x0)])
        if example:
            example_maps["x0"] = preview_images
        if previews and getattr(ctx.labeler, "labels_any_image", True):
            plabels = label_images(ctx, preview_images, None)
            pmaps = {t: torch.from_numpy(v).to(device) for t, v in plabels.items()}
            add("x0", _score(ctx, pmaps, labels, priors, ranks, 0.5))
    # Adam vs ridge at the chosen keys
    for kind, probes in adam.items():
        for (task, site, step), (w, b) in probes.items():
            info = next(i for i in ctx.sites if i.key == site)
            z = trace.acts[site][step].to(torch.float32) @ w.to(device).T + b.to(device)  # [T, K]
            mean, std = sol.norm[task]
            z = z.reshape(1, info.height, info.width, -1)
            pred = z[..., 1] - z[..., 0] if task == "foreground" else z[..., 0] * std + mean
            s = ev.score_maps(task, pred, labels[task], None, ranks[task], FOREGROUND_THRESHOLD)
            out[f"{kind}/{task}/{site}@{step}"] = np.asarray(s["score"])
    if example:
        example_maps["image"] = trace.image
        for t, v in labels_np.items():
            example_maps[f"label/{t}"] = v
        path = ctx.work / "examples" / f"{record.index:06d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **example_maps)
    if pairs is not None:
        for t, v in labels_np.items():
            pairs[f"label/{t}"] = torch.from_numpy(v).contiguous()
        path = _pairs_path(ctx, record)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(pairs, str(tmp))
        os.replace(tmp, path)
    out["seconds/generate"] = np.asarray(trace.seconds)
    return out


def eval_pass(ctx: RunContext, shard: Shard = Shard(), limit: int | None = None, progress: bool = True) -> int:
    """Score this shard's test images, one ``work/eval/<index>.npz`` each; done images are skipped.

    Returns the number of images scored now. ``limit`` stops after that many.
    """
    sol = load_solution(ctx)
    readouts = {UNET: _Readout(ctx, {t: {k: v for k, v in kv.items() if k[0] != LATENT} for t, kv in sol.weights[UNET].items()}, sol)}
    if ctx.config.latent_baseline:
        readouts[LATENT] = _Readout(ctx, {t: {k: v for k, v in kv.items() if k[0] == LATENT} for t, kv in sol.weights[UNET].items()}, sol)
    if ctx.config.permuted:
        readouts[PERMUTED] = _Readout(ctx, sol.weights[PERMUTED], sol)
    adam, _ = _load_adam(ctx)
    tests = ctx.test_records
    cap = len(tests) if ctx.config.preview_images is None else ctx.config.preview_images
    with_previews = {r.index for r in tests[:cap]}
    examples = {r.index for r in tests[: ctx.config.n_examples]}
    mine = shard.select(tests)
    todo = [r for r in mine if not _eval_path(ctx, r).exists()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"test {shard.tag}", disable=not progress, unit="img")
    done = 0
    try:
        for record in todo:
            if limit is not None and done >= limit:
                break
            t0 = time.perf_counter()
            scores = eval_image(ctx, sol, readouts, adam, record, record.index in with_previews, record.index in examples)
            scores["seconds/total"] = np.asarray(time.perf_counter() - t0)
            path = _eval_path(ctx, record)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, **scores)
            os.replace(tmp, path)
            done += 1
            bar.update(1)
    finally:
        bar.close()
    return done


def control_pass(ctx: RunContext, shard: Shard = Shard(), progress: bool = True) -> int:
    """The same-prompt control for this shard's test images, one ``work/control/<index>.npz`` each.

    Needs every test image evaluated (:func:`eval_pass` keeps the readouts and labels of each image
    that shares its prompt with another test image in ``work/pairs/``). Each image's probe readouts,
    at every site and step, are scored against the labels of the *other* test images with its
    prompt, exactly as against its own, and averaged over them (:func:`~.controls.partner_scores`):
    ``control/<task>/<score>`` ``[sites, steps]``. Done images are skipped; returns how many were
    scored now. Images without partners get no file (their control is undefined: nan).
    """
    partners = ctx.test_partners
    mine = [r for r in shard.select(ctx.test_records) if partners.get(r.index)]
    todo = [r for r in mine if not _control_path(ctx, r).exists()]
    if not todo:
        return 0
    missing = [r.index for r in ctx.test_records if partners.get(r.index) and not _pairs_path(ctx, r).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} test images have no kept readouts yet (e.g. index {missing[0]}); finish the evaluation first")
    sol = load_solution(ctx)
    device = ctx.model.device
    priors = {t: p.to(device) for t, p in sol.priors.items()}
    groups: dict[str, list[Record]] = {}
    for record in todo:
        groups.setdefault(record.prompt, []).append(record)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"same-prompt control {shard.tag}", disable=not progress, unit="img")
    done = 0
    try:
        for prompt, records in groups.items():
            members = [r for r in ctx.test_records if r.prompt == prompt]
            labels = {t: [] for t in ctx.layout.tasks}
            for r in members:
                kept = load_file(str(_pairs_path(ctx, r)))
                for t in ctx.layout.tasks:
                    labels[t].append(kept[f"label/{t}"])
            labels = {t: torch.stack(v).to(device) for t, v in labels.items()}
            ranks = {t: ev.target_ranks_for(t, labels[t], priors.get(t) if t == "depth" else None) for t in labels}
            for record in records:
                kept = load_file(str(_pairs_path(ctx, record)), device=str(device))
                others = [j for j, r in enumerate(members) if r.index != record.index]
                scores: dict[str, np.ndarray] = {}
                for row, info in enumerate(ctx.sites):
                    for task in ctx.layout.tasks:
                        prior = priors.get(task) if task == "depth" else None
                        sub = {k: v[others] for k, v in ranks[task].items()}
                        got = ctl.partner_scores(task, kept[f"pred/{task}/{info.key}"], labels[task][others], prior, sub,
                                                 FOREGROUND_THRESHOLD)
                        for name, v in got.items():
                            scores.setdefault(f"control/{task}/{name}", np.full((len(ctx.sites), ctx.config.steps), np.nan))[row] = v
                path = _control_path(ctx, record)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.stem + ".tmp.npz")
                np.savez(tmp, **scores)
                os.replace(tmp, path)
                done += 1
                bar.update(1)
    finally:
        bar.close()
    return done


# --- report -----------------------------------------------------------------------------------

def _collect(ctx: RunContext) -> dict[str, np.ndarray]:
    """Per-image score files stacked: ``{name: [n_test, ...]}``."""
    missing = [r.index for r in ctx.test_records if not _eval_path(ctx, r).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} test images are not evaluated yet (e.g. index {missing[0]}); rerun to finish")
    images = []
    partners = ctx.test_partners
    for record in ctx.test_records:
        with np.load(_eval_path(ctx, record)) as f:
            scores = {name: f[name] for name in f.files}
        if partners.get(record.index):
            path = _control_path(ctx, record)
            if not path.exists():
                raise RuntimeError(f"test image {record.index} has no same-prompt control yet; rerun to finish")
            with np.load(path) as f:
                scores.update({name: f[name] for name in f.files})
        images.append(scores)
    shapes = {name: v.shape for scores in images for name, v in scores.items()}
    # an image without a baseline (e.g. no x0 previews beyond preview_images) counts as nan there
    return {name: np.stack([s.get(name, np.full(shape, np.nan)) for s in images]) for name, shape in shapes.items()}


def report(ctx: RunContext, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Aggregate the per-image scores into ``metrics.json``, figures and ``README.md`` in ``out``."""

    sol = load_solution(ctx)
    stacked = _collect(ctx)
    _, adam_meta = _load_adam(ctx)
    metrics = rep.build_metrics(ctx, sol, stacked, adam_meta)
    if extra:
        metrics.update(extra)
    ctx.out.mkdir(parents=True, exist_ok=True)
    _write_text(ctx.out / "metrics.json", ev.dumps(metrics))
    metrics = json.loads((ctx.out / "metrics.json").read_text())
    examples = []
    for record in ctx.test_records[: ctx.config.n_examples]:
        path = ctx.work / "examples" / f"{record.index:06d}.npz"
        if path.exists() and ctx.config.figures:
            with np.load(path) as f:
                examples.append({"seed": record.seed, "prompt": record.prompt, **{k: f[k] for k in f.files}})
    if ctx.config.figures:
        from .. import viz
        from .figures import controls_figure

        viz.write_probe_figures(metrics, examples, ctx.out)
        viz.save_figure(controls_figure(metrics), ctx.out / "controls.png")
    _write_text(ctx.out / "README.md", rep.render_readme(metrics))
    return metrics


def _timings(ctx: RunContext, world: int) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    n = 0
    for rank in range(world):
        path = _fit_path(ctx, Shard(rank, world))
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()[_META_KEY])
            n += int(meta["done"])
            for k, v in meta["seconds"].items():
                seconds[k] = seconds.get(k, 0.0) + v
    out: dict[str, Any] = {}
    if n:
        gen = seconds.get("generate", 0.0)
        total = sum(seconds.values())
        out["fit_seconds_per_image"] = total / n
        out["fit_generation_seconds_per_image"] = gen / n
        out["fit_update_over_generation"] = seconds.get("update", 0.0) / gen if gen else None
        if "permuted_forward" in seconds:
            out["permuted_control_over_generation"] = (seconds["permuted_forward"] + seconds["permuted_update"]) / gen if gen else None
    evals = [_eval_path(ctx, r) for r in ctx.test_records]
    totals = []
    for p in evals:
        if p.exists():
            with np.load(p) as f:
                totals.append(float(f["seconds/total"]))
    if totals:
        out["eval_seconds_per_image"] = float(np.mean(totals))
    out["devices"] = world
    out["device"] = str(ctx.model.device)
    return out


# --- the whole run ----------------------------------------------------------------------------

def run(
    config: RunConfig,
    labeler: Labeler | None = None,
    model: Model | None = None,
    shard: Shard | None = None,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Fit, evaluate and report. With ``shard``/``barrier`` (from ``accelerate``) each process does
    its share of both passes and rank 0 merges, solves and reports. Returns the metrics on rank 0.
    """
    shard = shard or Shard()
    barrier = barrier or (lambda: None)
    ctx = prepare(config, labeler, model)
    fit_pass(ctx, shard, progress=progress)
    barrier()
    if shard.is_main:
        state = merge_fits(ctx, shard.world)
        solution = solve(ctx, state, progress=progress)
        calibrate_foreground(ctx, solution, progress=progress)
        train_adam_probes(ctx, solution, progress=progress)
    barrier()
    eval_pass(ctx, shard, progress=progress)
    barrier()
    control_pass(ctx, shard, progress=progress)
    barrier()
    if not shard.is_main:
        return None
    return report(ctx, extra={"timings": _timings(ctx, shard.world)})
