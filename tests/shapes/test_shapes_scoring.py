"""The shapes evaluator: ground truth passes, every category's failure mode fails, noise and blanks fail, mild
blur and noise are tolerated, and the folder / generator / CLI paths agree."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from t2i.cli.main import main as cli_main
from t2i.shapes.captions import split_prompts
from t2i.shapes.detect import Detection
from t2i.shapes.folders import write_folder, write_prompts
from t2i.shapes.scenes import failure_scene, ground_truth, render
from t2i.shapes.scoring import check, evaluate_folder, evaluate_generator, evaluate_images, layout_outcome
from t2i.shapes.specs import ALL_CATEGORIES, CATEGORIES, Clause, Spec
from t2i.shapes.world import BACKGROUND


def _gt(split: str, size: int):
    prompts = split_prompts(split)
    return prompts, [ground_truth(p, size).image for p in prompts]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("split", ["eval", "heldout"])
def test_ground_truth_scores_at_least_0995_everywhere(split, size):
    prompts, images = _gt(split, size)
    report = evaluate_images(images, [p.spec for p in prompts])
    acc = report.accuracy()
    assert set(acc) == {p.spec.category for p in prompts}
    for cat, v in acc.items():
        assert v >= 0.995, (cat, v, [r.found for r in report.results if not r.passed][:5])


@pytest.mark.parametrize("size", [32, 64])
def test_each_category_failure_mode_fails(size):
    prompts = split_prompts("eval")
    rng = np.random.default_rng(0)
    images = [render(failure_scene(p.spec, rng), size) for p in prompts]
    acc = evaluate_images(images, [p.spec for p in prompts]).accuracy()
    assert set(acc) == set(ALL_CATEGORIES)
    for cat, v in acc.items():
        assert v <= 0.05, (cat, v)


def test_noise_and_blank_images_fail():
    prompts = split_prompts("eval")[::3]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in prompts]
    blank = [np.full((64, 64, 3), BACKGROUND, np.uint8) for _ in prompts]
    for images in (noise, blank):
        report = evaluate_images(images, [p.spec for p in prompts])
        assert all(v <= 0.05 for v in report.accuracy().values()), report.accuracy()


@pytest.mark.parametrize("size", [32, 64])
def test_mild_blur_and_noise_are_tolerated(size):
    prompts, images = _gt("eval", size)
    rng = np.random.default_rng(0)
    sigma = 0.5 * size / 32  # the same blur relative to the objects at both sizes

    def degrade(im):
        x = ndimage.gaussian_filter(im.astype(np.float32), (sigma, sigma, 0)) + rng.normal(0, 5, im.shape)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    report = evaluate_images([degrade(im) for im in images], [p.spec for p in prompts])
    assert report.overall >= 0.95, report.accuracy()
    assert min(v for c, v in report.accuracy().items() if c in CATEGORIES) >= 0.9, report.accuracy()


def test_rules_follow_geneval():
    red = Detection("circle", "red", 0.2, 0.5, 0.2, 0.2, 1.0)
    blue = Detection("square", "blue", 0.8, 0.5, 0.2, 0.2, 1.0)
    left = Spec("position", (Clause("square", 1, "blue"), Clause("circle", 1, "red", "left of", 0)))
    right = Spec("position", (Clause("square", 1, "blue"), Clause("circle", 1, "red", "right of", 0)))
    assert check(left, [red, blue]) and not check(right, [red, blue])
    # A is not left of B when the centres are closer than the 0.1 * (w_A + w_B) margin.
    near = Detection("circle", "red", 0.77, 0.5, 0.2, 0.2, 1.0)
    assert not check(left, [near, blue])
    two = Spec("counting", (Clause("circle", 2),), (Clause("circle", 3),))
    assert check(two, [red, red]) and not check(two, [red]) and not check(two, [red, red, red])
    assert check(Spec("single_object", (Clause("circle"),)), [red, blue])  # extra objects are allowed (GenEval)
    attr = Spec("color_attribution", (Clause("circle", 1, "red"), Clause("square", 1, "blue")))
    swapped = [Detection("circle", "blue", 0.2, 0.5, 0.2, 0.2, 1.0), Detection("square", "red", 0.8, 0.5, 0.2, 0.2, 1)]
    assert check(attr, [red, blue]) and not check(attr, swapped)


def test_layout_outcome_tells_a_reversed_relation_from_a_missing_object():
    red = Detection("circle", "red", 0.2, 0.5, 0.2, 0.2, 1.0)
    blue = Detection("square", "blue", 0.8, 0.5, 0.2, 0.2, 1.0)
    left = Spec("position", (Clause("square", 1, "blue"), Clause("circle", 1, "red", "left of", 0)))
    right = Spec("position", (Clause("square", 1, "blue"), Clause("circle", 1, "red", "right of", 0)))
    above = Spec("position", (Clause("square", 1, "blue"), Clause("circle", 1, "red", "above", 0)))
    assert layout_outcome(left, [red, blue]) == "holds"
    assert layout_outcome(right, [red, blue]) == "reversed"
    assert layout_outcome(above, [red, blue]) == "other"  # side by side: neither above nor below
    assert layout_outcome(left, [red]) == "missing"
    # an object of the right colour but the wrong shape stands in for it
    assert layout_outcome(left, [Detection("square", "red", 0.2, 0.5, 0.2, 0.2, 1.0), blue]) == "holds"
    assert layout_outcome(Spec("single_object", (Clause("circle"),)), [red]) is None
    # the report counts them over the relation prompts only, and ground truth always holds
    prompts = [p for p in split_prompts("eval") if p.spec.category in ("position", "colors")][:200]
    images = [ground_truth(p, 64).image for p in prompts]
    report = evaluate_images(images, [p.spec for p in prompts])
    n = sum(p.spec.category == "position" for p in prompts)
    assert n > 0 and report.layouts() == {"holds": n, "reversed": 0, "other": 0, "missing": 0}
    assert "position layout: holds" in report.table() and report.to_dict()["layouts"]["holds"] == n


def test_generator_api_accepts_tensors_and_pil():
    from PIL import Image

    by_seed = {p.seed: p for p in split_prompts("eval")}  # per_prompt=1: each prompt is sampled with its own seed

    def gt_tensor(prompts, seeds):
        images = [torch.from_numpy(ground_truth(by_seed[s], 32).image) for s in seeds]
        assert [by_seed[s].caption for s in seeds] == prompts
        return torch.stack(images).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1], as generators return

    def gt_pil(prompts, seeds):
        return [Image.fromarray(ground_truth(by_seed[s], 32).image) for s in seeds]

    cats = ("colors", "position")
    for fn in (gt_tensor, gt_pil):
        report = evaluate_generator(fn, categories=cats, batch_size=50)
        assert report.overall == 1.0 and set(report.accuracy()) == set(cats)
        assert sum(report.counts().values()) == 2 * 120
    wrong = evaluate_generator(lambda ps, ss: gt_pil(ps, [s + 1 for s in ss]), categories=("colors",))
    assert wrong.overall < 0.2  # images of the neighbouring prompt: the API really scores what fn returns
    with pytest.raises(ValueError, match="returned 1 images"):
        evaluate_generator(lambda ps, ss: gt_pil(ps[:1], ss[:1]), categories=("colors",))
    with pytest.raises(ValueError, match="64x64"):
        evaluate_generator(gt_pil, categories=("colors",), size=64)


def test_float_images_are_read_in_zero_one_as_generators_return_them():
    """A [0, 1] float batch, what ``Generator.generate`` returns, scores as the uint8 images it came from: ground
    truth scores 1.0 with no conversion by the caller, in every category including the text track."""
    prompts = split_prompts("eval")[::12]  # 70 prompts, ten of each category
    images = np.stack([ground_truth(p, 32).image for p in prompts])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
    report = evaluate_images(batch, [p.spec for p in prompts])
    assert set(report.accuracy()) == set(ALL_CATEGORIES)
    assert report.overall == 1.0 and all(v == 1.0 for v in report.accuracy().values()), report.accuracy()
    assert evaluate_images(images, [p.spec for p in prompts]).overall == 1.0  # uint8 stays uint8


def test_folder_cli_json_and_grid(tmp_path, capsys):
    folder = write_folder(tmp_path / "gt", "heldout", 32)
    report = evaluate_folder(folder)
    assert report.overall == 1.0
    rc = cli_main(
        [
            "eval",
            "shapes",
            "--images",
            str(folder),
            "--json",
            str(tmp_path / "r.json"),
            "--grid",
            str(tmp_path / "g.png"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "overall (GenEval)" in out and "color_attribution" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["overall"] == 1.0 and len(data["results"]) == len(split_prompts("heldout"))
    assert (tmp_path / "g.png").stat().st_size > 1000
    # a prompts-only folder has no images yet: a clear error, not a traceback
    write_prompts(tmp_path / "empty", "eval")
    assert cli_main(["eval", "shapes", "--images", str(tmp_path / "empty")]) == 2
    assert "missing" in capsys.readouterr().err


def test_evaluator_speed_one_core():
    prompts, images = _gt("eval", 32)
    specs = [p.spec for p in prompts]
    evaluate_images(images[:50], specs[:50])  # warm the template caches
    # CPU time of this process (all threads together), so the rate is per core whatever BLAS does, and other
    # processes on the machine (pytest -n 2) do not slow the measurement down.
    t = time.process_time()
    evaluate_images(images, specs)
    rate = len(images) / (time.process_time() - t)
    assert rate >= 200, f"{rate:.0f} images per CPU-second"


def test_evaluate_generator_filters_prompts():
    from t2i.shapes.scenes import ground_truth
    from t2i.shapes.scoring import evaluate_generator
    from t2i.shapes.specs import uses_pair

    def where(p):
        return uses_pair(p.spec, ("purple", "circle"))

    from t2i.shapes.captions import split_prompts

    by_key = {(p.caption, p.seed): p for p in split_prompts("heldout")}

    def fn(prompts, seeds):
        return [ground_truth(by_key[(c, s)], 32).image for c, s in zip(prompts, seeds, strict=True)]

    report = evaluate_generator(fn, split="heldout", where=where)
    n = sum(where(p) for p in split_prompts("heldout"))
    assert 0 < len(report.results) == n < 480 and report.overall == 1.0
