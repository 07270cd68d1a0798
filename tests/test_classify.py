"""Classifiers over step previews, per-run curves, batch evaluation and the figures.

Unit tier: first-correct logic and prompt matching on constructed inputs; a random-weight
ShapeNet saved and loaded as the toy classifier; VGG-16 with random weights (only the path, not its
accuracy). Integration tier: evaluate() over the tiny random model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldm_scene.classify import (
    Classifier,
    CurveTracker,
    RunCurves,
    ToyShapeClassifier,
    VGGClassifier,
    as_uint8_images,
    classifier_for,
    classify_run,
    evaluate,
    first_correct_step,
    imagenet_categories,
    match_class,
    photo_reference,
    plot_run_curves,
    plot_timelines,
    read_prompts,
    readme_from_json,
    toy_prompts_and_seeds,
    toy_reference,
    write_report,
)
from ldm_scene.toy.render import SHAPES


# ---------------------------------------------------------------- first correct step (pure)


@pytest.mark.parametrize(
    "correct, expected",
    [
        ([0, 0, 0, 1, 1, 1], 3),  # correct at 3..end
        ([0, 0, 1, 0, 0, 1, 1], 5),  # right at 2, wrong at 4, right 5..end
        ([0, 0, 0, 0], None),  # never
        ([0, 0, 0, 1], 3),  # only the last
        ([1, 1, 1], 0),  # from the start
        ([1, 1, 0], None),  # lost at the end
        ([], None),
    ],
)
def test_first_correct_step(correct, expected):
    assert first_correct_step([bool(c) for c in correct]) == expected


def test_first_correct_step_maps_positions_to_steps():
    assert first_correct_step([False, True, True], steps=[4, 7, 9]) == 7
    with pytest.raises(ValueError):
        first_correct_step([True], steps=[1, 2])


# ---------------------------------------------------------------- prompt -> class


def test_match_class_whole_words_longest_wins():
    classes = ("tiger", "tiger shark", "cone", "ice", "lemon")
    assert classes[match_class("a tiger shark", classes)] == "tiger shark"
    assert classes[match_class("A Photo of a LEMON", classes)] == "lemon"
    assert classes[match_class("two lemons", classes)] == "lemon"
    assert classes[match_class("a red cone", classes)] == "cone"
    assert classes[match_class("a red cone at the top left", classes)] == "cone"  # words of place name no class
    assert match_class("a pinecone", classes) is None  # not a whole word
    assert match_class("nice weather", classes) is None
    assert match_class("", classes) is None


def test_curve_fields_on_constructed_probabilities():
    classes = ("a", "b", "c")
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.8, 0.1], [0.1, 0.7, 0.2]])
    curves = RunCurves.from_probabilities("b", classes, 1, range(5), probs, top_k=2)
    assert curves.prompted_rank.tolist() == [2, 1, 2, 1, 1]  # a tie at step 2 goes to "a", as argmax
    assert curves.first_correct_step == 3
    assert curves.top1.tolist() == [0, 1, 0, 1, 1]
    assert curves.top_k[0] == (("a", pytest.approx(0.6)), ("b", pytest.approx(0.3)))
    np.testing.assert_allclose(curves.prompted_confidence, probs[:, 1], rtol=1e-6)
    d = curves.to_dict(with_probabilities=True)
    assert json.loads(json.dumps(d))["first_correct_step"] == 3
    none = RunCurves.from_probabilities("x", classes, None, range(5), probs)
    assert none.prompted_rank is None and none.first_correct_step is None and none.correct is None
    with pytest.raises(ValueError):
        RunCurves.from_probabilities("b", classes, 1, [0, 2, 2, 3, 4], probs)


# ---------------------------------------------------------------- classifiers


class FixedClassifier:
    """Returns queued probability rows: a stand-in with exactly known outputs."""

    name = "fixed"
    classes = ("sphere", "cube")

    def __init__(self, rows):
        self.rows = list(rows)

    def probabilities(self, images):
        return np.array([self.rows.pop(0) for _ in as_uint8_images(images)], np.float32)

    def class_for_prompt(self, prompt):
        return match_class(prompt, self.classes)


@pytest.fixture(scope="module")
def toy_classifier(tmp_path_factory):
    from ldm_scene.toy.nets import ClassifierConfig, ShapeNet, save_net

    # Untrained: these tests check the path, not the accuracy, so any initial weights do.
    directory = tmp_path_factory.mktemp("toymodel") / "labelers"
    save_net(ShapeNet(ClassifierConfig(width=8)), directory, "classifier")
    return ToyShapeClassifier(directory)


def test_curve_tracker_streams_and_refuses_unordered_steps():
    rows = [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9]]
    tracker = CurveTracker(FixedClassifier(rows), "a red cube")
    image = np.zeros((8, 8, 3), np.uint8)
    seen = []
    for step in range(5):
        curves = tracker.update(step, image)
        assert curves.steps == tuple(range(step + 1))
        assert curves.probabilities.shape == (step + 1, 2)
        seen.append(curves.first_correct_step)
    assert seen == [None, 1, None, 3, 3]
    with pytest.raises(ValueError, match="increase"):
        tracker.update(4, image)
    tracker.reset()
    assert tracker.curves.steps == ()


def test_toy_shape_classifier(toy_classifier, tmp_path):
    assert isinstance(toy_classifier, Classifier)
    assert toy_classifier.classes == SHAPES
    assert SHAPES[toy_classifier.class_for_prompt("a red cone")] == "cone"
    assert toy_classifier.class_for_prompt("a red thing") is None
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    probs = toy_classifier.probabilities(batch)
    assert probs.shape == (3, len(SHAPES))
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    # PIL images, of mixed sizes, give the same rows as the array batch.
    mixed = [Image.fromarray(batch[0]), batch[1], Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))]
    np.testing.assert_allclose(toy_classifier.probabilities(mixed)[:2], probs[:2], rtol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        toy_classifier.probabilities(batch.astype(np.float32) / 255)
    curves = classify_run(toy_classifier, list(batch), "a blue torus", top_k=3)
    assert curves.probabilities.shape == (3, 5) and len(curves.top_k[0]) == 3
    assert curves.prompted_class == SHAPES.index("torus")
    assert curves.steps == (0, 1, 2)


def test_classifier_for_prefers_the_toy_classifier(toy_classifier):
    class FakePipe:
        name_or_path = str(toy_classifier.directory.parent)

    class FakeModel:
        pipe = FakePipe()

    assert isinstance(classifier_for(FakeModel()), ToyShapeClassifier)


def test_vgg_random_weights():
    assert len(imagenet_categories()) == 1000
    vgg = VGGClassifier(weights=None, device="cpu", input_size=32)
    assert isinstance(vgg, Classifier)
    assert vgg.classes[vgg.class_for_prompt("a lemon")] == "lemon"
    assert vgg.classes[vgg.class_for_prompt("a photo of a Granny Smith")] == "Granny Smith"
    assert vgg.classes[vgg.class_for_prompt("a tiger shark")] == "tiger shark"
    images = [Image.new("RGB", (32, 32), (200, 180, 20)), np.full((32, 32, 3), 90, np.uint8)]
    probs = vgg.probabilities(images)
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-4)


def test_vgg_without_cached_weights_fails_at_once(tmp_path, monkeypatch):
    import torch

    from ldm_scene.classify import ClassifierLoadError

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty cache
    with pytest.raises(ClassifierLoadError, match="not in the torch hub cache"):
        VGGClassifier(weights="IMAGENET1K_V1", device="cpu", download=False)
    with pytest.raises(ClassifierLoadError, match="unknown VGG-16 weights"):
        VGGClassifier(weights="IMAGENET9K", device="cpu")


# ---------------------------------------------------------------- references, prompts, evaluate


def test_references_and_prompt_files(tmp_path):
    pairs = toy_prompts_and_seeds(3, seed0=5)
    assert [s for _, s in pairs] == [5, 6, 7] and all(any(w in p for w in SHAPES) for p, _ in pairs)
    ref = toy_reference(2, size=16, seed0=5)
    assert ref[0][0].shape == (16, 16, 3) and ref[0][0].dtype == np.uint8 and ref[0][1] == pairs[0][0]
    (tmp_path / "photos" / "lemon").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "lemon" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "granny_smith_02.png")
    assert [p for _, p in photo_reference(tmp_path / "photos")] == ["granny smith", "lemon"]
    (tmp_path / "prompts.txt").write_text("# comment\nlemon\t7\n\na tiger shark\n")
    assert read_prompts(tmp_path / "prompts.txt") == [("lemon", 7), ("a tiger shark", None)]


def test_evaluate_on_the_tiny_model(tiny_model, toy_classifier, tmp_path):
    kept = []
    pairs = [("a red cube", 1), ("a blue sphere", 2), ("a green cat", 3)]
    reference = toy_reference(4, size=tiny_model.image_size[0])
    result = evaluate(tiny_model, toy_classifier, pairs, steps=3, reference_images=reference,
                      reference_source="fresh renders", on_run=lambda i, c: kept.append((i, c)))
    result = json.loads(json.dumps(result))  # JSON-ready
    assert result["n"] == 2 and result["steps"] == 3 and result["classifier"] == "toy-shapes"
    assert [s["prompt"] for s in result["skipped"]] == ["a green cat"]
    per_step = result["per_step"]
    assert per_step["step"] == [0, 1, 2]
    for key in ("mean_confidence", "top1_accuracy", "topk_accuracy"):
        assert len(per_step[key]) == 3 and all(0 <= v <= 1 for v in per_step[key])
    fc = result["first_correct"]
    assert len(fc["histogram"]) == 3 and sum(fc["histogram"]) + fc["never"] == 2
    assert result["reference"]["n"] == 4 and 0 <= result["reference"]["top1_accuracy"] <= 1
    assert [r["seed"] for r in result["runs"]] == [1, 2]
    assert [i for i, _ in kept] == [0, 1] and kept[0][1].probabilities.shape == (3, len(SHAPES))

    metrics = {"tasks": {"foreground": {"metric": "dice", "best_per_step": [0.2, 0.6, 0.8],
                                        "residual_best_per_step": [0.1, 0.2, 0.3]},
                         "depth": {"metric": "spearman"}}}  # a task without curves is left out
    written = write_report(result, tmp_path / "out", kept[:1], metrics)
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    readme = (tmp_path / "out" / "README.md").read_text()
    assert readme == readme_from_json(json.loads((tmp_path / "out" / "classify.json").read_text()),
                                      ["figures/timelines.png", "figures/run000.png"])
    assert readme.count("\n| ") >= 4  # header, 3 steps, never


def test_figures(tmp_path):
    from matplotlib.figure import Figure

    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.8, 0.1]])
    curves = RunCurves.from_probabilities("b", ("a", "b", "c"), 1, range(3), probs)
    fig = plot_run_curves(curves)
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "run.png")
    data = {
        "model": "m", "classifier": "c", "n": 2,
        "per_step": {"step": [0, 1, 2], "mean_confidence": [0.1, 0.5, 0.9], "top1_accuracy": [0, 0.5, 1]},
        "first_correct": {"histogram": [0, 1, 1], "never": 0, "median": 1.5},
        "reference": {"source": "renders", "top1_accuracy": 0.95},
    }
    (tmp_path / "classify.json").write_text(json.dumps(data))
    for metrics in (None, tmp_path / "missing.json", {"tasks": {"depth": {"metric": "spearman", "best_per_step": [0.9] * 3}}}):
        fig = plot_timelines(tmp_path / "classify.json", metrics)
        assert isinstance(fig, Figure)
        fig.savefig(tmp_path / "timelines.png")
        assert (tmp_path / "timelines.png").stat().st_size > 0
