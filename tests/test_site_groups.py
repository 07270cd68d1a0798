"""Foreground probes over groups of sites: the features, the fit against its baselines, the report."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_scene.training.site_groups import (
    analyse, group_features, groups_figure, parse_steps, render_markdown,
)


def test_group_features_concatenate_sites_on_the_finest_grid_in_order():
    fine = torch.arange(16 * 2, dtype=torch.float32).reshape(16, 2)  # 4x4 tokens, 2 channels
    coarse = torch.full((4, 1), 3.0)  # 2x2 tokens, a constant map
    x, grid = group_features({"fine": fine, "coarse": coarse}, ("fine", "coarse"))
    assert grid == (4, 4) and x.shape == (16, 3)
    torch.testing.assert_close(x[:, :2], fine)  # the finest site as it is
    torch.testing.assert_close(x[:, 2], torch.full((16,), 3.0))  # bilinear keeps a constant map
    x, grid = group_features({"fine": fine, "coarse": coarse}, ("coarse",))
    assert grid == (2, 2) and x.shape == (4, 1)  # a group of one reads its own grid
    with pytest.raises(ValueError, match="square"):
        group_features({"odd": torch.zeros(12, 2)}, ("odd",))


def _images(n: int, steps=(0,), seed: int = 0):
    """Images whose masks are boxes at random places; site ``cells`` carries each cell's foreground
    fraction (plus a little noise) on an 8x8 grid, site ``noise`` nothing but noise; two prompts with
    their own box sizes, so the prompt says the size but never the place."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = "small" if i % 2 else "large"
        size = 8 if prompt == "small" else 14
        top, left = rng.integers(0, 32 - size, 2)
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[top:top + size, left:left + size] = True
        frac = F.adaptive_avg_pool2d(mask[None, None].float(), (8, 8)).reshape(64, 1)
        acts = {"cells": torch.cat([frac + 0.02 * torch.randn(64, 1, generator=gen), torch.randn(64, 3, generator=gen)], 1),
                "noise": torch.randn(16, 4, generator=gen)}
        split = ("train", "train", "val", "test", "test")[i % 5]
        out.append(SimpleNamespace(split=split, prompt=prompt, mask=mask, acts={k: acts for k in steps},
                                   x0_masks={k: mask.clone() for k in steps} if split == "test" else {}))
    return out


def test_a_group_that_holds_the_layout_reads_it_and_beats_the_prompt():
    groups = {"noise": ("noise",), "cells": ("cells",), "both": ("noise", "cells")}
    result = analyse(_images(100), (0,), groups, resamples=200)
    row = result["per_step"]["0"]
    assert row["labeler_on_x0"] == 1.0  # the exact masks stand in for the labeler here
    cells, noise, both = (row["groups"][k] for k in ("cells", "noise", "both"))
    # reading the cell fractions is capped only by the 8x8 grid
    assert cells["dice"] > 0.9 * cells["grid_ceiling"] and cells["grid"] == [8, 8]
    assert cells["over_prompt_only"]["low"] > 0.2
    # noise reads no better than the prompt, which knows only the size
    assert noise["dice"] < result["prompt_only"]["dice"] + 0.1
    assert both["channels"] == 8 and both["grid"] == [8, 8] and both["over_noise"]["low"] > 0.2
    assert "over_noise" not in noise  # the first group is the reference
    text = render_markdown(result, "synthetic")
    assert "| cells | 4 | 8x8 |" in text and "## Step 1" in text  # the last step is detailed
    assert "| 1 | 1.000 |" in text  # the Dice-per-step table: step, labeler on x0, then the groups
    groups_figure(result)


def test_analyse_needs_every_split():
    images = [im for im in _images(20) if im.split != "val"]
    with pytest.raises(ValueError, match="train, val and test"):
        analyse(images, (0,), {"cells": ("cells",)})


def test_the_command_parses_and_checks_its_steps():
    from ldm_scene.cli import build_parser

    args = build_parser().parse_args(["probes", "groups", "--model", "toy", "--n", "600", "--out", "o", "--at", "3,5"])
    assert args.command == "groups" and parse_steps(args.at, args.steps) == (2, 4)
    assert parse_steps(None, 15) == tuple(range(15))
    with pytest.raises(ValueError, match=r"\[16\] are outside the run's 15 steps"):
        parse_steps("3,16", 15)
    with pytest.raises(ValueError, match="comma list"):
        parse_steps("three", 15)
    from ldm_scene.training.site_groups import GROUPS, SHIPPED_GROUP, parse_groups
    assert parse_groups(None) == GROUPS and list(parse_groups("all,up")) == [SHIPPED_GROUP, list(GROUPS)[-1]]
    with pytest.raises(ValueError, match="site, up2, up, all"):
        parse_groups("up,most")


def test_the_shipped_probe_readme_links_the_groups_page_it_ships():
    """The toy probe folder ships groups.md, and its README (re-rendered from metrics.json) links it."""
    import json

    from ldm_scene.models import TOY_MODEL_DIR
    from ldm_scene.training.readme import render_readme

    folder = TOY_MODEL_DIR / "probes"
    if not (folder / "groups.md").is_file():
        pytest.skip("the toy probe folder ships no groups.md")
    readme = (folder / "README.md").read_text()
    result = json.loads((folder / "groups.json").read_text())
    assert readme == render_readme(json.loads((folder / "metrics.json").read_text()), groups=result)
    assert result["n_test"] + result["n_train"] + result["n_val"] == result["n"] == 600
    # its targets section says what the group probe the app reads meets, with the groups page's numbers
    line = next(x for x in readme.splitlines() if x.startswith("- the foreground readout the app uses"))
    step3 = result["per_step"]["2"]["groups"][result["shipped"]["group"]]
    assert f"{step3['over_labeler_on_x0']['mean']:+.3f}" in line and line.count("**met**") + line.count("**not met**") == 4


def test_the_group_targets_follow_the_numbers():
    from ldm_scene.training.readme import _group_target_lines

    targets = {"targets": [
        {"name": "foreground Dice", "step": 4, "threshold": 0.85},
        {"name": "foreground Dice / grid ceiling", "step": 4, "threshold": 0.9},
        {"name": "foreground lead over the prompt-only baseline", "step": 2, "threshold": 0.25},
        {"name": "foreground lead over the labeler on decoded x0", "step": 2, "threshold": 0.1}]}

    def groups(dice, lead, low):
        g = {"dice": dice, "over_ceiling": dice / 0.9, "grid": [16, 16], "grid_ceiling": 0.9,
             "over_prompt_only": {"mean": lead, "low": low, "high": lead + 0.02},
             "over_labeler_on_x0": {"mean": lead, "low": low, "high": lead + 0.02}}
        return {"shipped": {"group": "g"}, "per_step": {"4": {"groups": {"g": g}}, "2": {"groups": {"g": g}}}}

    [line] = _group_target_lines(targets, groups(0.86, 0.3, 0.27))
    assert line.count("**met**") == 4 and "and by the interval's lower end" in line
    [line] = _group_target_lines(targets, groups(0.80, 0.26, 0.24))
    assert line.count("**not met**") == 2 and "but not by the interval's lower end" in line
    assert _group_target_lines(targets, {"per_step": {}}) == []  # no saved group: no line


def test_a_probe_folder_readme_gains_the_link_and_other_folders_are_left_alone(tmp_path):
    import json
    import shutil

    from ldm_scene.models import TOY_MODEL_DIR
    from ldm_scene.training.readme import render_readme
    from ldm_scene.training.site_groups import link_groups_page

    source = TOY_MODEL_DIR / "probes" / "metrics.json"
    if not source.is_file():
        pytest.skip("the toy probe folder ships no metrics.json")
    assert not link_groups_page(tmp_path)  # no probe folder: nothing written
    assert not (tmp_path / "README.md").exists()
    shutil.copy(source, tmp_path / "metrics.json")
    metrics = json.loads(source.read_text())
    (tmp_path / "README.md").write_text(render_readme(metrics))
    assert link_groups_page(tmp_path)
    assert (tmp_path / "README.md").read_text() == render_readme(metrics, groups=True) != render_readme(metrics)


def test_the_command_refuses_bad_steps_with_a_usage_message(capsys):
    from ldm_scene.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["probes", "groups", "--model", "toy", "--n", "600", "--out", "o", "--at", "3,99"])
    assert exit_.value.code == 2 and "steps [99] are outside the run's 15 steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probes", "groups", "--model", "toy", "--n", "2", "--out", "o"])
    assert "--n must be at least 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probes", "groups", "--model", "toy", "--n", "600", "--out", "o", "--groups", "most"])
    assert "--groups takes a comma list" in capsys.readouterr().err
    for bad in ("0", "1", "1.5"):
        with pytest.raises(SystemExit):
            main(["probes", "groups", "--model", "toy", "--n", "600", "--out", "o", "--train-fraction", bad])
        assert "--train-fraction must lie between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probes", "groups", "--model", "toy", "--n", "5", "--out", "o", "--train-fraction", "0.2"])
    assert "leaves 1 training, 0 validation and 4 test images" in capsys.readouterr().err


def test_the_groups_page_claims_a_shipped_probe_only_where_its_file_is(tmp_path):
    import json

    from ldm_scene.training.readme import groups_page

    assert groups_page(tmp_path) is False  # no page at all
    (tmp_path / "groups.md").write_text("# groups\n")
    assert groups_page(tmp_path) is True  # a page without its json: linked, nothing more
    (tmp_path / "groups.json").write_text(json.dumps({"shipped": {"group": "g", "file": "foreground_group.safetensors"}}))
    assert "shipped" not in groups_page(tmp_path)  # the file it names is not there
    (tmp_path / "foreground_group.safetensors").write_bytes(b"x")
    assert groups_page(tmp_path)["shipped"]["group"] == "g"
    (tmp_path / "groups.json").write_text("[" * 100000)  # unreadable: the page is still linked
    assert groups_page(tmp_path) is True


def test_the_analysis_streams_its_images_in_two_passes():
    """From a source it asks for the training and validation images, then the validation and test
    ones, each once, and holds none between: the same result as from the images in memory."""
    images = _images(60, steps=(0,))
    groups = {"cells": ("cells",), "both": ("noise", "cells")}
    calls = []

    def source(splits):
        calls.append(set(splits))
        return (im for im in images if im.split in splits)

    streamed = analyse(source, (0,), groups, resamples=50)
    assert calls == [{"train", "val"}, {"val", "test"}]
    assert streamed == analyse(images, (0,), groups, resamples=50)
    assert streamed["n_train"] + streamed["n_val"] + streamed["n_test"] == len(images)
