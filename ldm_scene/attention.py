"""Per-word cross-attention maps at every denoising step (a sampler reader).

DAAM (Tang et al. 2023) sums a prompt word's cross-attention over the whole run; here each step's
maps are read live, so a researcher can watch whether the layout comes from the words or from
self-attention (which the probes read). At each chosen site (a block's ``attn2``, whose keys are
the prompt's tokens), the conditional half's attention probabilities ``[B, heads, T, L]`` are
averaged over heads; a word's map is the probability mass its tokens receive at each image token,
reshaped to the site's grid. Probabilities are taken over all ``L`` text tokens (start, end and
padding included, which usually take most of the mass), so a word's value is its share of each
image token's attention.

Hooks come from :func:`ldm_scene.capture.hook_attention` through the sampler
(``AttentionReader.reads == "attention"``), so they are removed when the stream ends, fails or is
closed. Works for any UNet with SD v1.4's layout: grids come from each site's token count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .sites import SITE_KEYS


class AttentionError(ValueError):
    """A prompt or site choice the attention reader cannot map; the message says why."""


@dataclass(frozen=True)
class WordTokens:
    """Which positions of the encoded prompt belong to each word (position 0 is the start token)."""

    words: tuple[str, ...]
    positions: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.words) != len(self.positions):
            raise AttentionError("each word needs its token positions")


def word_tokens(tokenizer: Any, prompt: str) -> WordTokens:
    """Map each whitespace-separated word of ``prompt`` to its token positions in the encoded prompt.

    Each word is tokenized alone (no special tokens) and the pieces must follow each other in the
    prompt's own encoding after the start token; a BPE word split into several pieces keeps them
    all. Words cut off by the encoder's context are dropped. Raises :class:`AttentionError` when
    the pieces do not line up (then no word could be named honestly).
    """
    full = list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)
    words, positions = [], []
    pos = 1  # after the start token
    for word in prompt.split():
        pieces = list(tokenizer(word, add_special_tokens=False).input_ids)
        if not pieces:
            continue
        span = tuple(range(pos, pos + len(pieces)))
        if span[-1] >= len(full) - 1:  # past the end token: truncated
            break
        if full[pos:pos + len(pieces)] != pieces:
            raise AttentionError(f"the word {word!r} is not encoded on its own as in the prompt; "
                                 "cannot name its tokens")
        words.append(word)
        positions.append(span)
        pos += len(pieces)
    return WordTokens(tuple(words), tuple(positions))


def grid_of(tokens: int, aspect: float = 1.0) -> tuple[int, int]:
    """The (h, w) grid of ``tokens`` image tokens for an image of width/height ``aspect``."""
    h = max(1, round(math.sqrt(tokens / aspect)))
    w = tokens // h
    if h * w != tokens:
        raise AttentionError(f"{tokens} image tokens do not form a grid of aspect {aspect:g}")
    return h, w


@dataclass
class WordMaps:
    """One step's maps: ``per_site[site]`` is ``[n_words, h, w]`` at the site's grid."""

    words: tuple[str, ...]
    per_site: dict[str, np.ndarray]

    def mean(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The sites' maps averaged at ``size`` (default: the finest grid), bilinear: ``[n_words, H, W]``."""
        if not self.per_site:
            raise AttentionError("no site was read at this step")
        if size is None:
            size = max((m.shape[1:] for m in self.per_site.values()), key=lambda hw: hw[0] * hw[1])
        resized = [
            F.interpolate(torch.from_numpy(m)[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
            if m.shape[1:] != tuple(size) else torch.from_numpy(m)
            for m in self.per_site.values()
        ]
        return torch.stack(resized).mean(0).numpy()


@dataclass
class AttentionReader:
    """A sampler reader: each step, each word's cross-attention map at ``sites``.

    ``tokens`` from :func:`word_tokens`; ``aspect`` is the image's width over height (grids are
    inferred from each site's token count). ``collect(step)`` returns a :class:`WordMaps`.
    """

    tokens: WordTokens
    sites: Sequence[str] = SITE_KEYS
    steps: Collection[int] | None = None
    aspect: float = 1.0
    name: str = "attention"
    reads: str = "attention"
    _pending: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sites if s not in SITE_KEYS]
        if unknown:
            raise AttentionError(f"unknown site(s) {unknown}; known sites: {', '.join(SITE_KEYS)}")
        if not self.sites:
            raise AttentionError("choose at least one site to read attention at")
        self.sites = tuple(self.sites)

    def read(self, site: str, step: int, probs: torch.Tensor) -> None:
        """Keep each word's share of attention at ``site`` (``probs``: ``[B, heads, T, L]``, B = 1 image)."""
        mean = probs.float().mean(1)[0]  # [T, L]: heads averaged, the one image
        h, w = grid_of(mean.shape[0], self.aspect)
        last = max((p[-1] for p in self.tokens.positions), default=-1)
        if last >= mean.shape[1]:
            raise AttentionError(f"{site}: the prompt has token {last} but the site attends to {mean.shape[1]} tokens")
        maps = [mean[:, list(pos)].sum(1).reshape(h, w) for pos in self.tokens.positions]
        stacked = torch.stack(maps) if maps else mean.new_zeros((0, h, w))
        self._pending[site] = stacked.cpu().numpy()

    def collect(self, step: int) -> WordMaps:
        maps, self._pending = self._pending, {}
        return WordMaps(self.tokens.words, maps)


def attention_reader(model: Any, prompt: str, sites: Sequence[str] = SITE_KEYS,
                     steps: Collection[int] | None = None) -> AttentionReader:
    """An :class:`AttentionReader` for ``prompt`` on ``model`` (its tokenizer and image aspect)."""
    h, w = model.image_size
    return AttentionReader(word_tokens(model.pipe.tokenizer, prompt), tuple(sites), steps, aspect=w / h)
