"""Load a Stable-Diffusion-compatible pipeline: a Hub id, a local directory, the toy or tiny model.

Every model ldm-scene works with is a diffusers ``StableDiffusionPipeline`` (unet, vae,
text_encoder, tokenizer, scheduler). :class:`Model` wraps one with what the rest of the package
asks of it: its id, device, dtype, image size and site table. Nothing here branches on which
model it is; sizes come from the configs.

diffusers and transformers are imported where a model is built, not when this module is: they
cost seconds (diffusers reaches ``torch._dynamo``), and the app serves its page before it loads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .bundle import SETTINGS_FILE, settings_path  # noqa: F401  (SETTINGS_FILE re-exported)
from .sites import SITE_KEYS, SiteInfo, site_table
from .tokenizer import word_tokenizer  # noqa: F401  (re-exported: the toy model and tests build tokenizers)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

#: The embedded toy model shipped with the repository.
TOY_MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "toy-scenes"
SD14_ID = "CompVis/stable-diffusion-v1-4"
#: Short names accepted wherever a model name is.
ALIASES = {"toy": str(TOY_MODEL_DIR), "sd14": SD14_ID}
#: Classifier-free guidance when a model does not recommend its own (the paper's and SD's 7.5).
PAPER_GUIDANCE = 7.5
#: Where a late guidance cap starts, as a fraction of the steps, when a setting does not say.
DEFAULT_LATE_FROM = 2 / 3


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class Model:
    """A loaded pipeline plus the facts about it that probes and the app rely on."""

    pipe: StableDiffusionPipeline
    model_id: str
    #: The local directory the model was loaded from (None for Hub ids and built models).
    directory: Path | None = None
    #: The guidance scale generations use unless told otherwise: the model directory's
    #: ``ldm_scene.json`` says (the toy model's was chosen by its guidance sweep), else 7.5.
    default_guidance: float = PAPER_GUIDANCE
    #: From ``late_from`` of the steps on, guidance is capped at ``late_guidance`` (None: never).
    late_guidance: float | None = None
    late_from: float = DEFAULT_LATE_FROM

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def image_size(self) -> tuple[int, int]:
        """Default (height, width) in pixels: the UNet's sample size times the VAE factor."""
        side = int(self.pipe.unet.config.sample_size) * self.vae_scale_factor
        return side, side

    @property
    def scheduler_name(self) -> str:
        """The sampler's class name, as probe metadata records it and probe loading checks it."""
        return type(self.pipe.scheduler).__name__

    def sites(self, image_size: tuple[int, int] | None = None, keys: Sequence[str] = SITE_KEYS) -> list[SiteInfo]:
        """The site table for this model at ``image_size`` (default: the model's own)."""
        return site_table(self.pipe.unet.config, image_size or self.image_size, self.vae_scale_factor, keys)

    def extra_dir(self, name: str) -> Path | None:
        """A folder shipped beside the model (``probes``, ``labelers``), if the model is local and has it."""
        path = self.directory / name if self.directory else None
        return path if path is not None and path.is_dir() else None

    def site(self, key: str, image_size: tuple[int, int] | None = None) -> SiteInfo:
        return self.sites(image_size, (key,))[0]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (as SD v1.4 is usually run), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Model:
    """Load a pipeline by Hub id, local ``from_pretrained`` directory, or alias.

    Aliases: ``"toy"`` (the embedded toy model), ``"sd14"`` (SD v1.4 on the Hub) and ``"tiny"``
    (random weights from :mod:`ldm_scene.testing`, for tests). CPU runs in float32 and CUDA in
    float16 unless ``dtype`` says otherwise. No safety checker is loaded. When the weights are
    not on disk and cannot be downloaded, raises :class:`ModelLoadError` saying how to get them.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelLoadError("model name is empty: give a Hub id, a local directory, 'toy' or 'tiny'")
    name = ALIASES.get(name_or_path, name_or_path)
    if name == "tiny":
        from .testing import tiny_pipeline

        pipe = tiny_pipeline()
    else:
        pipe = _from_pretrained(name, dtype)
    _use_papers_scheduler_for_pndm(pipe)
    pipe = pipe.to(device=device)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    directory = Path(name).resolve() if name != "tiny" and Path(name).is_dir() else None
    settings = read_settings(directory) if directory else {}
    late = settings.get("late_guidance")
    return Model(pipe, _local_id(directory) if directory else name, directory,
                 float(settings.get("guidance", PAPER_GUIDANCE)), None if late is None else float(late),
                 float(settings.get("late_from", DEFAULT_LATE_FROM)))


def read_settings(directory: Path) -> dict:
    """The model directory's ``ldm_scene.json`` (``{}`` when there is none), checked."""
    path = settings_path(directory)
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, e.g. {{\"guidance\": 4.0}}")
    for key, default, low, high in (("guidance", PAPER_GUIDANCE, 0.0, 30.0), ("late_guidance", None, 0.0, 30.0),
                                    ("late_from", DEFAULT_LATE_FROM, 0.0, 1.0)):
        value = settings.get(key, default)
        if value is None and default is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ModelLoadError(f"{path}: {key} must be a number between {low:g} and {high:g}, got {value!r}")
    return settings


def _use_papers_scheduler_for_pndm(pipe: StableDiffusionPipeline) -> None:
    """Replace PNDM (what SD v1.4's repository ships) with the paper's LMS, built from the same config.

    The paper generated with LMS; and PNDM calls the UNet 16 times for 15 steps (its first timestep
    twice), which would shift every step-indexed probe and readout by one. Other schedulers, like
    the toy model's Euler, are kept.
    """
    from diffusers import LMSDiscreteScheduler, PNDMScheduler

    if isinstance(pipe.scheduler, PNDMScheduler):
        pipe.scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)


def _local_id(path: Path) -> str:
    """A stable id for a local model: its directory name (toy-scenes), independent of the checkout."""
    return path.resolve().name


def _from_pretrained(name: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    path = Path(name)
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise ModelLoadError(f"model path {name!r} does not exist or is not a directory")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{name!r} is not a diffusers model directory (no model_index.json); "
                "expected unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json"
            )
        try:
            json.loads((path / "model_index.json").read_text())
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{path / 'model_index.json'} is not valid JSON: {err}") from err
    kwargs = dict(torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        return StableDiffusionPipeline.from_pretrained(name, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        if looks_local:
            raise ModelLoadError(f"could not load the model in {name!r}: {err}") from err
        how = (
            "the network is disabled (HF_HUB_OFFLINE=1)"
            if _is_offline()
            else "they could not be downloaded (no network, or the id is wrong)"
        )
        raise ModelLoadError(
            f"weights for {name!r} are not in the local Hugging Face cache and {how}. On a machine with "
            f"network, run `hf download {name}` (accept the model's licence on the Hub "
            "first), or pass a local directory. Without them, use the embedded toy model: "
            f"--model toy ({TOY_MODEL_DIR})."
        ) from err
