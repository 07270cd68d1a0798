"""Move the object: edit the denoising run so the scene's foreground follows a mask.

Without changing prompt, seed or weights, an editor rewrites the conditional half of chosen
sites' activations at chosen steps (through :mod:`ldm_scene.capture`, via the sampler), or the
latent itself, and denoising resumes from there. :mod:`ldm_scene.edit_methods` lists the methods
and builds their editors (``make_editor``); this module reads target masks, runs an edit
(:func:`intervene`), keeps the background, finds the object's current mask and serves the CLI.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import bundle
from .models import Model
from .probes import CLASS_MEANS, ProbeBank, class_means_bank, load_probe_dir  # noqa: F401  (class_means_bank re-exported)
# The editors and the methods' registry, re-exported: callers import the whole interface from here.
from .activation_editors import DEFAULT_STEPS, ProbeGradientEditor, SteerEditor, grid_target  # noqa: F401
from .edit_methods import (  # noqa: F401
    KEEP_MARGIN, MAX_STRENGTH, METHOD_BANKS, METHOD_DEFAULTS, METHODS, MOVE_KEEP_MARGIN, NEEDS_SOURCE,
    InterventionError, MethodDefaults, available_methods, default_edit_steps, make_editor,
)
from .intervention_methods import KeepBackground, guided_sample
from .sampler import GenerationConfig, Reader, StepState, config_for, decode, sample


def mask_values(mask: object) -> np.ndarray:
    """A mask's foreground strength per pixel, float32 ``[H, W]`` in [0, 1], from any image-like input.

    A 2-D array is read as it is (bool, 0/1, 0..255 or floats). An image with channels is read by
    its alpha when the alpha carries information (not fully opaque everywhere: strokes on a
    transparent layer, drawn = opaque); otherwise by brightness, the brightest channel, so white
    (or any bright colour) on black is foreground whether the file is greyscale, RGB or opaque RGBA.
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask)
    if not isinstance(mask, np.ndarray) or mask.size == 0:
        raise InterventionError("the mask is not an image: give a 2-D array or an image, white = foreground")
    arr = mask
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    elif not np.issubdtype(arr.dtype, np.number):
        raise InterventionError(f"the mask has dtype {arr.dtype}; expected numbers or booleans")
    if arr.ndim == 3 and arr.shape[-1] in (1, 2, 3, 4):
        channels = arr.shape[-1]
        alpha = arr[..., -1] if channels in (2, 4) else None
        opaque = 1.0 if arr.dtype.kind == "f" and float(np.nanmax(arr)) <= 1.0 else 255
        if alpha is not None and not np.all(alpha >= opaque):
            arr = alpha
        else:
            arr = arr[..., : 3 if channels >= 3 else 1].max(-1)
    if arr.ndim != 2:
        raise InterventionError(f"the mask must be 2-D (or a greyscale/RGB/RGBA image), got shape {mask.shape}")
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(arr.max())
    if peak > 1.0:
        arr = arr / 255.0 if peak <= 255.0 else arr / peak
    return arr.clip(0.0, 1.0)


def prepare_target(mask: object, size: tuple[int, int]) -> np.ndarray:
    """A drawn or computed mask of any size -> bool [H, W] at the model's image size.

    Reads the mask with :func:`mask_values` (white = foreground; drawn = opaque when the alpha
    says something). Refuses masks that are empty or cover the whole image, since neither says
    where the object should go.
    """
    arr = mask_values(mask)
    # Area-resize then threshold: a drawn stroke keeps its place whatever the canvas size.
    t = torch.from_numpy(arr)[None, None]
    resized = F.interpolate(t, size=size, mode="area")[0, 0].numpy() >= 0.5
    if not resized.any():
        raise InterventionError("the mask is empty: draw where the object should be (white = foreground)")
    if resized.all():
        raise InterventionError("the mask covers the whole image: leave some background")
    return resized


def translate_mask(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift a bool mask by (dx, dy) pixels (right, down), filling with background."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    if abs(dx) < w and abs(dy) < h:
        out[yd, xd] = mask[ys, xs]
    if not out.any():
        raise InterventionError(f"shifting by ({dx}, {dy}) moves the whole mask out of the image")
    return out



def intervene(
    model: Model,
    config: GenerationConfig,
    target: np.ndarray,
    method: str,
    banks: dict[str, ProbeBank],
    sites: Sequence[str] | None = None,
    steps: Collection[int] | None = None,
    strength: float = 1.0,
    previews: bool = True,
    readers: Sequence[Reader] = (),
    keep: KeepBackground | None = None,
    source: np.ndarray | None = None,
    locate: Callable[[torch.Tensor], "np.ndarray | None"] | None = None,
    editor: Any = None,
) -> Iterator[StepState]:
    """Stream the edited denoising of ``config`` (same prompt and seed) towards ``target``.

    ``target`` is a bool mask at the model's image size (see :func:`prepare_target`). The edit is
    applied through the sampler's editor hooks, which are removed when the stream ends, fails or
    is closed. ``readers`` read the edited run as they read :func:`~ldm_scene.sampler.sample`'s;
    they are hooked before the editor, so they see each site's activation as the UNet made it.
    ``keep`` (:class:`~ldm_scene.intervention_methods.KeepBackground`, from :func:`keep_background`)
    holds the unedited run's latents outside the object's old place and its target (for a method
    that moves the object, build it with the editor: :func:`keep_background`). ``source``: the
    object's current mask, for the methods in :data:`NEEDS_SOURCE`; ``locate``: how they find it
    again to correct the move (:func:`decoded_locator`; None: no correction). ``editor``: one already
    built by :func:`make_editor` from these same arguments and not yet used (a caller that built it up
    front, to refuse bad input before any model work and to size ``keep``, passes it on rather than
    building a second).
    """
    if target.shape != tuple(model.image_size):
        raise InterventionError(f"target mask is {target.shape}, the model draws {model.image_size}: use prepare_target")
    steps = default_edit_steps(config.steps, method) if steps is None else tuple(steps)
    bad = [s for s in steps if not 0 <= int(s) < config.steps]
    if bad:
        raise InterventionError(f"edit steps {bad} are outside the run's {config.steps} steps")
    if editor is None:
        editor = make_editor(method, banks, target, sites, steps, strength, config.seed, source, locate)
    return guided_sample(model, config, [editor], previews=previews, readers=readers, keep=keep)


def keep_background(reference: Sequence[torch.Tensor], source: np.ndarray | None, target: np.ndarray,
                    margin: int | None = None, editor: object = None, image: Image.Image | None = None) -> KeepBackground:
    """A :class:`~ldm_scene.intervention_methods.KeepBackground` for an edit from ``source`` (the
    object's mask in the unedited image; None: unknown) to ``target``; ``reference``: the unedited
    run's latent after each step (``StepState.latent``, same prompt and seed).

    ``editor``: the edit's editor, if it says more: a move frees where the object lands
    (``moved``, which reaches outside a drawn target of another shape) and the object's old place
    grown by its ``vacated_margin`` cells, and its ``keep_margin`` replaces :data:`KEEP_MARGIN`
    unless ``margin`` is given. ``image``: the unedited run's final image, pasted back on the edited
    one outside the free cells (:meth:`~ldm_scene.intervention_methods.KeepBackground.paste_back`).
    """
    free = np.asarray(target, bool) if source is None else np.asarray(source, bool) | np.asarray(target, bool)
    moved = getattr(editor, "moved", None)
    if moved is not None:
        free = free | np.asarray(moved, bool)
    if margin is None:
        margin = getattr(editor, "keep_margin", KEEP_MARGIN)
    vacated_margin = getattr(editor, "vacated_margin", None)
    if source is None or vacated_margin is None:
        return KeepBackground(list(reference), free, margin, image=image)
    return KeepBackground(list(reference), free, margin, vacated=np.asarray(source, bool), vacated_margin=vacated_margin,
                          image=image)


def load_intervention_banks(probe_dir, expect_sites=None, expect_scheduler: str | None = None) -> dict[str, ProbeBank]:
    """The foreground probe and the class means from a probe directory (whichever exist)."""
    return load_probe_dir(probe_dir, expect_sites=expect_sites, tasks=("foreground", CLASS_MEANS),
                          expect_scheduler=expect_scheduler)


def decoded_locator(model: Model, find: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], "np.ndarray | None"]:
    """Finds the object in a step's x0 prediction: ``find`` (an RGB uint8 ``[H, W, 3]`` image -> its
    object's mask at that size) on the x0 decoded by the model's VAE; None when it finds nothing.
    A move's correction (:attr:`~ldm_scene.latent_move.LatentMoveEditor.locate`) uses it."""

    def locate(x0: torch.Tensor) -> np.ndarray | None:
        image = np.asarray(decode(model, x0)[0].convert("RGB"))
        mask = np.asarray(find(image)) > 0.5
        return mask if mask.any() else None

    return locate


def labeler_locator(model: Model, labeler: Callable[[np.ndarray], dict]) -> Callable[[torch.Tensor], "np.ndarray | None"]:
    """:func:`decoded_locator` with a labeler (``[N, H, W, 3]`` images -> ``{"foreground": [N, H, W]}``,
    as the shipped toy labeler): the object is where its foreground exceeds 0.5."""
    return decoded_locator(model, lambda image: labeler(image[None])["foreground"][0])


def model_labeler(model: Model) -> Callable[[np.ndarray], dict] | None:
    """The labeler the model ships (None if it ships none), loaded once for every use in a run."""
    labeler_dir = model.extra_dir(bundle.LABELERS_DIR)
    return bundle.load_labeler(labeler_dir) if bundle.has_labeler(labeler_dir) else None


def model_locator(model: Model) -> Callable[[torch.Tensor], "np.ndarray | None"] | None:
    """:func:`labeler_locator` with the labeler the model ships (None if it ships none)."""
    labeler = model_labeler(model)
    return None if labeler is None else labeler_locator(model, labeler)


def current_foreground(
    model: Model, image: Image.Image, banks: dict[str, ProbeBank], config: GenerationConfig, editors: Sequence = (),
    labeler: Callable[[np.ndarray], dict] | None = None,
) -> np.ndarray:
    """The generated image's foreground: ``labeler``, by default the model's if it ships one, else the
    probe at the last step.

    Without a labeler the probe reads the run's own activations, so the run that made ``image``
    is replayed with the same ``editors``.
    """
    labeler = labeler if labeler is not None else model_labeler(model)
    if labeler is not None:
        return labeler(np.asarray(image))["mask"][0]
    if "foreground" not in banks:
        raise InterventionError("no labeler and no foreground probe to find the current object: pass --mask")
    from .capture import capture

    bank = banks["foreground"]
    last = config.steps - 1
    site = max(bank.meta.sites, key=lambda s: bank.meta.sites[s][1])  # the finest grid
    with capture(model.unet, [site], steps=[last], split_guidance=config.uses_guidance) as cap:
        for _ in guided_sample(model, config, editors, decode_final=False):
            pass
    return bank.readout(site, last, cap.values[(site, last)], model.image_size)[0] > 0.5


def side_by_side(images: Sequence[Image.Image], titles: Sequence[str], scale: int = 4) -> Image.Image:
    """Images in a row, upscaled, with a title above each."""
    from PIL import ImageDraw

    w, h = images[0].size
    w, h = w * scale, h * scale
    out = Image.new("RGB", (len(images) * (w + 8), h + 20), "white")
    draw = ImageDraw.Draw(out)
    for i, (im, title) in enumerate(zip(images, titles)):
        out.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (i * (w + 8), 20))
        draw.text((i * (w + 8) + 4, 4), title, fill="black")
    return out


def mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray((mask * 255).astype(np.uint8))


def run_cli(args) -> int:
    """``python -m ldm_scene intervene``: original, edited, target and result masks, side by side."""
    import json
    from pathlib import Path

    from . import metrics
    from .models import load_model

    model = load_model(args.model, device=args.device)
    config = config_for(model, args.prompt, args.seed, args.steps, args.guidance, args.late_guidance)
    probe_dir = Path(args.probes) if args.probes else model.extra_dir(bundle.PROBES_DIR)
    if probe_dir is None:
        raise InterventionError(f"{model.model_id} ships no probes/ folder: pass --probes DIR")
    banks = load_intervention_banks(probe_dir, expect_sites=model.sites(), expect_scheduler=model.scheduler_name)
    method = args.method or next(iter(available_methods(banks)), None)
    if method is None:
        raise InterventionError(f"{probe_dir} holds neither class means nor a foreground probe: no method can edit")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    states = list(sample(model, config))
    original = states[-1].image
    labeler = model_labeler(model)
    before = current_foreground(model, original, banks, config, labeler=labeler)
    if args.mask:
        target = prepare_target(Image.open(args.mask), model.image_size)
    else:
        target = translate_mask(before, args.dx, args.dy)
    edit_steps = default_edit_steps(config.steps, method)
    locate = None if labeler is None else labeler_locator(model, labeler)
    editor = make_editor(method, banks, target, None, edit_steps, 1.0, config.seed, before, locate)
    keep = (keep_background([s.latent for s in states], before, target, editor=editor, image=original)
            if args.keep_background else None)
    edited = [s.image for s in guided_sample(model, config, [editor], keep=keep)][-1]
    replay = make_editor(method, banks, target, None, edit_steps, 1.0, config.seed, before, locate)
    after = current_foreground(model, edited, banks, config, editors=[replay], labeler=labeler)
    for name, im in (("original.png", original), ("edited.png", edited), ("target_mask.png", mask_image(target)),
                     ("original_mask.png", mask_image(before)), ("result_mask.png", mask_image(after))):
        im.save(out / name)
    summary = {
        "prompt": config.prompt, "seed": config.seed, "method": method, "keep_background": bool(args.keep_background),
        "iou_result_target": metrics.iou(after, target), "iou_result_original": metrics.iou(after, before),
    }
    if getattr(editor, "locate", None) is not None:  # a move that corrects itself: by how much it did
        summary["corrections"] = [{"after_step": step + 1, "dx": round(dx, 2), "dy": round(dy, 2)}
                                  for step, dx, dy in editor.corrections]
    side_by_side([original, mask_image(before), mask_image(target), edited, mask_image(after)],
                 ["original", "its mask", "target", "edited", "result mask"]).save(out / "side_by_side.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0

