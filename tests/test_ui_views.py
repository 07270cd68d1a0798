"""What a step looks like in the app (per-word attention, the compare strip), the Results page's
links and figures, and the attention-site choices: the service on the tiny model, no Gradio."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from ldm_scene.attention import WordMaps
from ldm_scene.capture import attached_hooks
from ldm_scene.sites import SITE_KEYS, UP_SITE_KEYS
from ldm_scene.testing import APP_STEPS as STEPS


class Labeler:
    """A stand-in labeler: foreground where the image is reddish, depth from the row, shading from brightness."""

    def __call__(self, images):
        x = np.asarray(images, np.float32) / 255
        red = x[..., 0] - x[..., 1:].mean(-1)
        rows = np.broadcast_to(np.linspace(0, 30, x.shape[1])[None, :, None], red.shape)
        return {"foreground": (red > 0).astype(np.float32), "depth": rows.astype(np.float32),
                "shading": x.mean(-1)}


@pytest.fixture(scope="module")
def service(tiny_service):
    return tiny_service


@pytest.fixture(scope="module")
def views(service):
    # Every step decoded, so every view carries its strips (the default cadence is tested in test_service).
    return list(service.generate_stream("a red cube", seed=3, steps=STEPS, guidance=7.5, preview_every=1))


def test_every_step_streams_the_words_attention_and_keeps_it_for_the_scrubber(service, views, tiny_model):
    run = views[-1].run
    assert run.attention_sites == SITE_KEYS  # the default: every site
    assert len(run.attention) == STEPS
    for step, view in enumerate(views):
        maps = run.attention[step]
        assert isinstance(maps, WordMaps) and maps.words == ("a", "red", "cube")
        assert set(maps.per_site) == set(SITE_KEYS)
        assert isinstance(view.attention, Image.Image)
        # one tile per word, side by side, each STRIP_TILE px
        from ldm_scene.ui.drawing import STRIP_TILE

        assert view.attention.width >= 3 * STRIP_TILE and view.attention.height > STRIP_TILE
    # scrubbing back redraws the stored step's maps: the same picture as when it streamed
    again = service.view_of(run, 1)
    assert np.array_equal(np.asarray(again.attention), np.asarray(views[1].attention))
    assert not np.array_equal(np.asarray(views[0].attention), np.asarray(views[-1].attention))
    assert attached_hooks(tiny_model.unet) == 0


def test_attention_sites_by_group_site_or_none(service):
    from ldm_scene.ui.inputs import ServiceError

    assert service.resolve_attention_sites("decoder (9 up-block sites)") == UP_SITE_KEYS
    assert service.resolve_attention_sites("mid_block.attentions.0") == ("mid_block.attentions.0",)
    assert service.resolve_attention_sites("none") == () and service.resolve_attention_sites([]) == ()
    with pytest.raises(ServiceError, match="unknown attention site"):
        service.resolve_attention_sites("the left half")
    with pytest.raises(ServiceError, match="site name or a list"):
        service.resolve_attention_sites(7)
    views = list(service.generate_stream("a red cube", seed=3, steps=2, guidance=7.5, attention_sites="none"))
    assert views[-1].attention is None and views[-1].run.attention == [None, None]
    views = list(service.generate_stream("a red cube", seed=3, steps=2, guidance=7.5,
                                         attention_sites=["up_blocks.3.attentions.2"]))
    assert list(views[-1].run.attention[-1].per_site) == ["up_blocks.3.attentions.2"]


def test_compare_strip_has_a_row_per_task_and_fills_the_final_label_when_the_run_ends(service, monkeypatch):
    from ldm_scene.ui.drawing import STRIP_TILE

    monkeypatch.setattr(service, "labeler", Labeler())
    views = list(service.generate_stream("a red cube", seed=3, steps=STEPS, guidance=7.5, preview_every=1))
    run = views[-1].run
    assert all(labels is not None and set(labels) == {"foreground", "depth", "shading"}
               for labels in run.preview_labels)
    assert run.reference_source.startswith("the labeler")
    first, last = views[0].compare, views[-1].compare
    # three rows (foreground, depth, shading) of three columns, each row one tile high
    assert first.height == last.height and first.height >= 3 * STRIP_TILE
    assert first.width >= 3 * STRIP_TILE + 84
    # the final-label column is a grey "when finished" placeholder until the last step
    cell = (84 + 2 * (STRIP_TILE + 4) + 10, 16 + 10)
    assert first.getpixel(cell) == (235, 235, 235)
    assert last.getpixel(cell) != (235, 235, 235)


def test_without_a_labeler_the_compare_strip_shows_the_probe_only(service, views):
    strip = views[-1].compare
    assert strip is not None  # the probe column is always there when probes read
    assert views[-1].run.preview_labels == [None] * STEPS


# -- the Results page -------------------------------------------------------------------------------

def test_results_links_point_into_the_page_and_figures_sit_where_they_are_cited(tmp_path):
    from ldm_scene.ui.results import anchor, results_page

    probes = tmp_path / "probes"
    model = tmp_path / "model"
    probes.mkdir()
    model.mkdir()
    (probes / "README.md").write_text(
        "# Probes\n\nFigures: [emergence](emergence.png) · [strips](strips.png)\n\n![emergence](emergence.png)\n\n"
        "Text after the figure.\n\nA secret: [passwords](../../etc/passwd) and ![x](/etc/hosts) and "
        "[site](https://example.org)\n")
    (model / "REPORT.md").write_text("Chosen in [guidance.md](guidance.md).\n\nTraining time on this machine: "
                                     "{'render_s': 3.08, 'unet_s': 22303.29, 'decoder_s': 2477.9}\n")
    (model / "guidance.md").write_text("# Guidance\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    Image.new("RGB", (40, 30), (200, 100, 50)).save(probes / "emergence.png")
    Image.new("RGB", (40, 30), (20, 100, 50)).save(probes / "strips.png")
    page = results_page(probes, model, {})
    md = page.markdown
    # every relative link goes to an anchor on the page, and every anchor exists
    targets = re.findall(r"\]\((#[^)]*)\)", md)
    assert set(targets) >= {"#" + anchor("emergence.png"), "#" + anchor("strips.png"), "#" + anchor("guidance.md")}
    for target in targets:
        assert f'id="{target[1:]}"' in md, target
    assert not re.search(r"\]\((?!#|https?:|data:image/png;base64,)", md), "a link the app cannot serve"
    # the cited figure is embedded right where the README shows it, before the text that follows
    assert md.index("data:image/png;base64,") < md.index("Text after the figure.")
    # files outside the two folders are never read, and say so
    assert "/etc" not in md and md.count("not shipped with the app") == 2
    assert "https://example.org" in md
    # the linked page is shown as a section; the training time reads as durations, not a dict
    assert "# Guidance" in md and "{'" not in md
    assert "render 3 s" in md and "unet 6.2 h" in md and "decoder 41 min" in md
    assert [c for _, c in page.figures] == ["emergence", "strips"]


def test_service_results_use_the_probe_folder(service):
    res = service.results()
    assert "Best site per task" in res.markdown and "data:image/png;base64," in res.markdown
    assert "emergence.png)" not in res.markdown
