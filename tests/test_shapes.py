"""Shape scenes: sampling rules, ground truth against the pixels, anti-aliasing, any resolution."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from visgen.data import shapes as S
from visgen.data.shapes import ObjectSlot, Prompt, Scene, SceneObject


def _scenes(n: int, extra: float = 0.5, resolution: int = 32) -> list[Scene]:
    return [S.sample_scene(S.TASKS[i % len(S.TASKS)], i, resolution=resolution, extra_attribute_prob=extra)
            for i in range(n)]


def _alpha(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Per-pixel blend weight of ``rgb`` over the background, read from the channel that differs most."""
    diff = np.asarray(rgb, float) - np.asarray(S.BACKGROUND, float)
    ch = int(np.argmax(np.abs(diff)))
    return (img[..., ch].astype(float) - S.BACKGROUND[ch]) / diff[ch]


def test_palette_is_distinct_and_contrasts_with_background():
    assert len(S.COLORS) == 10 and len(S.SHAPES) >= 5
    rgb = {k: np.asarray(v, float) for k, v in S.COLORS.items()}
    bg = np.asarray(S.BACKGROUND, float)
    assert min(np.linalg.norm(v - bg) for v in rgb.values()) > 100      # incl. black and white
    assert min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(rgb, 2)) >= 90
    assert S.SIZE_EXTENT["small"][1] * 1.3 < S.SIZE_EXTENT["large"][0]   # sizes cannot be confused


def test_sampling_is_deterministic_and_seed_dependent():
    a, b = S.sample_scene("position", 7), S.sample_scene("position", 7)
    assert a == b and np.array_equal(S.render(a), S.render(b))
    assert S.sample_scene("position", 8) != a


def test_layout_rules_and_ground_truth_hold_over_many_scenes():
    seen: dict[str, Counter] = {k: Counter() for k in ("shape", "color", "size", "task", "relation", "count")}
    for scene in _scenes(360):
        objs = scene.objects
        assert scene.prompt.holds_for(objs), scene
        assert len(objs) == scene.prompt.num_objects
        for o in objs:
            x0, y0, x1, y1 = o.bbox()
            assert S.BORDER - 1e-9 <= min(x0, y0) and max(x1, y1) <= 1 - S.BORDER + 1e-9
            lo, hi = S.SIZE_EXTENT[o.size]
            assert lo <= o.extent <= hi
            seen["shape"][o.shape] += 1
            seen["color"][o.color] += 1
            seen["size"][o.size] += 1
        for a, b in itertools.combinations(objs, 2):  # boxes apart by GAP along x or y: no overlap
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox(), b.bbox()
            gap_x, gap_y = max(bx0 - ax1, ax0 - bx1), max(by0 - ay1, ay0 - by1)
            assert max(gap_x, gap_y) >= S.GAP - 1e-9
        if scene.prompt.relation is not None:
            a, b = objs
            assert S.relations_between(a.bbox(), b.bbox()) == {scene.prompt.relation}
            seen["relation"][scene.prompt.relation] += 1
        seen["task"][scene.task] += 1
        if scene.task == "counting":
            seen["count"][scene.prompt.objects[0].count] += 1
    assert set(seen["shape"]) == set(S.SHAPES) and set(seen["color"]) == set(S.COLORS)
    assert set(seen["size"]) == set(S.SIZES) and set(seen["task"]) == set(S.TASKS)
    assert set(seen["relation"]) == set(S.RELATIONS) and set(seen["count"]) == {1, 2, 3, 4}


def test_tasks_state_what_geneval_needs():
    for seed in range(60):
        p = S.sample_scene("color_attr", seed).prompt
        assert len(p.objects) == 2 and all(o.color for o in p.objects)
        assert p.objects[0].color != p.objects[1].color and p.objects[0].shape != p.objects[1].shape
        assert S.sample_scene("colors", seed).prompt.objects[0].color is not None
        assert S.infer_task(S.sample_scene("position", seed).prompt) == "position"
        # extra_attribute_prob=0: GenEval-style prompts state nothing beyond the task
        p = S.sample_scene("two_objects", seed).prompt
        assert all(o.color is None and o.size is None for o in p.objects)


def test_crowded_scenes_fall_back_to_a_valid_grid():
    prompt = Prompt((ObjectSlot("square", 4, "blue", "large"),))
    for seed in range(20):
        scene = S.scene_for_prompt(prompt, seed)
        assert prompt.holds_for(scene.objects) and len(scene.objects) == 4
    for rel in S.RELATIONS:
        prompt = Prompt((ObjectSlot("star", size="large"), ObjectSlot("cross", size="large")), rel)
        for seed in range(10):
            a, b = S.scene_for_prompt(prompt, seed).objects
            assert S.relations_between(a.bbox(), b.bbox()) == {rel}


@pytest.mark.parametrize("resolution", [17, 32, 64, 256])
def test_render_any_resolution_matches_ground_truth(resolution):
    for scene in _scenes(12, resolution=resolution):
        img = S.render(scene)
        assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8
        covered = np.zeros((resolution, resolution), bool)
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox(resolution)
            covered[max(int(y0) - 1, 0):int(math.ceil(y1)) + 1, max(int(x0) - 1, 0):int(math.ceil(x1)) + 1] = True
            cx, cy = o.center(resolution)
            centre = img[int(cy), int(cx)].astype(int)
            tol = 12 if resolution >= 32 else 80  # at 17 px a small star is 4 px wide: centre pixel partly covered
            assert np.abs(centre - o.rgb).max() <= tol, (resolution, o, centre)
        # Everything outside the objects' boxes (+1 px rim) is untouched background.
        assert (img[~covered] == S.BACKGROUND).all()


def test_same_scene_renders_at_any_resolution():
    scene = S.sample_scene("counting", 3)
    small, large = S.render(scene, 32), S.render(scene.at_resolution(128))
    down = large.reshape(32, 4, 32, 4, 3).mean((1, 3))
    assert np.abs(down - small).mean() < 4  # box-filtered large render ~ small render


@pytest.mark.parametrize("shape", S.SHAPES)
def test_antialiased_coverage_is_area_exact(shape):
    res, ext = 64, 0.41
    obj = SceneObject(shape, "red", "large", 0.5137, 0.4871, ext)  # off the pixel grid on purpose
    img = S.render(Scene("t", 0, "single_object", Prompt((ObjectSlot(shape),)), (obj,), res))
    alpha = _alpha(img, obj.rgb)
    partial = (alpha > 0.05) & (alpha < 0.95)
    assert partial.sum() >= 8, "edges should hold intermediate (blended) values"
    # Area covered equals the shape's analytic area (uint8 rounding and corner approximation aside).
    poly = S._unit_polygon(shape)
    unit_area = math.pi / 4 if poly is None else 0.5 * abs(np.dot(poly[:, 0], np.roll(poly[:, 1], -1))
                                                           - np.dot(poly[:, 1], np.roll(poly[:, 0], -1)))
    assert alpha.sum() == pytest.approx(unit_area * (ext * res) ** 2, rel=0.015)
    # Blended pixels sit on the outline: every one has a fully-in and a fully-out pixel within 2 px.
    full, empty = alpha > 0.97, alpha < 0.03
    for r, c in zip(*np.nonzero(partial)):
        win = np.s_[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3]
        assert full[win].any() or empty[win].any()


def test_scene_json_round_trip():
    for scene in _scenes(12):
        scene = scene.with_caption("a caption", "en")
        back = Scene.from_json(scene.to_json())
        assert back == scene
        d = scene.to_dict()
        assert d["task"] in S.TASKS and d["resolution"] == d["width"] == 32
        for o, od in zip(scene.objects, d["objects"]):
            assert od["bbox"] == pytest.approx([v * 32 for v in od["bbox_norm"]], abs=0.01)
            assert od["rgb"] == list(S.COLORS[od["color"]])
            assert od["center"] == pytest.approx(o.center(32), abs=1e-3)


def test_relations_between():
    a, b = (0.0, 0.4, 0.2, 0.6), (0.6, 0.4, 0.8, 0.6)
    assert S.relations_between(a, b) == {"left_of"} and S.relations_between(b, a) == {"right_of"}
    top, bottom = (0.4, 0.0, 0.6, 0.2), (0.4, 0.7, 0.6, 0.9)
    assert S.relations_between(top, bottom) == {"above"} and S.relations_between(bottom, top) == {"below"}
    assert S.relations_between(a, (0.21, 0.42, 0.41, 0.62)) == {"left_of"}
    assert S.relations_between(a, (0.01, 0.41, 0.21, 0.61)) == set()   # within the margin: no relation
    assert S.relations_between((0, 0, 0.2, 0.2), (0.6, 0.6, 0.8, 0.8)) == {"left_of", "above"}


def test_prompt_canonical_and_holds_for():
    star, circle = ObjectSlot("star"), ObjectSlot("circle", color="red")
    assert Prompt((star, circle), "left_of").canonical() == Prompt((circle, star), "right_of").canonical()
    objs = (SceneObject("star", "blue", "small", 0.2, 0.5, 0.24),
            SceneObject("circle", "red", "large", 0.7, 0.5, 0.4, 1))
    assert Prompt((star, circle), "left_of").holds_for(objs)
    assert not Prompt((star, circle), "right_of").holds_for(objs)
    assert not Prompt((star, ObjectSlot("circle", color="blue"))).holds_for(objs)
    assert not Prompt((ObjectSlot("star", 2),)).holds_for(objs)


def test_same_shape_slots_need_a_distinguishing_attribute():
    ok = Prompt((ObjectSlot("star", color="red"), ObjectSlot("star", color="blue", size="small")))
    for seed in range(10):
        assert ok.holds_for(S.scene_for_prompt(ok, seed).objects)
    with pytest.raises(ValueError, match="same shape"):
        S.scene_for_prompt(Prompt((ObjectSlot("star", color="red"), ObjectSlot("star"))), 0)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="'dog'"):
        S.sample_scene("dog", 0)
    with pytest.raises(ValueError, match="resolution.*7"):
        S.sample_scene("counting", 0, resolution=7)
    with pytest.raises(ValueError, match="-1"):
        S.sample_scene("counting", -1)
    with pytest.raises(ValueError, match="'teal'"):
        ObjectSlot("star", color="teal")
    with pytest.raises(ValueError, match="count"):
        ObjectSlot("star", count=5)
    with pytest.raises(ValueError, match="two single objects"):
        Prompt((ObjectSlot("star", 2), ObjectSlot("circle")), "above")


def test_large_share_sets_how_often_an_unstated_size_is_large_and_keeps_stated_ones():
    def sizes(share: float, n: int = 240) -> tuple[Counter, Counter]:
        free, stated = Counter(), Counter()
        for i in range(n):
            scene = S.sample_scene(S.TASKS[i % len(S.TASKS)], i, extra_attribute_prob=0.5, large_share=share)
            assert scene.prompt.holds_for(scene.objects), scene  # every layout rule still holds
            for o in scene.objects:
                slot = scene.prompt.objects[o.slot]
                (stated if slot.size else free)[o.size] += 1
                if slot.size:
                    assert o.size == slot.size
        return free, stated

    all_large, stated = sizes(1.0)
    assert set(all_large) == {"large"} and set(stated) == set(S.SIZES)
    assert set(sizes(0.0)[0]) == {"small"}
    mostly = sizes(0.8)[0]
    assert 0.72 < mostly["large"] / sum(mostly.values()) < 0.88
    # The default draws exactly the scenes made before the option existed (the same random stream).
    assert [S.sample_scene("counting", i) for i in range(20)] == [S.sample_scene("counting", i, large_share=0.5)
                                                                  for i in range(20)]
    for bad in (1.5, -0.1, "0.8", True):
        with pytest.raises(ValueError, match=f"large_share.*{bad!r}" if not isinstance(bad, str) else "large_share"):
            S.sample_scene("single_object", 0, large_share=bad)
