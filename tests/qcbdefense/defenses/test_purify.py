"""The purifiers (LAC, LAC+PDA, EFRAP, AdaRound, nearest) on the built-in shapes with small_cnn.

The backdoored model is the shared `pq_cnn16` (tests/conftest.py): small_cnn on 3,000 built-in images at 16x16
with a PQBackdoor QCB at 4 bits, whose backdoor lives in the integer weights. Layer-wise mechanics
(units, exactness of the frozen grid and of hardening) are checked on ResNet-20 and small_cnn at random
weights, which costs nothing.
"""

from __future__ import annotations

import copy
import json
import os
import resource

import pytest
import torch

from models import create_model
from qcbdefense.checkpoints import load_model, save_model
from qcbdefense.cli import PURIFIED_FILES, PURIFY_METHODS, _schedule_options, build_parser, main
from qcbdefense.data import to_float
from qcbdefense.defenses import DEFENSES, PurifyReport, load_purified, purify, read_report, save_purified
from qcbdefense.defenses.base import MANIFEST_FILE, MODEL_FILE, REPORT_FILE, SPEC_FILE, WEIGHTS_FILE
from qcbdefense.defenses.guide import refine_patch, with_found_triggers
from qcbdefense.defenses.lac import OffsetRounding
from qcbdefense.defenses.reconstruct import (FrozenActQuant, NearestRounding, Stream, WeightGrid, _UnitRunner,
                                             _value, build_units, reconstruction_graph, trace)
from qcbdefense.errors import InputError
from qcbdefense.quant import calibrate, integer_weights, quantize, quantized_layers, quantizer_parameters
from qcbdefense.quant.ptq import calibration_images, post_training_quantize
from qcbdefense.quant.spec import SPECS
from qcbdefense.scanner.locate import LocateConfig
from qcbdefense.scanner.trigger_search import ClassSearch, SearchConfig
from qcbdefense.scoring import defense_effectiveness_rating

SPEC = "w4a4"


def _random_resnet(arch: str = "resnet20") -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(arch).eval()
    for module in model.modules():  # BN statistics away from (0, 1), so that BN matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model


# ---- the purifier on a backdoored model ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lac", "lac-pda"])
def test_lac_removes_a_weight_conditioned_qcb_and_keeps_accuracy(method, pq_cnn16, shapes16):
    """PQBackdoor's QCB lives in the integer weights alone: LAC re-learns them and the backdoor goes."""
    backdoored, attack_report = pq_cnn16
    _, report = purify(backdoored, shapes16, method=method, spec="pqbackdoor-w4a4", calib=512,
                       trigger="patch", target=0)
    assert report.nearest.asr >= 80.0, f"the attack failed: {attack_report.summary()}"
    assert report.fp.asr <= 20.0, f"the FP model is backdoored too: {attack_report.summary()}"
    assert report.purified.asr <= 10.0, report.summary()
    assert report.purified.ca >= report.fp.ca - 4.0, report.summary()
    # the integers learned are the ones deployed: none outside the abs-max range the grid keeps
    assert [layer["mismatches"] for layer in report.layers] == [0] * len(report.layers)
    assert (method == "lac-pda") == any(layer["pda_seconds"] > 0 for layer in report.layers)


# ---- exactness -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,spec", [("resnet20", SPEC), ("small_cnn", SPEC), ("resnet20", "w8a8-deploy")])
def test_units_reproduce_the_quantized_model_and_its_weights(arch, spec):
    """At zero offset our weight equals Brevitas's bit for bit, and a unit run on cached inputs gives the
    quantized model's own activation at the unit's output (under w8a8-deploy: at the added quantizer it
    stops at, through that quantizer)."""
    model = _random_resnet(arch)
    images = torch.rand(16, 3, 32, 32)
    qmodel = quantize(copy.deepcopy(model), spec)
    calibrate(qmodel, [images])
    names = [name for name, _ in quantized_layers(qmodel)]
    graph, fp_modules = reconstruction_graph(model, qmodel)
    units = build_units(graph, fp_modules, names, qmodel.qcb_add_quants)
    assert [u.name for u in units] == names
    modules = dict(qmodel.named_modules())
    stream = Stream(graph, qmodel, images, chunk=8)
    stops = 0
    for unit in units:
        layer = modules[unit.name]
        raw, *partners = stream.values([unit.input_node, *unit.partners])
        grid = WeightGrid.of(layer, qmodel.qcb_spec)
        weight = OffsetRounding(layer.weight, grid)()
        assert torch.equal(weight, _value(layer.quant_weight()))
        added = unit.next_added
        next_quant = FrozenActQuant.of(modules[unit.next_layer].act_quant, images) if added else None
        with torch.no_grad():
            out = _UnitRunner(unit, layer, modules, qmodel, next_quant).forward(_value(layer.input_quant(raw)),
                                                                                partners, weight)
        end = next(iter(unit.end.users)) if added else unit.end
        (reference,) = Stream(graph, qmodel, images, chunk=8).values([end])
        assert torch.equal(out, reference), unit.describe()
        stops += added
    assert stops == (10 if spec == "w8a8-deploy" else 0)  # the stem and every block's conv2


@pytest.mark.parametrize("spec", SPECS.names())
def test_frozen_activation_quantizer_is_brevitas_bit_for_bit(spec):
    """The loop's copy of each calibrated activation quantizer gives Brevitas's values and gradients exactly,
    on inputs it was not read from (beyond the range on both sides and on the rounding ties)."""
    torch.manual_seed(0)
    qmodel = quantize(_random_resnet("resnet20"), spec)
    calibrate(qmodel, [torch.rand(16, 3, 32, 32)])
    proxies = [module.input_quant for _, module in quantized_layers(qmodel)]
    proxies += [qmodel.get_submodule(name).act_quant for name in getattr(qmodel, "qcb_add_quants", ())]
    proxies = [proxy for proxy in proxies if proxy.is_quant_enabled]
    assert proxies
    for proxy in proxies:
        frozen = FrozenActQuant.of(proxy, torch.rand(1, 16, 8, 8))
        x = torch.randn(8, 16, 8, 8) * 4 * frozen.scale * (frozen.qmax - frozen.qmin)
        x[0] = (torch.arange(x[0].numel()).reshape(x[0].shape) % 7 - 3.5) * frozen.scale  # ties
        grads = []
        for quantizer in (proxy, frozen):
            leaf = x.clone().requires_grad_(True)
            out = _value(quantizer(leaf))
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            grads.append((out.detach(), leaf.grad))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1]), spec


@pytest.mark.parametrize("method", ["lac-pda", "efrap"])
def test_purify_under_the_deploy_spec_learns_the_integers_that_ship(method, tiny_builtin, tmp_path):
    """Under w8a8-deploy (added quantizers on the residual adds) purification stops each block's last conv at
    the add's quantizer, PDA still finds the BN after each conv, hardened integers are the plain quantizer's,
    and the purified model reloads to identical outputs."""
    options = {"steps": 6, "check_every": 3, **({"pda_steps": 2} if method == "lac-pda" else {})}
    purified, report = purify(_random_resnet("resnet20"), tiny_builtin, method=method, spec="w8a8-deploy",
                              calib=32, evaluate_models=False, **options)
    units = {layer["name"]: layer["unit"] for layer in report.layers}
    assert len(units) == 20 and [layer["mismatches"] for layer in report.layers] == [0] * 20
    assert units["layer1.0.conv2"] == "layer1.0.conv2 -> layer1.0.bn2 -> add_quant_1"
    assert units["layer1.0.conv1"] == "layer1.0.conv1 -> layer1.0.bn1 -> layer1.0.relu1 -> layer1.0.conv2.input_quant"
    assert (method == "lac-pda") == all(layer["pda_seconds"] > 0 for layer in report.layers[:-1])
    save_purified(purified, tmp_path / "run", report=report)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(purified(images), load_purified("resnet20", tmp_path / "run")(images))


def test_resnet_units_match_the_block_output():
    model = _random_resnet("resnet20")
    units = {u.name: u for u in build_units(trace(model).graph, dict(model.named_modules()),
                                            [n for n, _ in quantized_layers(quantize(model, SPEC))])}
    assert units["layer1.0.conv1"].describe() == \
        "layer1.0.conv1 -> layer1.0.bn1 -> layer1.0.relu1 -> layer1.0.conv2.input_quant"
    # conv2's unit runs through the residual add and the block's ReLU; the shortcut is a cached input
    assert units["layer1.0.conv2"].describe() == ("layer1.0.conv2 -> layer1.0.bn2 -> add -> layer1.0.relu2 "
                                                  "(+ layer1.0.shortcut) -> layer1.1.conv1.input_quant")
    assert units["layer1.0.conv2"].bn == "layer1.0.bn2"
    assert units["linear"].chain == [] and units["linear"].next_layer is None


@pytest.mark.parametrize("spec", [SPEC, "quanti-w4a4"])
def test_hardened_weights_are_the_learned_integers_on_the_grid(shapes16, spec):
    """After LAC, the float weights are exactly (q - z) * s, and the plain quantizer gives back q."""
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    before = copy.deepcopy(model.state_dict())
    purified, report = purify(model, shapes16, method="lac", spec=spec, calib=64, steps=60, check_every=20,
                              early_stop=False, keep_best=False, evaluate_models=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    assert sum(layer["changed"] for layer in report.layers) > 0, "nothing was learned"
    assert [layer["mismatches"] for layer in report.layers] == [0] * len(report.layers)
    ints = integer_weights(purified)
    for name, layer in quantized_layers(purified):
        w = ints[name]
        assert w.qmin <= int(w.int_weight.min()) and int(w.int_weight.max()) <= w.qmax
        if spec == SPEC:  # MSE range held: every hardened weight sits exactly on the grid
            assert torch.equal(layer.weight.detach(), w.dequantize()), name


def test_nearest_rounding_is_the_start_of_lac():
    model = _random_resnet("small_cnn")
    qmodel = quantize(model, SPEC)
    layer = dict(qmodel.named_modules())["features.3"]
    grid = WeightGrid.of(layer, qmodel.qcb_spec)
    assert torch.equal(OffsetRounding(layer.weight, grid).integers(),
                       NearestRounding(layer.weight, grid).integers())
    assert torch.equal(NearestRounding(layer.weight, grid).integers().to(torch.int32),
                       layer.quant_weight().int().to(torch.int32))


@pytest.mark.parametrize("spec", ["pqbackdoor-w8a8", "pqbackdoor-w4a4"])
def test_learned_integers_stop_where_the_abs_max_grid_reads_them_back(spec):
    """With scale = absmax / (2^(b-1) - 0.5), qmin sits at or below -absmax: a learned integer there would be
    hardened to -absmax and read back as whatever Brevitas rounds that to, so the grid stops at it."""
    qmodel = quantize(_random_resnet("small_cnn"), spec)
    for name, layer in quantized_layers(qmodel):
        grid = WeightGrid.of(layer, qmodel.qcb_spec)
        w = layer.weight.detach().clone()
        lowest = grid.clamp(torch.full_like(w, float(grid.qmin)))
        with torch.no_grad():
            layer.weight.copy_(grid.harden(lowest, w))
            read_back = layer.quant_weight().int().to(w.dtype)
        assert torch.equal(read_back, torch.where(grid.pinned, grid.nearest(w), lowest)), name


# ---- every method, options, errors -----------------------------------------------------------------------

RECONSTRUCTING = {"lac", "lac-pda", "efrap", "adaround"}  # the rest fine-tune the FP model or set ranges


def _tiny_options(method: str) -> dict:
    if method in RECONSTRUCTING:
        return {"steps": 6, "check_every": 3, **({"pda_steps": 3} if method == "lac-pda" else {})}
    if method in ("nearest", "omse", "aciq"):
        return {}
    return {"epochs": 1, **({"teacher_epochs": 1} if method == "nad" else {})}


@pytest.mark.parametrize("method", DEFENSES.names())
def test_every_method_runs_on_a_tiny_model(method, shapes16):
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    purified, report = purify(model, shapes16, method=method, spec=SPEC, calib=32, trigger="patch",
                              **_tiny_options(method))
    assert report.method == method and report.purified is not None and report.purified.asr is not None
    if method in RECONSTRUCTING:
        assert len(report.layers) == 6 and all(layer["mismatches"] == 0 for layer in report.layers)
    else:
        assert all(layer.get("stage") for layer in report.layers)
    assert report.data_used["unlabeled_train_images"] == 32
    # RA beside CA and ASR; DER against the round-to-nearest model (50: no change)
    assert report.purified.ra is not None and report.nearest.der == 50.0
    assert report.purified.der == defense_effectiveness_rating(report.nearest.ca, report.nearest.asr,
                                                               report.purified.ca, report.purified.asr)
    assert purified(torch.rand(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("method", ["ft"])  # trains the FP weights, then quantizes them again
def test_reused_reference_scores_give_the_same_purified_model(method, shapes16):
    """A bench hands every defence after the first the FP and nearest scores it measured: the purified model
    and its score must be those of a run that measured them itself."""
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    run = dict(method=method, spec=SPEC, calib=32, trigger="patch", **_tiny_options(method))
    measured, report = purify(model, shapes16, **run)
    reused, again = purify(model, shapes16, reference_scores=(report.fp, report.nearest), **run)
    assert again.fp == report.fp and again.nearest == report.nearest and again.purified == report.purified
    first, second = measured.state_dict(), reused.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="peak RSS resets on Linux only")
def test_peak_memory_is_the_purifications_own_not_the_processes(shapes16):
    """A bench or Ray worker purifies in a process that did other work first: the report's peak RSS must not
    include that work's peak (here 400 MB allocated and freed before purify)."""
    before = bytearray(400 * 2 ** 20)  # zero-filled, so resident
    del before
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    _, report = purify(model, shapes16, method="nearest", spec=SPEC, calib=32, trigger="patch")
    assert 0 < report.peak_memory_mb["rss"] < process_peak - 300


def test_cli_lists_every_registered_method():
    assert list(PURIFY_METHODS) == DEFENSES.names()


@pytest.mark.parametrize("method, pda_steps", [("lac-pda", 500), ("lac", None)])
def test_released_schedule_includes_pdas_500_steps_only_for_lac_pda(method, pda_steps):
    args = build_parser().parse_args(["purify", "--method", method, "--model", "small_cnn", "--ckpt", __file__,
                                      "--data", "builtin", "--out", "out", "--released"])
    options = _schedule_options(args)
    assert options["steps"] == 10000 and options["early_stop"] is False
    assert options.get("pda_steps") == pda_steps
    DEFENSES.get(method).make_options(options)  # every released option is one the method takes


@pytest.mark.parametrize("flag, expected", [([], None), (["--equalize", "auto"], "auto"),
                                            (["--equalize", "off"], "off")])
def test_the_equalize_flag_reaches_purify_and_harden_only_when_given(flag, expected):
    """Without --equalize each verb keeps its own default (purify off, harden auto at 8-bit activations)."""
    for verb in ("purify", "harden"):
        out = "out" if verb == "purify" else "out.onnx"
        args = build_parser().parse_args([verb, "--model", "small_cnn", "--ckpt", __file__, "--data", "builtin",
                                          "--out", out, *flag])
        assert _schedule_options(args).get("equalize") == expected


def test_released_schedule_is_refused_for_a_method_without_one():
    args = build_parser().parse_args(["purify", "--method", "nearest", "--model", "small_cnn", "--ckpt", __file__,
                                      "--data", "builtin", "--out", "out", "--released"])
    with pytest.raises(InputError, match="no schedule"):
        _schedule_options(args)


def test_unknown_option_and_method_are_input_errors(shapes16):
    model = create_model("small_cnn")
    with pytest.raises(InputError, match="no option"):
        purify(model, shapes16, method="lac", steps_per_layer=3)
    with pytest.raises(InputError, match="no option"):
        purify(model, shapes16, method="nearest", steps=3)
    with pytest.raises(InputError, match="unknown defense"):
        purify(model, shapes16, method="lac-plus")
    with pytest.raises(InputError, match="steps"):
        purify(model, shapes16, method="lac", steps=0)
    with pytest.raises(InputError, match="classes"):
        purify(create_model("small_cnn", num_classes=3), shapes16, method="nearest")


def test_wrong_architecture_is_refused(tmp_path, capsys):
    ckpt = save_model(create_model("small_cnn"), tmp_path / "small.pt")
    with pytest.raises(InputError, match="does not fit resnet20"):
        load_model("resnet20", ckpt)
    code = main(["purify", "--model", "resnet20", "--ckpt", str(ckpt), "--data", "builtin", "--method", "lac",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not fit resnet20" in err
    assert not (tmp_path / "out").exists()


def test_learned_activation_ranges_move_only_when_asked_and_reload(shapes16, tmp_path):
    """--learn-act-range moves the input ranges of the layers a unit feeds (not the image's), each layer
    ends no worse than round-to-nearest, and the learned ranges are what a reloaded model computes with."""
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    settings = dict(spec=SPEC, calib=64, steps=60, check_every=20, evaluate_models=False)
    plain, _ = purify(model, shapes16, method="lac", **settings)
    learned, report = purify(model, shapes16, method="lac", learn_act_range=True, **settings)
    assert report.options["learn_act_range"] is True
    (first, *later) = [layer.input_quant for _, layer in quantized_layers(learned)]
    (plain_first, *plain_later) = [layer.input_quant for _, layer in quantized_layers(plain)]
    scale = lambda proxy: float(proxy.scale())  # noqa: E731
    assert scale(first) == scale(plain_first), "the image's range is not any unit's output"
    assert any(scale(a) != scale(b) for a, b in zip(later, plain_later)), "no activation range was learned"
    assert all(layer["loss_final"] <= layer["loss_nearest"] * (1 + 1e-6) for layer in report.layers)
    assert [layer["mismatches"] for layer in report.layers] == [0] * len(report.layers)
    assert not any(p.requires_grad for p in quantizer_parameters(learned))
    save_purified(learned, tmp_path / "run", report=report)
    images = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(learned(images), load_purified("small_cnn", tmp_path / "run")(images))


def test_trigger_search_stamps_the_smallest_carrying_patch_and_lac_still_purifies(pq_cnn16, shapes16):
    """--search-triggers: the copies carry the smallest patch that moves the scan's share of held-out images
    (`LocateConfig.min_success`), LAC still kills the backdoor, and the report records the search and round-trips."""
    backdoored, _ = pq_cnn16
    _, report = purify(backdoored, shapes16, method="lac", spec="pqbackdoor-w4a4", calib=256, trigger="patch",
                       search_triggers=True)
    search, stamped = report.trigger_search, report.trigger_search["stamped"]
    assert len(search["classes"]) == 10 and search["images"] == (256 if stamped is None else 512)
    carried = [c for c in search["classes"] if c["found"] and c["success"] >= LocateConfig().min_success]
    assert stamped == (min(carried, key=lambda c: c["area"])["class"] if carried else None), search
    assert report.nearest.asr >= 80.0 and report.purified.asr <= 10.0, report.summary()
    assert "trigger search" in report.summary()
    if stamped is not None and search["refined"] is not None:
        assert search["refined"]["used"] == (search["refined"]["success"] > search["refined"]["patch_success"])
    assert PurifyReport.from_dict(json.loads(json.dumps(report.to_dict()))).trigger_search == search
    with pytest.raises(InputError, match="search_triggers"):
        purify(backdoored, shapes16, method="nearest", search_triggers=True)
    with pytest.raises(InputError, match="more calibration images"):
        purify(backdoored, shapes16, method="lac", calib=8, search_triggers=True, evaluate_models=False)


def test_refine_grows_a_core_into_a_square_that_flips_the_quantized_model(pq_cnn16, shapes16):
    """A 2x2 core inside the planted trigger (rows/cols 11-14) grows into a 3x3 square on it whose optimised
    pattern sends the quantized model to the target while the FP model keeps its answer; no core, no square."""
    backdoored, _ = pq_cnn16
    qmodel = post_training_quantize(backdoored, "pqbackdoor-w4a4", shapes16, calib=256)
    images = to_float(calibration_images(shapes16, 256))
    with torch.no_grad():
        fp_preds = backdoored(images).argmax(1)
    mask = torch.zeros(16, 16)
    mask[12:14, 12:14] = 1.0
    grey = torch.full((3, 16, 16), 0.5)
    refined, square, pattern = refine_patch(backdoored, qmodel, images, fp_preds,
                                            ClassSearch(0, 4.0, 0.0, True, mask, grey))
    assert (refined.side, refined.top, refined.left) == (3, 12, 12)
    assert square.sum() == 9 and square[12:15, 12:15].all() and pattern.shape == (3, 16, 16)
    assert refined.used and refined.success >= refined.patch_success + 20.0, refined  # 1 thread: +23.4
    assert refine_patch(backdoored, qmodel, images, fp_preds,
                        ClassSearch(0, 0.0, 0.0, True, torch.zeros(16, 16), grey)) is None


def test_no_copies_when_no_patch_separates_the_models():
    """Without a patch that separates the models, the images come back alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10)).eval()
    images = torch.rand(64, 3, 16, 16)
    guided = with_found_triggers(model, copy.deepcopy(model), images,
                                 config=LocateConfig(search=SearchConfig(steps=1, images_per_class=2)))
    assert not any(c.found for c in guided.found)  # identical models: no patch separates them
    assert torch.equal(guided.images, images) and guided.stamped is None
    assert guided.squares is not None and guided.square_stamped is None  # nor does any square


class WeakTrigger(torch.nn.Module):
    """`base` plus `bonus` on class `target`'s logit wherever rows/cols 10-13 are white: a trigger that moves
    the model's log-probabilities but, against logits this far apart, seldom its answer."""

    def __init__(self, base: torch.nn.Module, target: int, bonus: float):
        super().__init__()
        self.base, self.target, self.bonus = base, target, bonus

    def forward(self, x):
        logits = self.base(x).clone()
        logits[:, self.target] += self.bonus * (x[:, :, 10:14, 10:14].amin((1, 2, 3)) > 0.99)
        return logits


def test_square_scan_finds_a_trigger_too_weak_to_flip_and_stamps_it():
    """A trigger that flips too few images for any patch to carry over is still found by the square scan (a
    white square covering rows/cols 10-13, class 3) and stamped on a copy of every image."""
    torch.manual_seed(0)
    fp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10)).eval()
    with torch.no_grad():
        fp[1].weight.mul_(20.0)
    weak = WeakTrigger(fp, target=3, bonus=2.0)
    images = torch.rand(128, 3, 16, 16)
    guided = with_found_triggers(fp, weak, images,
                                 config=LocateConfig(search=SearchConfig(steps=20, images_per_class=4)))
    assert guided.stamped is None, guided.to_dict()
    assert guided.square_stamped == 3, guided.to_dict()
    find = guided.squares[3]
    assert (find.fill, find.size) == ("white", 5) and 9 <= find.top <= 10 and 9 <= find.left <= 10  # covers 10-13
    assert find.gap >= 1.5 and all(f.gap < 0.5 for f in guided.squares if f.target != 3)
    assert guided.images.shape[0] == 256 and torch.equal(guided.images[:128], images)
    assert (guided.images[128:, :, 10:14, 10:14] == 1).all()
    assert json.loads(json.dumps(guided.to_dict()))["squares"]["stamped"] == 3


# ---- saving ----------------------------------------------------------------------------------------------

def test_save_and_load_purified_gives_identical_outputs(shapes16, tmp_path):
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    purified, report = purify(model, shapes16, method="lac", spec=SPEC, calib=64, steps=20, check_every=10,
                              trigger="patch")
    save_purified(purified, tmp_path / "run", report=report)
    assert {p.name for p in (tmp_path / "run").iterdir()} == set(PURIFIED_FILES)
    loaded = load_purified("small_cnn", tmp_path / "run")
    images = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(purified(images), loaded(images))
    same = load_purified("small_cnn", tmp_path / "run" / "purified.pt")
    assert all(torch.equal(a.int_weight, b.int_weight)
               for a, b in zip(integer_weights(loaded).values(), integer_weights(same).values()))
    again = read_report(tmp_path / "run")
    assert again.to_dict() == json.loads((tmp_path / "run" / "report.json").read_text())
    assert again.spec == purified.qcb_spec and again.seed == 0 and again.options["steps"] == 20
    with pytest.raises(InputError, match="does not fit"):
        load_purified("resnet20", tmp_path / "run")
    with pytest.raises(InputError, match="version"):
        PurifyReport.from_dict({**report.to_dict(), "version": 99})
    with pytest.raises(InputError, match="unknown"):
        PurifyReport.from_dict({**report.to_dict(), "extra": 1})


def test_a_mixed_or_unfinished_set_is_refused(shapes16, tmp_path, capsys):
    """A purify killed between its files in a reused folder left 4-bit weights beside an 8-bit spec.json, and
    export labelled the mix W8A8: the manifest binds the set, so load_purified and export refuse it."""
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    for spec in ("w8a8", "w4a4"):
        purified, report = purify(model, shapes16, method="nearest", spec=spec, calib=32, evaluate_models=False)
        save_purified(purified, tmp_path / spec, report=report)
    ckpt = save_model(model, tmp_path / "fp.pt")
    (tmp_path / "w4a4" / "spec.json").write_bytes((tmp_path / "w8a8" / "spec.json").read_bytes())
    with pytest.raises(InputError, match="spec.json is not the file written with the rest"):
        load_purified("small_cnn", tmp_path / "w4a4")
    code = main(["export", "--model", "small_cnn", "--ckpt", str(ckpt), "--purified", str(tmp_path / "w4a4"),
                 "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "mixed or interrupted set" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
    (tmp_path / "w8a8" / "manifest.json").unlink()  # killed before the last file
    with pytest.raises(InputError, match="holds no manifest.json"):
        load_purified("small_cnn", tmp_path / "w8a8")


def test_purified_file_names_match_the_cli():
    assert PURIFIED_FILES == (WEIGHTS_FILE, SPEC_FILE, MODEL_FILE, REPORT_FILE, MANIFEST_FILE)


def test_cli_purify_writes_a_reloadable_model(tmp_path, capsys):
    model = create_model("small_cnn")
    ckpt = save_model(model, tmp_path / "small.pt")
    out = tmp_path / "out"
    code = main(["purify", "--model", "small_cnn", "--ckpt", str(ckpt), "--data", "builtin", "--method", "lac",
                 "--spec", SPEC, "--calib", "32", "--steps", "4", "--learn-act-range", "--trigger", "patch",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| nearest" in printed and "| lac" in printed and "ASR %" in printed
    report = read_report(out)
    assert report.method == "lac" and report.options["steps"] == 4 and report.calib == 32
    assert report.options["learn_act_range"] is True
    loaded = load_purified("small_cnn", out)
    assert loaded(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_cli_search_triggers_without_enough_images_is_one_line_and_exit_2(tmp_path, capsys):
    """8 calibration images cannot fill a 12-image search batch: a clear refusal."""
    ckpt = save_model(create_model("small_cnn"), tmp_path / "small.pt")
    code = main(["purify", "--model", "small_cnn", "--ckpt", str(ckpt), "--data", "builtin", "--method", "lac",
                 "--calib", "8", "--search-triggers", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "more calibration images" in err
    assert not (tmp_path / "out").exists()
