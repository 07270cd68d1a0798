"""REPORT.md and the model card are rendered from report.json: verdicts follow the targets, and the
decoder's colour ceiling and the decoder stage appear when measured / trained."""
from __future__ import annotations

from ldm_scene.toy.report import (
    TARGETS, format_duration, format_timings, render_guidance_sweep, render_model_card, render_report, sweep_choice,
    sweep_shortfall, sweep_targets_met,
)


def _report(**kw) -> dict:
    values = {
        "object_present": 0.97, "shape_match": 0.5, "colour_match": 0.6,
        "layout_prompts_in_all_thirds": 5 / 6, "layout_ks_x": 0.08, "layout_coverage_ratio_error": 0.3,
        "ae_psnr_db": 27.4, "labeler_dice": 0.951, "labeler_depth_spearman": 0.96, "labeler_shading_spearman": 0.85,
        "classifier_accuracy": 0.9, "seconds_per_generation": 0.8,
    }
    return {"machine": "test", "n_generated": 200, "n_heldout": 500, "steps": 15, "guidance": 7.5, **values,
            "targets": TARGETS, **kw}


def test_report_verdicts_follow_the_targets():
    lines = render_report(_report()).splitlines()
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and " | " in line}
    assert "met (target >= 0.97)" in row["object_present"] and "NOT" not in row["object_present"]
    assert "NOT met (target >= 0.95)" in row["shape_match"]
    assert "NOT met (target >= 32)" in row["ae_psnr_db"]
    assert "met (target <= 1)" in row["seconds_per_generation"] and "NOT" not in row["seconds_per_generation"]
    # The layout figures: every prompt in all thirds, KS distance and coverage error at most.
    assert "83% | NOT met (target >= 1)" in row["layout_prompts_in_all_thirds"]
    assert "0.080 | met (target <= 0.15)" in row["layout_ks_x"]
    assert "30.0% | NOT met (target <= 0.2)" in row["layout_coverage_ratio_error"]
    assert set(TARGETS) <= set(row)


def test_training_time_reads_as_durations_per_stage_in_the_order_they_run():
    assert [format_duration(s) for s in (0.4, 31.99, 89.4, 2924.3, 5400, 9000)] == \
        ["0 s", "32 s", "89 s", "48.7 min", "1.5 h", "2.5 h"]
    timings = {"unet_s": 2924.311806259, "render_s": 31.99137245099996, "extra_s": 5.0, "labelers_s": 600}
    assert format_timings(timings) == "render 32 s, labelers 10.0 min, UNet 48.7 min, extra 5 s"
    assert format_timings({}) == "not recorded"
    text = render_report(_report(train_timings={"render_s": 31.99137245099996, "unet_s": 2924.311806259}))
    assert "Training time on this machine: render 32 s, UNet 48.7 min\n" in text
    assert "{" not in text.split("Training time on this machine:")[1].splitlines()[0]


def test_decoder_ceiling_and_stage_are_reported_only_when_present():
    without = render_report(_report())
    assert "reconstructions" not in without
    with_ceiling = render_report(_report(ae_colour_match=0.867))
    assert "(exact masks): 86.7%" in with_ceiling

    plan = {"n_train": 10, "ae_steps": 7, "labeler_steps": 1, "classifier_steps": 1, "unet_steps": 3, "unet_batch": 2,
            "uncond_prob": 0.1, "ema_decay": 0.9, "arch": {}}
    card = render_model_card(_report(ae_colour_match=0.867), plan, {"unet": "1M"})
    assert "decoder alone" not in card and "86.7%, the ceiling for colour as prompted" in card
    card = render_model_card(_report(), {**plan, "decoder_steps": 600, "decoder_object_weight": 10.0}, {"unet": "1M"})
    assert "then its decoder alone 600 more (encoder frozen, object pixels weighted 11x)" in card


def test_spearman_ceilings_are_reported_with_the_labelers_share_of_them():
    assert "ceiling" not in render_report(_report())
    text = render_report(_report(labeler_depth_spearman_ceiling=0.976, labeler_shading_spearman_ceiling=0.86,
                                 labeler_shading_spearman_object=0.89))
    assert "depth 0.9760 and shading 0.8600" in text
    assert "98.8% of that ceiling" in text  # 0.85 / 0.86
    assert "on the object's pixels alone its shading Spearman is 0.8900" in text


def test_structured_shading_is_reported_beside_the_nets_own_estimate():
    text = render_report(_report(labeler_shading_spearman=0.97, labeler_shading_spearman_net=0.84,
                                 labeler_depth_spearman_ceiling=0.976, labeler_shading_spearman_ceiling=0.86,
                                 labeler_shading_spearman_object=0.89))
    assert "per-pixel estimate scores 0.8400 (97.7% of that ceiling)" in text  # 0.84 / 0.86
    assert "structure_shading" in text and "which gives the 0.9700 above" in text


def test_structured_depth_is_reported_beside_the_nets_own_estimate():
    assert "structure_depth" not in render_report(_report())
    text = render_report(_report(labeler_depth_spearman=0.959, labeler_depth_spearman_net=0.928,
                                 labeler_depth_spearman_object=0.37))
    assert "per-pixel depth scores 0.9280" in text and "which gives the 0.9590 above" in text
    assert "structure_depth" in text and "its depth Spearman is 0.3700" in text


def test_scheduler_is_named_and_the_papers_is_compared_when_measured():
    plain = render_report(_report(scheduler="EulerDiscreteScheduler"))
    assert "15 steps of EulerDiscreteScheduler" in plain and "paper's" not in plain
    paper = {"scheduler": "LMSDiscreteScheduler", "object_present": 1.0, "shape_match": 0.55, "colour_match": 0.74}
    both = render_report(_report(scheduler="EulerDiscreteScheduler", paper_scheduler=paper))
    assert "paper's LMSDiscreteScheduler" in both and "shape 55.0%, colour 74.0%." in both
    plan = {"n_train": 10, "ae_steps": 7, "labeler_steps": 1, "classifier_steps": 1, "unet_steps": 3, "unet_batch": 2,
            "uncond_prob": 0.1, "ema_decay": 0.9, "arch": {}}
    card = render_model_card(_report(scheduler="EulerDiscreteScheduler"), plan, {"unet": "1M"})
    assert "`EulerDiscreteScheduler` with SD's scaled-linear betas" in card and "15 steps of EulerDiscreteScheduler" in card
    assert "paper's" not in card.split("## Measured quality")[1]
    assert "noisiest" not in card
    card = render_model_card(_report(), {**plan, "unet_high_noise_share": 0.5}, {"unet": "1M"})
    assert "50% of each batch drawn from the noisiest 40% of timesteps" in card and "latent cells" not in card
    card = render_model_card(_report(), {**plan, "unet_object_weight": 10.0}, {"unet": "1M"})
    assert "object's latent cells weighted 11x in the UNet loss" in card
    card = render_model_card(_report(scheduler="EulerDiscreteScheduler", paper_scheduler=paper), plan, {"unet": "1M"})
    assert "with the paper's LMSDiscreteScheduler on the same seeds: shape 55.0%, colour 74.0%;" in card
    assert "position" not in card and "on the left" not in card


def test_matches_are_broken_down_per_prompted_word_with_the_commonest_miss():
    from ldm_scene.toy.report import by_prompted_word

    rows = [{"prompt": "an orange cube", "colour": "red", "shape": "cube"},
            {"prompt": "an orange cone", "colour": "red", "shape": "cone"},
            {"prompt": "an orange cone", "colour": "orange", "shape": "cylinder"},
            {"prompt": "a red cube", "colour": "red", "shape": "cube"}]
    colour = by_prompted_word(rows, "colour")
    assert colour == {"orange": {"n": 3, "match": 1 / 3, "commonest_miss": "red"},
                      "red": {"n": 1, "match": 1.0, "commonest_miss": None}}
    assert by_prompted_word(rows, "shape")["cone"] == {"n": 2, "match": 0.5, "commonest_miss": "cylinder"}
    text = render_report(_report(shape_by_word=by_prompted_word(rows, "shape"), colour_by_word=colour))
    assert "per prompted colour: orange 33% of 3 (else mostly red); red 100% of 1." in text
    assert "per prompted" not in render_report(_report())


def test_guidance_sweep_picks_the_most_targets_met_then_the_smallest_shortfall():
    from types import SimpleNamespace

    def row(g, late, late_from, shape, colour, orange, present=1.0):
        by = lambda words: {w: {"n": 10, "match": m, "commonest_miss": miss} for w, (m, miss) in words.items()}
        return {"guidance": g, "late_guidance": late, "late_from": late_from, "n_generated": 200, "steps": 15,
                "scheduler": "EulerDiscreteScheduler", "object_present": present, "shape_match": shape,
                "colour_match": colour,
                "shape_by_word": by({"cube": (1.0, None), "cylinder": (0.7, "cube")}),
                "colour_by_word": by({"red": (1.0, None), "orange": (orange, "red")})}

    rows = [row(2.5, None, None, 0.835, 0.935, 0.68), row(7.5, None, None, 0.885, 0.865, 0.26),
            row(7.5, 2.5, 0.8, 0.91, 0.895, 0.38), row(7.5, 2.5, 2 / 3, 0.89, 0.915, 0.5)]
    # Shortfalls (1 - value / 0.95, summed): 0.137, 0.158, 0.100, 0.100; the tie goes to the worse of
    # shape and colour: 0.895 against 0.89.
    assert [round(sweep_shortfall(r), 3) for r in rows] == [0.137, 0.158, 0.1, 0.1]
    assert sweep_choice(rows) is rows[2]
    tie = [row(7.5, 2.5, 0.5, 0.9, 0.9, 0.5, present=0.98), row(7.5, 2.5, 0.8, 0.9, 0.9, 0.5, present=0.99)]
    assert sweep_choice(tie) is tie[1]  # equal worse: the better sum with object present
    model = SimpleNamespace(default_guidance=7.5, late_guidance=None, late_from=2 / 3)
    lines = [line for line in render_guidance_sweep(rows, model).splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert lines[1].startswith("| 7.5 * | - | - |")  # the model's current setting: constant 7.5
    assert lines[2].startswith("| **7.5** | 2.5 | 80% |") and "*" not in lines[2].replace("**", "")
    assert "| 100.0% | 91.0% | 89.5% |" in lines[2]
    assert "cylinder 70% (else cube)" in lines[2] and "orange 26% (else red)" in lines[1]
    assert render_guidance_sweep([]).startswith("# Guidance")
    assert lines[2].endswith("| - | - | 0 | 0.100 |") and "coverage of the frame" not in render_guidance_sweep(rows)
    laid = [r | {"coverage": 0.327, "coverage_renderer": 0.224, "ks_x": 0.1071} for r in rows]
    text = render_guidance_sweep(laid, model)
    assert "the renderer's own scenes for the same seeds: 22.4%" in text
    assert [line for line in text.splitlines() if line.startswith("| **7.5**")][0].endswith("| 32.7% | 0.107 | 1 | 0.360 |")
    # Layout counts once measured: a row that meets coverage and KS beats a better worse-of-shape-and-colour.
    laid[0] |= {"coverage": 0.26, "ks_x": 0.095}  # coverage 16% off the renderer's, KS met: 2 targets
    assert sweep_targets_met(laid[0]) == 2 and sweep_choice(laid) is laid[0]
    assert sweep_targets_met(laid[2]) == 1  # KS met, coverage 46% off, shape and colour under 95%
    # Equal targets met: a gain within the noise on shape does not buy a large loss on coverage. Two
    # rows of a sweep of the shipped model before guidance under 2.5 was tried: constant 2.5 (shape
    # 88.5%, coverage 20.04% over, just short) against 10 capped late (shape 90.0%, coverage 53% over);
    # both meet colour and KS only.
    near = row(2.5, None, None, 0.885, 1.0, 1.0) | {"coverage": 0.2630, "coverage_renderer": 0.2191, "ks_x": 0.095}
    big = row(10, 2.5, 0.8, 0.90, 0.955, 0.74) | {"coverage": 0.336, "coverage_renderer": 0.2191, "ks_x": 0.13}
    assert sweep_targets_met(near) == sweep_targets_met(big) == 2
    assert sweep_shortfall(near) < 0.07 < 0.3 < sweep_shortfall(big)
    assert sweep_choice([big, near]) is near


def test_applying_the_sweep_writes_its_pick_where_the_model_loader_reads_it(tmp_path):
    import json

    from ldm_scene.models import SETTINGS_FILE
    from ldm_scene.toy.report import apply_sweep_choice

    rows = [{"guidance": 7.5, "late_guidance": None, "late_from": None, "n_generated": 200, "shape_match": 0.9,
             "colour_match": 0.8, "object_present": 1.0},
            {"guidance": 7.5, "late_guidance": 2.5, "late_from": 2 / 3, "n_generated": 200, "shape_match": 0.9,
             "colour_match": 0.95, "object_present": 1.0}]
    settings = apply_sweep_choice(tmp_path, rows)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == settings
    assert (settings["guidance"], settings["late_guidance"], settings["late_from"]) == (7.5, 2.5, 2 / 3)
    assert "2 settings, 200 seeds" in settings["chosen_by"]


def test_a_model_with_its_own_guidance_is_also_reported_at_the_papers():
    plain = render_report(_report())
    assert "constant guidance" not in plain and "guidance 7.5," in plain
    word = lambda w, m, miss: {w: {"n": 30, "match": m, "commonest_miss": miss}}
    own = render_report(_report(late_guidance=2.5, late_from=0.8, paper_guidance={
        "guidance": 7.5, "object_present": 1.0, "shape_match": 0.88, "colour_match": 0.875,
        "shape_by_word": word("cylinder", 0.66, "cube"), "colour_by_word": word("orange", 0.26, "red")}))
    assert "guidance 7.5, at most 2.5 from 80% of the steps" in own
    assert "at constant guidance 7.5" in own and "colour 87.5%" in own and "worst cylinder 66%, orange 26%" in own


def test_model_card_quotes_how_its_guidance_setting_was_chosen():
    plan = {"n_train": 10, "ae_steps": 7, "labeler_steps": 1, "classifier_steps": 1, "unet_steps": 3, "unet_batch": 2,
            "uncond_prob": 0.1, "ema_decay": 0.9, "arch": {}}
    card = render_model_card(_report(late_guidance=2.5, late_from=0.8), plan, {"unet": "1M"})
    assert "chosen by `python -m ldm_scene.toy" in card and "as recorded there" not in card
    card = render_model_card(_report(late_guidance=2.5, late_from=0.8, guidance_chosen_by="a sweep of 3 settings"),
                             plan, {"unet": "1M"})
    assert "([guidance.md](guidance.md)); as recorded there: a sweep of 3 settings." in card
    assert "as recorded there" not in render_model_card(_report(guidance_chosen_by="x"), plan, {"unet": "1M"})


def test_model_card_names_gpu_and_fine_tune_legs_only_when_there_are_some():
    plan = {"n_train": 10, "ae_steps": 7, "labeler_steps": 1, "classifier_steps": 1, "unet_steps": 3, "unet_batch": 2,
            "uncond_prob": 0.1, "ema_decay": 0.9, "arch": {}}
    cpu_leg = {"stage": "UNet", "steps": "0-3", "command": "python -m ldm_scene.toy train --stages unet", "threads": 1,
               "minutes": 1}
    cpu_only = render_model_card(_report(), plan, {"unet": "1M"}, [cpu_leg])
    assert "all on CPU" in cpu_only and "GPU" not in cpu_only and "--unet-init" not in cpu_only
    gpu_leg = {"stage": "UNet fine-tune", "steps": "3 + 5 at batch 8",
               "command": "python -m ldm_scene.toy train --unet-init M --device cuda --unet-oversample cube", "threads": 4,
               "device": "NVIDIA H200", "minutes": 2}
    card = render_model_card(_report(), plan, {"unet": "1M"}, [cpu_leg, gpu_leg])
    assert "3 steps of batch 2 then 5 at batch 8 on a GPU" in card
    assert "on CPU but for the legs on a lent GPU (NVIDIA H200)" in card and "all on CPU" not in card
    assert "| 4 (NVIDIA H200) | 2 |" in card and "`--unet-oversample`" in card and "fresh optimiser" in card
    assert "widths ()" in card and "fresh decoder" not in card  # no measured widths and none in the plan
    # A decoder leg on the GPU is named with the autoencoder, not appended to the UNet's steps.
    decoder_leg = {"stage": "decoder (encoder frozen), fresh and 64 wide", "steps": "650 at batch 16",
                   "command": "python -m ldm_scene.toy train --stages decoder --decoder-width 64 --device cuda",
                   "threads": 2, "device": "NVIDIA H200", "minutes": 1}
    card = render_model_card(_report(ae_widths={"encoder": [32] * 3, "decoder": [64] * 3}), plan, {"unet": "1M"},
                             [cpu_leg, gpu_leg, decoder_leg])
    assert "encoder widths (32, 32, 32), decoder widths (64, 64, 64)" in card
    assert "autoencoder 7 steps, then a fresh decoder 650 at batch 16 on a GPU, labeler" in card
    same = render_model_card(_report(ae_widths={"encoder": [32] * 3, "decoder": [32] * 3}), plan, {"unet": "1M"})
    assert "4x down-scaling, widths (32, 32, 32))" in same
    on = {**decoder_leg, "command": "python -m ldm_scene.toy train --stages decoder --device cuda"}
    assert "then its decoder 650 at batch 16 on a GPU" in render_model_card(_report(), plan, {"unet": "1M"}, [on])
    assert "3 steps of batch 2 then 5 at batch 8 on a GPU(" in card.replace("\n", "")


def test_layout_section_shows_each_prompts_spread_beside_the_renderers_and_its_ks_control():
    per = {"n": 24, "n_with_object": 24, "thirds": [6, 12, 6], "thirds_renderer": [300, 450, 250],
           "x_mean": 0.49, "x_sd": 0.18, "y_mean": 0.55, "y_sd": 0.1, "x_mean_renderer": 0.5, "x_sd_renderer": 0.19,
           "y_mean_renderer": 0.54, "y_sd_renderer": 0.11, "coverage": 0.21, "coverage_renderer": 0.22,
           "ks_x": 0.12, "ks_y": 0.2, "ks_x_control": 0.17, "ks_y_control": 0.16}
    layout = {"layout_per_prompt": {"a red cube": per}, "layout_n": 198, "layout_x_sd": 0.18, "layout_x_sd_renderer": 0.19,
              "layout_y_sd": 0.1, "layout_y_sd_renderer": 0.11, "layout_thirds": [50, 100, 48],
              "layout_thirds_renderer": [270, 490, 240], "layout_ks_y": 0.07, "layout_ks_x_control": 0.06,
              "layout_ks_y_control": 0.06, "layout_coverage": 0.2, "layout_coverage_renderer": 0.22}
    text = render_report(_report(**layout))
    assert "## Layout: the noise, not the prompt, places the object" in text
    assert "| a red cube | 24/24 | 6/12/6 | 0.49 (0.18) | 0.50 (0.19) |" in text
    assert "| 0.12 (0.17) | 0.20 (0.16) | 21.0% | 22.0% |" in text
    assert "where the renderer's own 198 scenes score x 0.060" in text
    assert "## Layout" not in render_report(_report())


def test_ks_control_is_small_for_the_renderers_own_sample_and_shrinks_with_n():
    import numpy as np

    from ldm_scene.toy.report import ks_control, thirds

    reference = np.random.default_rng(0).uniform(0.1, 0.9, 3000)
    small, large = ks_control(reference, 24), ks_control(reference, 400)
    # KS between n draws and the rest has median about 0.83 / sqrt(n) for n << N.
    assert 0.1 < small < 0.25 and 0.02 < large < 0.07 and large < small
    assert thirds(np.array([0.1, 0.2, 0.5, 0.9, 0.999, 1.0])) == [2, 1, 3]


def test_model_card_names_the_v2_legs_apart_from_the_v1_plan():
    plan = {"n_train": 10, "ae_steps": 7, "labeler_steps": 1, "classifier_steps": 1, "unet_steps": 3, "unet_batch": 2,
            "uncond_prob": 0.1, "ema_decay": 0.9, "arch": {}}
    v1 = {"stage": "UNet", "steps": "0-1000", "command": "python -m ldm_scene.toy train", "threads": 1, "minutes": 25}
    v2 = {"stage": "UNet fine-tune on v2 renders", "steps": "2000 of batch 32", "world": "v2",
          "command": "python -m ldm_scene.toy train --unet-init weights/toy-scenes", "threads": 1, "minutes": 60}
    card = render_model_card(_report(), plan, {"unet": "1M"}, [v1, v2])
    assert "fine-tuning the v1 weights below on v2 renders" in card
    assert "UNet fine-tune on v2 renders (2000 of batch 32)." in card
    assert "| 2 | v2: UNet fine-tune on v2 renders |" in card and "| 1 | UNet |" in card
    assert "v2 world" not in render_model_card(_report(), plan, {"unet": "1M"}, [v1])
