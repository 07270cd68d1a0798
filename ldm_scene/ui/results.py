"""The Results tab's page: a probe set's summary, its README and the model's report, figures in place.

The app serves no files (``allowed_paths=[]``), so a relative link in a shipped README would 404.
Instead every figure a text cites is embedded where it is cited (a PNG data URI), a link to a
figure or a shipped markdown page becomes a link to its place on this page, and pages such as
``guidance.md`` are shown as sections. Only files listed by name in the probe folder and the model
folder are read (no path from a link is ever opened as given); a link to anything else is shown
as plain text saying it is not shipped with the app.
"""
from __future__ import annotations

import ast
import base64
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

from ..probes import TASKS
from .probe_set import metrics_table

log = logging.getLogger(__name__)

_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]*)\)")
#: The largest figure embedded in the page; a larger one is listed instead (it would bloat every load).
MAX_FIGURE_BYTES = 2_000_000


@dataclass
class Results:
    """The page: markdown (figures embedded) and the figures it shows, as (image, caption) pairs."""

    markdown: str
    figures: list[tuple[Image.Image, str]] = field(default_factory=list)


def anchor(name: str) -> str:
    """The in-page anchor id of a shipped file (``emergence.png`` -> ``file-emergence-png``)."""
    return "file-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _caption(name: str) -> str:
    return name.rsplit(".", 1)[0].replace("_", " ")


class _Page:
    """Builds the page from the allowed files, embedding each figure once."""

    def __init__(self, folders: list[Path]) -> None:
        self.files: dict[str, Path] = {}
        for folder in folders:
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                if path.is_file() and path.suffix.lower() in (".png", ".md") and path.name not in self.files:
                    self.files[path.name] = path
        self.embedded: set[str] = set()
        self.sections: list[str] = []  # markdown pages shown after the text that links them
        self.figures: list[tuple[Image.Image, str]] = []

    def figure(self, name: str, alt: str) -> str:
        path = self.files[name]
        data = path.read_bytes()
        if len(data) > MAX_FIGURE_BYTES:
            return f"*({alt or name}: {len(data) // 1000} kB, too large to show here)*"
        try:
            with Image.open(path) as im:
                self.figures.append((im.convert("RGB"), _caption(name)))
        except OSError as err:
            log.warning("results: cannot read %s: %s", path, err)
            return f"*({alt or name}: unreadable)*"
        self.embedded.add(name)
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        return f'<a id="{anchor(name)}"></a>\n\n![{alt or _caption(name)}]({uri})'

    def rewrite(self, markdown: str) -> str:
        """Embed cited figures, point links at their place on this page, neutralise the rest."""
        def replace(m: re.Match) -> str:
            bang, text, target = m.groups()
            if re.match(r"^(https?:|#)", target):
                return m.group(0)
            name = target.split("#")[0]
            if "/" in name or "\\" in name or name not in self.files:
                return f"{text} *(not shipped with the app)*" if not bang else f"*({text}: not shipped with the app)*"
            if bang:
                return self.figure(name, text) if name not in self.embedded else f"*({text}: shown above)*"
            if name.endswith(".md") and name not in {s for s in self.sections}:
                self.sections.append(name)
            return f"[{text}](#{anchor(name)})"

        return _LINK.sub(replace, markdown)

    def finish(self) -> list[str]:
        """Linked pages as sections, then every figure not yet shown, each under its anchor."""
        parts = []
        for name in self.sections:
            text = self.rewrite(_readable(self.files[name].read_text(errors="replace")))
            parts.append(f'<a id="{anchor(name)}"></a>\n\n---\n\n*From `{name}`:*\n\n{text}')
        ordered = ["emergence.png", *[f"heatmap_{t}.png" for t in TASKS]]
        rest = [n for n in self.files if n.endswith(".png") and n not in ordered]
        leftover = [n for n in [*ordered, *sorted(rest)] if n in self.files and n not in self.embedded]
        if leftover:
            parts.append("### More figures\n\n" + "\n\n".join(
                f"**{_caption(n)}**\n\n{self.figure(n, _caption(n))}" for n in leftover))
        return parts


def _seconds(value: Any) -> str:
    s = float(value)
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def _readable(markdown: str) -> str:
    """Write a raw Python dict of seconds (``{'unet_s': 22303.2, ...}``) as a list of durations."""
    def replace(m: re.Match) -> str:
        try:
            data = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            return m.group(0)
        if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
            return m.group(0)
        items = [f"{str(k).removesuffix('_s').replace('_', ' ')} {_seconds(v)}" for k, v in data.items()]
        return "; ".join(items)

    return re.sub(r"(\{'[^{}]*\})", replace, markdown)


def results_page(probe_dir: Path | None, model_dir: Path | None, metrics: Mapping[str, Any]) -> Results:
    """The Results tab's page for a probe folder (and the model folder's ``REPORT.md``, if any)."""
    if probe_dir is None or not probe_dir.is_dir():
        return Results("No probe set is loaded, so there are no results to show.")
    page = _Page([probe_dir, *([model_dir] if model_dir is not None else [])])
    parts = []
    table = metrics_table(metrics)
    if table:
        parts.append("### Best site per task\n\n" + table)
    if (probe_dir / "README.md").is_file():
        parts.append(page.rewrite(_readable((probe_dir / "README.md").read_text(errors="replace"))))
    if model_dir is not None and (model_dir / "REPORT.md").is_file():
        report = page.rewrite(_readable((model_dir / "REPORT.md").read_text(errors="replace")))
        parts.append("### The toy model\n\n" + report)
    parts.extend(page.finish())
    if not parts:
        parts.append(f"`{probe_dir}` has no metrics.json, README.md or figures yet.")
    return Results("\n\n".join(parts), page.figures)
