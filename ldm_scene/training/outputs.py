"""What a finished probe run writes: ``metrics.json``, figures and ``README.md``, and its timings."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from safetensors import safe_open

from .. import bundle
from . import evaluate as ev
from . import report as rep
from .readme import groups_page, render_readme
from .adam import load_adam
from .config import _META_KEY
from .context import RunContext, write_text
from .dataset import Shard
from .eval_pass import control_path, eval_path
from .fit_pass import fit_path
from .solve import load_solution


# --- report -----------------------------------------------------------------------------------

def _collect(ctx: RunContext) -> dict[str, np.ndarray]:
    """Per-image score files stacked: ``{name: [n_test, ...]}``."""
    missing = [r.index for r in ctx.test_records if not eval_path(ctx, r).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} test images are not evaluated yet (e.g. index {missing[0]}); rerun to finish")
    images = []
    partners = ctx.test_partners
    for record in ctx.test_records:
        with np.load(eval_path(ctx, record)) as f:
            scores = {name: f[name] for name in f.files}
        if partners.get(record.index):
            path = control_path(ctx, record)
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
    _, adam_meta = load_adam(ctx)
    metrics = rep.build_metrics(ctx, sol, stacked, adam_meta)
    if extra:
        metrics.update(extra)
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_text(bundle.metrics_path(ctx.out), ev.dumps(metrics))
    metrics = json.loads(bundle.metrics_path(ctx.out).read_text())
    examples = []
    for record in ctx.test_records[: ctx.config.n_examples]:
        path = ctx.work / "examples" / f"{record.index:06d}.npz"
        if path.exists() and ctx.config.figures:
            with np.load(path) as f:
                examples.append({"seed": record.seed, "prompt": record.prompt, **{k: f[k] for k in f.files}})
    if ctx.config.figures:
        from ..figures import controls_figure, save_figure, write_probe_figures

        write_probe_figures(metrics, examples, ctx.out)
        save_figure(controls_figure(metrics), ctx.out / "controls.png")
    write_text(ctx.out / "README.md", render_readme(metrics, groups=groups_page(ctx.out)))
    return metrics


def timings(ctx: RunContext, world: int) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    n = 0
    for rank in range(world):
        path = fit_path(ctx, Shard(rank, world))
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
    evals = [eval_path(ctx, r) for r in ctx.test_records]
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
