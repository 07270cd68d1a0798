"""Step-aware hooks on a UNet's self-attention sites: record, reduce or edit their outputs.

Hooks are global state on the module tree, so they are added in one place (:func:`hook_sites`)
and removed in its ``finally``: on normal exit, on an exception and when a generator that holds
the context is closed early (``GeneratorExit``). A forward-pre-hook on the UNet counts its calls,
which are the denoising steps (one call per step, the guidance batch included).

With classifier-free guidance, diffusers stacks the batch as ``[uncond, cond]``; only the
conditional half is passed to callbacks, split with ``chunk(2)``, and an edit is written back into
that half only, in the activation's original dtype and device.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
from torch import nn

from .sites import SITE_KEYS, module_path

#: A callback over one site's conditional activation ``[B, T, C]`` at one step. ``hook_sites``
#: writes back a returned tensor (same shape) and ignores ``None``.
SiteFn = Callable[[str, int, torch.Tensor], "torch.Tensor | None"]


@dataclass
class StepCounter:
    """The 0-based index of the UNet call in progress (-1 before the first call)."""

    step: int = -1

    def _on_unet_call(self, module: nn.Module, args: Any) -> None:
        self.step += 1


def _check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in sites if s not in SITE_KEYS]
    if unknown:
        raise KeyError(f"unknown site(s) {unknown}; known sites: {', '.join(SITE_KEYS)}")
    return tuple(sites)


@contextmanager
def hook_sites(
    unet: nn.Module,
    sites: Sequence[str],
    fn: SiteFn,
    steps: Collection[int] | None = None,
    split_guidance: bool = True,
    layer: str = "attn1",
) -> Iterator[StepCounter]:
    """Call ``fn(site, step, cond_activation)`` on each chosen site's output at each chosen step.

    ``layer`` picks the block's self-attention (``attn1``, the default) or its cross-attention
    (``attn2``). ``steps=None`` means every step. ``split_guidance`` says the UNet batch is ``[uncond, cond]``
    (classifier-free guidance on); then ``fn`` sees the second half and a returned tensor replaces
    that half only. Yields the :class:`StepCounter`, whose ``step`` is the UNet call in progress.
    """
    sites = _check_sites(sites)
    wanted = None if steps is None else frozenset(int(s) for s in steps)
    counter = StepCounter()
    modules = {site: unet.get_submodule(module_path(site, layer)) for site in sites}

    def make_hook(site: str) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor | None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            step = counter.step
            if wanted is not None and step not in wanted:
                return None
            if split_guidance:
                if output.shape[0] % 2:
                    raise RuntimeError(
                        f"{site}: batch of {output.shape[0]} cannot be split into [uncond, cond]; "
                        "pass split_guidance=False when guidance is off"
                    )
                uncond, cond = output.chunk(2)
            else:
                uncond, cond = None, output
            new = fn(site, step, cond)
            if new is None:
                return None
            if new.shape != cond.shape:
                raise RuntimeError(f"{site}: edit returned shape {tuple(new.shape)}, expected {tuple(cond.shape)}")
            new = new.to(dtype=output.dtype, device=output.device)
            return new if uncond is None else torch.cat([uncond, new])

        return hook

    with ExitStack() as stack:
        stack.callback(unet.register_forward_pre_hook(counter._on_unet_call).remove)
        for site, module in modules.items():
            stack.callback(module.register_forward_hook(make_hook(site)).remove)
        yield counter


#: A callback over one cross-attention site's attention probabilities ``[B, heads, T, L]`` at one
#: step (conditional half, ``T`` image tokens, ``L`` text tokens; each row sums to 1 over ``L``).
AttentionFn = Callable[[str, int, torch.Tensor], None]


def attention_probabilities(attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """Recompute a diffusers ``Attention`` module's softmax ``[B, heads, T, L]`` from its inputs, in float32.

    The processors hand out only the attended values (``scaled_dot_product_attention`` never
    forms the probabilities), so the query and key projections are applied again. Refuses the
    module variants this recomputation does not follow (attention masks are refused by the caller;
    group, spatial and cross normalisation), rather than returning maps the UNet did not use.
    """
    if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None \
            or getattr(attn, "norm_cross", None):
        raise RuntimeError("attention maps: the module normalises its inputs (group/spatial/cross norm), "
                           "which this reader does not reproduce")
    if hidden_states.ndim != 3:
        raise RuntimeError(f"attention maps: expected tokens [B, T, C], got shape {tuple(hidden_states.shape)}")
    context = hidden_states if context is None else context
    query, key = attn.to_q(hidden_states), attn.to_k(context)
    b, heads = query.shape[0], attn.heads
    query = query.view(b, -1, heads, query.shape[-1] // heads).transpose(1, 2)
    key = key.view(b, -1, heads, key.shape[-1] // heads).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    scores = (query.float() @ key.float().transpose(-1, -2)) * float(attn.scale)
    return scores.softmax(-1)


@contextmanager
def hook_attention(
    unet: nn.Module,
    sites: Sequence[str],
    fn: AttentionFn,
    steps: Collection[int] | None = None,
    split_guidance: bool = True,
    layer: str = "attn2",
) -> Iterator[StepCounter]:
    """Call ``fn(site, step, probs)`` with each chosen site's attention probabilities at each chosen step.

    ``layer="attn2"`` (the default) is the block's cross-attention, whose keys are the prompt's
    tokens; ``attn1`` gives self-attention maps. Only the conditional half of a guidance batch is
    computed (``chunk(2)``). Nothing is written back: the UNet's output is untouched. Hooks are
    removed on exit, on error and when a generator holding this context is closed.
    """
    sites = _check_sites(sites)
    wanted = None if steps is None else frozenset(int(s) for s in steps)
    counter = StepCounter()
    modules = {site: unet.get_submodule(module_path(site, layer)) for site in sites}

    def make_hook(site: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            step = counter.step
            if wanted is not None and step not in wanted:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
            if mask is not None:
                raise RuntimeError(f"{site}: attention maps with an attention mask are not supported")
            if split_guidance:
                if hidden.shape[0] % 2:
                    raise RuntimeError(
                        f"{site}: batch of {hidden.shape[0]} cannot be split into [uncond, cond]; "
                        "pass split_guidance=False when guidance is off"
                    )
                hidden = hidden.chunk(2)[1]
                context = None if context is None else context.chunk(2)[1]
            with torch.no_grad():
                probs = attention_probabilities(module, hidden, context)
            fn(site, step, probs)
            return None

        return hook

    with ExitStack() as stack:
        stack.callback(unet.register_forward_pre_hook(counter._on_unet_call).remove)
        for site, module in modules.items():
            stack.callback(module.register_forward_hook(make_hook(site), with_kwargs=True).remove)
        yield counter


@dataclass
class Capture:
    """What :func:`capture` kept: ``values[(site, step)]`` is an activation or a reduction of it."""

    values: dict[tuple[str, int], Any] = field(default_factory=dict)
    counter: StepCounter | None = None

    def at(self, step: int) -> dict[str, Any]:
        """All sites' values at one step, keyed by site."""
        return {site: v for (site, s), v in self.values.items() if s == step}


@contextmanager
def capture(
    unet: nn.Module,
    sites: Sequence[str] = SITE_KEYS,
    steps: Collection[int] | None = None,
    reduce: Callable[[str, int, torch.Tensor], Any] | None = None,
    split_guidance: bool = True,
    to_cpu: bool = True,
    layer: str = "attn1",
) -> Iterator[Capture]:
    """Record the conditional output ``[B, T, C]`` of ``sites`` at ``steps`` (all steps if None).

    With ``reduce``, keep ``reduce(site, step, activation)`` instead of the activation, computed
    at once inside the forward pass, so nothing large outlives the step. Raw activations are
    detached and, with ``to_cpu``, moved to the CPU.
    """
    result = Capture()

    def keep(site: str, step: int, act: torch.Tensor) -> None:
        if reduce is not None:
            result.values[(site, step)] = reduce(site, step, act)
        else:
            act = act.detach()
            result.values[(site, step)] = act.cpu() if to_cpu else act.clone()
        return None

    with hook_sites(unet, sites, keep, steps, split_guidance, layer) as counter:
        result.counter = counter
        yield result


@contextmanager
def edit(
    unet: nn.Module,
    sites: Sequence[str],
    fn: Callable[[str, int, torch.Tensor], torch.Tensor],
    steps: Collection[int] | None = None,
    split_guidance: bool = True,
) -> Iterator[StepCounter]:
    """Replace the conditional output of ``sites`` at ``steps`` by ``fn(site, step, activation)``.

    ``fn`` must return a tensor of the activation's shape; dtype and device are restored.
    """
    with hook_sites(unet, sites, fn, steps, split_guidance) as counter:
        yield counter


def attached_hooks(module: nn.Module) -> int:
    """Count forward hooks and pre-hooks on ``module`` and all its children (0 when clean)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
