"""Triggers: pixel-exact placement, patterns, the blend formula, parsing and JSON round trips, non_target."""

from __future__ import annotations

import json

import pytest
import torch

from qcbdefense.errors import InputError
from qcbdefense.triggers import (TRIGGERS, BlendTrigger, PatchTrigger, SparseTrigger, Trigger, non_target,
                                 parse_trigger, trigger_from_dict)


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """[H, W] mask of pixels where any channel of any image changed."""
    return (before != after).flatten(end_dim=-4).any(0).any(0)


def square(h: int, w: int, row: int, col: int, size: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[row:row + size, col:col + size] = True
    return mask


def test_default_patch_is_the_quanti_trigger():
    x = torch.rand(5, 3, 32, 32) * 0.9                         # no pixel is already white
    before = x.clone()
    out = PatchTrigger().apply(x)
    assert torch.equal(x, before)                              # the input is left alone
    assert torch.equal(out[:, :, 27:31, 27:31], torch.ones(5, 3, 4, 4))
    assert torch.equal(changed(x, out), square(32, 32, 27, 27, 4))


@pytest.mark.parametrize("position, row, col", [
    ("bottom-right", 27, 27), ("bottom-left", 27, 1), ("top-right", 1, 27), ("top-left", 1, 1), ("center", 14, 14),
    ((3, 20), 3, 20), ((0, 0), 0, 0), ((28, 28), 28, 28),
])
def test_patch_positions(position, row, col):
    x = torch.full((2, 3, 32, 32), 0.5)
    out = PatchTrigger(position=position).apply(x)
    assert torch.equal(changed(x, out), square(32, 32, row, col, 4))
    assert PatchTrigger(position=position).top_left(32, 32) == (row, col)


@pytest.mark.parametrize("size, margin, row, col", [(3, 0, 29, 29), (1, 0, 31, 31), (5, 2, 25, 25), (32, 0, 0, 0)])
def test_patch_size_and_margin(size, margin, row, col):
    x = torch.full((1, 3, 32, 32), 0.25)
    out = PatchTrigger(size=size, margin=margin).apply(x)
    assert torch.equal(changed(x, out), square(32, 32, row, col, size))


def test_patch_on_a_non_square_image_and_a_single_image():
    x = torch.zeros(3, 20, 40)                                 # one image, no batch dimension
    out = PatchTrigger(position="top-right", margin=2, size=3).apply(x)
    assert torch.equal(changed(x[None], out[None]), square(20, 40, 2, 35, 3))
    assert PatchTrigger(position="center", size=4).top_left(20, 40) == (8, 18)


def test_patch_colors_and_patterns():
    x = torch.full((1, 3, 8, 8), 0.5)
    red = PatchTrigger(size=2, color=(1.0, 0.0, 0.0), margin=0).apply(x)
    assert red[0, :, 6:, 6:].flatten(1).T.tolist() == [[1.0, 0.0, 0.0]] * 4
    checker = PatchTrigger(size=3, margin=0, pattern="checkerboard").patch()
    assert checker[0].tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    rnd = PatchTrigger(size=6, pattern="random", color=(0.0, 0.0, 1.0), seed=1).patch()
    assert torch.equal(rnd, PatchTrigger(size=6, pattern="random", color=(0.0, 0.0, 1.0), seed=1).patch())
    assert not torch.equal(rnd, PatchTrigger(size=6, pattern="random", color=(0.0, 0.0, 1.0), seed=2).patch())
    assert set(rnd[2].unique().tolist()) == {0.0, 1.0}          # colour or its complement, nothing else
    assert torch.equal(rnd[0], 1.0 - rnd[2])


@pytest.mark.parametrize("trigger", [PatchTrigger(size=40), PatchTrigger(position=(30, 0)),
                                     PatchTrigger(size=16, margin=20)])
def test_patch_that_does_not_fit_is_refused(trigger):
    with pytest.raises(InputError, match="does not fit a 32x32 image"):
        trigger.apply(torch.zeros(1, 3, 32, 32))


def test_patch_keeps_device_and_dtype():
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    out = PatchTrigger().apply(x)
    assert out.dtype == torch.float64 and out.device == x.device


@pytest.mark.parametrize("pattern", ["noise", "stripes"])
def test_blend_formula(pattern):
    x = torch.rand(4, 3, 16, 16)
    before = x.clone()
    trigger = BlendTrigger(alpha=0.25, pattern=pattern, seed=3)
    out = trigger.apply(x)
    assert torch.equal(x, before)
    ones = trigger.apply(torch.ones(1, 3, 16, 16))
    pat = (ones - 0.75) / 0.25                                 # recover the pattern from x = 1
    assert torch.allclose(out, 0.75 * x + 0.25 * pat, atol=1e-6)
    assert pat.min() >= -1e-6 and pat.max() <= 1 + 1e-6
    if pattern == "stripes":
        assert pat[0, 0, 0, :6].round().tolist() == [1, 1, 0, 0, 1, 1]
        assert torch.allclose(pat[0, 0, 0], pat[0, 0, 15])     # vertical bars: every row the same
    else:
        assert not torch.allclose(pat[0, 0], pat[0, 1])        # a colour noise image


def test_blend_alpha_one_is_the_pattern_and_seeds_differ():
    x = torch.rand(2, 3, 8, 8)
    a = BlendTrigger(alpha=1.0, seed=1).apply(x)
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a, BlendTrigger(alpha=1.0, seed=2).apply(x))


def test_sparse_sets_the_same_few_pixels_to_black_or_white():
    x = torch.full((3, 3, 32, 32), 0.5)
    before = x.clone()
    out = SparseTrigger(density=0.05, seed=4).apply(x)
    assert torch.equal(x, before)
    where = changed(x, out)
    assert 20 <= where.sum() <= 80                             # about 5 % of 1,024 pixels
    values = out[:, :, where]
    assert torch.equal(values, values[:1].expand_as(values))   # the same on every image
    assert set(values.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(where, changed(x, SparseTrigger(density=0.05, seed=5).apply(x)))


@pytest.mark.parametrize("text, expected", [
    ("patch", PatchTrigger()),
    ("patch:size=3,position=top-left,color=red,margin=0,pattern=checkerboard",
     PatchTrigger(size=3, position="top-left", color=(1.0, 0.0, 0.0), margin=0, pattern="checkerboard")),
    ("patch:position=5/7,color=0.2/0.4/1", PatchTrigger(position=(5, 7), color=(0.2, 0.4, 1.0))),
    (" patch: size = 2 , color = Yellow ", PatchTrigger(size=2, color=(1.0, 1.0, 0.0))),
    ("patch:pattern=random,seed=9", PatchTrigger(pattern="random", seed=9)),
    ("blend", BlendTrigger()),
    ("blend:alpha=0.2,seed=1", BlendTrigger(alpha=0.2, seed=1)),
    ("blend:alpha=1,pattern=stripes", BlendTrigger(alpha=1.0, pattern="stripes")),
    ("sparse:density=0.02,seed=3", SparseTrigger(density=0.02, seed=3)),
])
def test_parse_trigger(text, expected):
    trigger = parse_trigger(text)
    assert trigger == expected
    assert isinstance(trigger, Trigger)
    d = trigger.to_dict()
    assert d["kind"] in TRIGGERS
    assert trigger_from_dict(json.loads(json.dumps(d))) == trigger    # survives JSON
    assert trigger_from_dict(d).to_dict() == d


@pytest.mark.parametrize("text, message", [
    ("", "non-empty"),
    ("square", "unknown trigger kind 'square'"),
    ("patch:sise=3", "unknown option 'sise'"),
    ("patch:size", "must be KEY=VALUE"),
    ("patch:size=", "must be KEY=VALUE"),
    ("patch:size=0", "size must be an integer >= 1"),
    ("patch:size=2.5", "size must be an integer"),
    ("patch:size=3,size=4", "given twice"),
    ("patch:margin=-1", "margin must be an integer >= 0"),
    ("patch:position=middle", "position must be one of"),
    ("patch:position=1/2/3", "2 ints separated by '/'"),
    ("patch:position=-1/2", "position row/col must be an integer >= 0"),
    ("patch:color=purple", "color must be one of"),
    ("patch:color=1/0", "3 floats"),
    ("patch:color=2/0/0", "color must be 3 numbers in \\[0, 1\\]"),
    ("patch:pattern=dots", "pattern must be one of solid, checkerboard, random"),
    ("patch:alpha=0.5", "unknown option 'alpha' for patch"),
    ("blend:alpha=0", "alpha must be a number in \\(0, 1\\]"),
    ("blend:alpha=1.5", "alpha must be a number in \\(0, 1\\]"),
    ("blend:alpha=-0.1", "alpha must be a number in \\(0, 1\\]"),
    ("blend:alpha=big", "alpha must be a number"),
    ("blend:pattern=solid", "pattern must be one of noise, stripes"),
    ("blend:seed=-3", "seed must be an integer >= 0"),
    ("blend:size=4", "unknown option 'size' for blend"),
    ("sparse:density=0", "density must be a number in \\(0, 1\\]"),
])
def test_parse_trigger_refuses_nonsense(text, message):
    with pytest.raises(InputError, match=message):
        parse_trigger(text)


def test_parse_trigger_checks_the_image_size_when_given():
    assert parse_trigger("patch:size=8", image_size=(32, 32)) == PatchTrigger(size=8)
    with pytest.raises(InputError, match="does not fit a 32x32 image"):
        parse_trigger("patch:size=33", image_size=(32, 32))


@pytest.mark.parametrize("d, message", [
    ({"size": 3}, "'kind'"),
    ({"kind": "laser"}, "unknown trigger kind 'laser'"),
    ({"kind": "patch", "size": 3, "opacity": 1}, "unknown keys \\['opacity'\\]"),
    ({"kind": "patch", "size": "3"}, "size must be an integer"),
    ({"kind": "patch", "size": True}, "size must be an integer"),
    ({"kind": "patch", "color": [1, 1]}, "color must be 3 numbers"),
    ({"kind": "patch", "position": [1, 2, 3]}, "position must be a name or \\(row, col\\)"),
    ({"kind": "blend", "alpha": "0.1"}, "alpha must be a number"),
])
def test_trigger_from_dict_refuses_bad_dicts(d, message):
    with pytest.raises(InputError, match=message):
        trigger_from_dict(d)


def test_trigger_from_dict_fills_defaults():
    assert trigger_from_dict({"kind": "patch"}) == PatchTrigger()
    assert trigger_from_dict({"kind": "patch", "color": [0, 1, 0], "position": [2, 3]}) == \
        PatchTrigger(color=(0.0, 1.0, 0.0), position=(2, 3))


def test_triggers_are_frozen_and_hashable():
    trigger = PatchTrigger()
    with pytest.raises(AttributeError):
        trigger.size = 5
    assert len({PatchTrigger(), PatchTrigger(), BlendTrigger()}) == 2


def test_non_target_drops_exactly_the_target_class():
    y = torch.tensor([0, 1, 2, 0, 3, 0, 1])
    x = torch.arange(7).float().view(7, 1, 1, 1).expand(7, 3, 2, 2)
    xs, ys = non_target(x, y, target=0)
    assert ys.tolist() == [1, 2, 3, 1]
    assert xs[:, 0, 0, 0].tolist() == [1.0, 2.0, 4.0, 6.0]
    xs, ys = non_target(x, y, target=9)                        # no image of the target: all kept
    assert len(ys) == 7
