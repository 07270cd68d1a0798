"""Where the per-word cross-attention maps are read: named groups of sites, or any sites by name."""
from __future__ import annotations

from typing import Sequence

from ..sites import SITE_KEYS, UP_SITE_KEYS
from .inputs import ServiceError

#: Named groups of cross-attention sites for the per-word maps (each group's maps are averaged).
ATTENTION_GROUPS: dict[str, tuple[str, ...]] = {
    "all 16 sites": SITE_KEYS,
    "decoder (9 up-block sites)": UP_SITE_KEYS,
    "encoder (6 down-block sites)": tuple(s for s in SITE_KEYS if s.startswith("down_blocks")),
    "none": (),
}
#: Where the per-word maps are read by default: every site, averaged (as DAAM does).
DEFAULT_ATTENTION_GROUP = "all 16 sites"
DEFAULT_ATTENTION_SITES: tuple[str, ...] = ATTENTION_GROUPS[DEFAULT_ATTENTION_GROUP]


def attention_choices() -> list[str]:
    """The options the page offers: the groups, then each site."""
    return [*ATTENTION_GROUPS, *SITE_KEYS]


def attention_sites(sites: str | Sequence[str] | None) -> tuple[str, ...]:
    """Sites from a group name or a site (the page's choices), a list of sites, or None (the default);
    ``"none"`` or ``[]`` reads none. Anything else is refused with the choices."""
    if sites is None:
        return DEFAULT_ATTENTION_SITES
    if isinstance(sites, str):
        if sites in ATTENTION_GROUPS:
            return ATTENTION_GROUPS[sites]
        sites = [sites]
    if not isinstance(sites, (list, tuple)) or not all(isinstance(s, str) for s in sites):
        raise ServiceError(f"attention sites must be a site name or a list of them, got {sites!r}"[:200])
    unknown = [s for s in sites if s not in SITE_KEYS]
    if unknown:
        raise ServiceError(f"unknown attention site(s) {unknown}; choose one of: {', '.join(attention_choices())}")
    return tuple(dict.fromkeys(sites))
