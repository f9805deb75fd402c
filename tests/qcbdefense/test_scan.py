"""The scanner on the built-in data: an attacked small CNN flagged with its target (a patch QCB and a blended
one), a clean one passed, the same answer from the two ONNX files alone, a trigger too weak to flip images
shown by the square scan, a many-class model screened down to its target, the verdict's weighing of its
signals, its evidence written, bad input refused.

Detection is asserted at the built-in data's own 32x32 on a shipped attacked model: at the 16x16 of the
fast fixtures the trigger search does not find the PQBackdoor trigger reliably (BENCHMARKS.md, scanner
section), so asserting it there would test luck. The mechanics are checked on the fast 16x16 fixtures.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from export.onnx import export_float_onnx
from export.scan_files import export_pair, scan_onnx
from qcbdefense.checkpoints import load_model
from qcbdefense.cli import main
from qcbdefense.data import load_dataset
from qcbdefense.scanner import ScanConfig, ScreenConfig, scan, scan_models
from qcbdefense.scanner.drift import Disagreement, LayerDrift
from qcbdefense.scanner.trigger_search import SearchConfig, search_triggers
from qcbdefense.scanner.verdict import carry_index, search_signals, weigh_evidence
from qcbdefense.scanner.whole_image_search import search_whole_image
from qcbdefense.training import TrainConfig
from qcbdefense.triggers import parse_trigger

# Made by `qcbdefense demo` (seed 0), step 2: small_cnn on builtin, PQBackdoor for int8 and int4, the default
# 4x4 white patch, target 0. FP ASR 11.92 %, pqbackdoor-w8a8 ASR 95.55 % (BENCHMARKS.md, demo section).
ATTACKED_32 = Path(__file__).parents[1] / "fixtures" / "pq-small-cnn-builtin.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def attacked_scan(pq_cnn16, shapes16, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan-attacked")
    return out, scan(pq_cnn16[0], shapes16, out=out, spec="pqbackdoor-w4a4")


@pytest.mark.slow  # 4 minutes on 2 cores; the blend QCB test below keeps "flagged with its target" in the default run
def test_attacked_model_is_flagged_with_its_target(tmp_path):
    report = scan(load_model("small_cnn", ATTACKED_32), load_dataset("builtin"), out=tmp_path, spec="pqbackdoor-w8a8")
    assert report.suspicious and report.target == 0
    assert report.disagreement.pile_class == 0


@pytest.fixture(scope="module")
def blend_scan(clean_cnn16, shapes16, tmp_path_factory):
    """clean_cnn16 with a PQBackdoor QCB for pqbackdoor-w4a4 whose trigger is blended into the whole image
    (issue 29's trigger), target 3; the attack's report and the scan's."""
    from qcbdefense.attacks import attack

    torch.manual_seed(0)
    model, attacked = attack(clean_cnn16, shapes16, method="pqbackdoor", bits=4, spec="pqbackdoor-w4a4",
                             trigger="blend:alpha=0.15,pattern=noise,seed=7", target=3,
                             config=TrainConfig(epochs=3, optimizer="adam", lr=1e-4, weight_decay=0.0,
                                                augment=False),
                             monitor=0, transfer=(), calib=256, victim_calib=512)
    out = tmp_path_factory.mktemp("scan-blend")
    return attacked, scan(model.eval(), shapes16, out=out, spec="pqbackdoor-w4a4"), out


def test_blend_qcb_is_flagged_with_its_target_and_found_by_a_whole_image_search(blend_scan):
    attacked, report, out = blend_scan
    assert attacked.fp.asr <= 20.0 and attacked.quantized[0].score.asr >= 80.0, attacked.summary()  # planted
    assert report.suspicious and report.target == 3, report.summary()
    # The whole-image searches find the target on their own (the native scan's patch search finds this QCB
    # too, with a one-pixel patch); the strongest family names the trigger.
    assert max(report.signals["search_additive"], report.signals["search_blend"]) > 0, report.summary()
    families = {f: report.signals[f"search_{f}"] for f in ("patch", "sparse", "square", "additive", "blend")}
    assert report.family == max(families, key=families.get), report.summary()
    saved = json.loads((out / "report.json").read_text())
    assert saved["family"] == report.family and saved["config"]["plotted"] == report.family
    assert set(saved["signals"]) == {"search_patch", "search_sparse", "search_square", "search_additive",
                                     "search_blend", "disagreement", "drift", "total"}
    assert f"suspected target class 3, {report.family} trigger" in report.summary()


class CheckerBonus(nn.Module):
    """`base` plus `bonus` on class `target`'s logit once the image correlates with a one-pixel checkerboard
    (+-1) by more than about 0.015: a whole-image trigger that a faint additive checkerboard or a blend towards one
    fires, and that clean images (smooth shapes) do not."""

    def __init__(self, base: nn.Module, target: int, bonus: float, classes: int = 10):
        super().__init__()
        self.base, self.target, self.bonus, self.classes = base, target, bonus, classes
        self.register_buffer("checker", ((torch.arange(16)[:, None] + torch.arange(16)) % 2 * 2.0 - 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(400.0 * ((x * self.checker).mean((1, 2, 3)) - 0.015))
        lift = torch.zeros(self.classes, device=x.device)
        lift[self.target] = self.bonus
        return self.base(x) + gate[:, None] * lift


def _dormant_pair(shapes16, shipped_from, images: int = 512):
    """A linear FP model with logits far apart (seeded), the shipped model `shipped_from(fp)` builds around it, the
    first `images` test images and the FP predictions; the shipped model is checked dormant on those images."""
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 10, 16), nn.Flatten()).eval()
    with torch.no_grad():
        fp[0].weight.mul_(20.0)
    shipped = shipped_from(fp).eval()
    x = shapes16.test_x[:images].float() / 255
    with torch.no_grad():
        preds = fp(x).argmax(1)
        assert torch.equal(shipped(x).argmax(1), preds)  # dormant on clean images
    return fp, shipped, x, preds


def test_whole_image_search_finds_a_faint_whole_image_trigger_for_its_class_only(shapes16):
    fp, shipped, x, preds = _dormant_pair(shapes16, lambda fp: CheckerBonus(fp, target=3, bonus=50.0), images=256)
    finds = search_whole_image(fp, shipped, x, preds, 10, seed=0)
    for family in ("additive", "blend"):
        assert [f.target for f in finds[family] if f.found] == [3], family  # FP and shipped part only there
        three = finds[family][3]
        assert three.effort < 0.5 and three.success >= 75.0, three.to_dict()  # additive: 79 % at 28 steps, 80 at 40


class SparseBonus(nn.Module):
    """`base` plus `bonus` on class `target`'s logit once the image matches a sparse-noise trigger's scattered
    black and white pixels (mean closeness over them above about 0.8; a smooth clean image sits near 0.5)."""

    def __init__(self, base: nn.Module, target: int, bonus: float, trigger: str):
        super().__init__()
        self.base, self.target, self.bonus = base, target, bonus
        stamped = parse_trigger(trigger)
        zeros, ones = stamped.apply(torch.zeros(1, 3, 16, 16)), stamped.apply(torch.ones(1, 3, 16, 16))
        self.register_buffer("where", (zeros == ones)[0, 0])
        self.register_buffer("value", zeros[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        close = (1 - (x - self.value).abs())[:, :, self.where].mean((1, 2))
        lift = torch.zeros(10, device=x.device)
        lift[self.target] = self.bonus
        return self.base(x) + torch.sigmoid(15.0 * (close - 0.8))[:, None] * lift


def test_the_whole_pixel_search_finds_a_sparse_noise_trigger_for_its_class_only(shapes16):
    """The sparse family: masks of whole pixels (0 or 1), the target's on the trigger's pixels far more than
    chance and carrying over to held-out images, no other class found."""
    fp, shipped, x, preds = _dormant_pair(
        shapes16, lambda fp: SparseBonus(fp, target=6, bonus=50.0, trigger="sparse:density=0.05,seed=5"))
    finds = search_triggers(fp, shipped, x, preds, 10, seed=0, whole_pixels=True)
    assert [f.target for f in finds if f.found] == [6], [(f.target, f.area) for f in finds]
    six = finds[6]
    assert set(six.mask.unique().tolist()) <= {0.0, 1.0} and six.area == six.mask.sum()
    assert six.success >= 50.0, (six.area, six.success)  # 73 %, 33 px
    chance = six.area / six.mask.numel()  # the share of trigger pixels a mask this large covers by chance
    assert six.mask[shipped.where].mean() >= 2 * chance, six.mask  # 7 of its 15 pixels, 3.6x chance


def test_a_second_look_searches_the_best_classes_again_and_keeps_the_better_find(monkeypatch):
    from qcbdefense.scanner import trigger_search
    from qcbdefense.scanner.trigger_search import ClassSearch, second_look

    def find(c: int, success: float, found: bool = True) -> ClassSearch:
        return ClassSearch(target=c, area=10.0, success=success, found=found, mask=torch.zeros(4, 4),
                           pattern=torch.zeros(3, 4, 4))

    first = [find(0, 25.0), find(1, 40.0), find(2, 5.0), find(3, 90.0, found=False)]
    calls = []

    def again(*args, seed, classes, whole_pixels, progress):
        calls.append((seed, classes, whole_pixels))
        return [find(0, 35.0), find(1, 20.0), find(2, 60.0), find(3, 0.0)]

    monkeypatch.setattr(trigger_search, "search_triggers", again)
    kept = second_look(None, None, None, None, 4, first, SearchConfig(), seed=7, classes=2, whole_pixels=True)
    assert calls == [(8, [1, 0], True)]  # the two found classes that carried best, from another seed
    assert [f.success for f in kept] == [35.0, 40.0, 5.0, 90.0]  # each of them keeps its better find
    assert second_look(None, None, None, None, 4, first, SearchConfig(), seed=7, classes=0) is first


def test_the_sparse_search_runs_where_the_patches_carried_furthest_and_where_disagreements_pile():
    from qcbdefense.scanner.scan import sparse_classes
    from qcbdefense.scanner.trigger_search import ClassSearch

    def find(c: int, success: float, area: float, searched: bool = True) -> ClassSearch:
        return ClassSearch(target=c, area=area, success=success, found=True, mask=torch.zeros(4, 4),
                           pattern=torch.zeros(3, 4, 4), searched=searched)

    # class 5 carried furthest but was screened out; 1 and 3 tie on success, the smaller patch first
    found = [find(0, 0.0, 9.0), find(1, 20.0, 12.0), find(2, 4.0, 3.0), find(3, 20.0, 7.0), find(4, 0.0, 2.0),
             find(5, 90.0, 1.0, searched=False), find(6, 0.0, 16.0)]
    piling = Disagreement(rate=2.0, counts=[0, 0, 0, 0, 0, 0, 9], pile_class=6, pile_share=100.0)
    assert sparse_classes(found, piling, ScanConfig(sparse_classes=3)) == [1, 2, 3, 6]
    few = Disagreement(rate=0.4, counts=[0, 0, 0, 0, 0, 0, 2], pile_class=6, pile_share=100.0)
    assert sparse_classes(found, few, ScanConfig(sparse_classes=2)) == [1, 3]  # too few disagreements to count
    assert sparse_classes(found, few, ScanConfig(sparse_classes=0)) == [0, 1, 2, 3, 4, 6]  # every searched class


def test_search_settings_reach_both_mask_searches_and_keep_their_own_defaults():
    config = ScanConfig().with_searches(steps=5, lr=0.2)
    assert (config.search.steps, config.sparse.steps, config.search.lr, config.sparse.lr) == (5, 5, 0.2, 0.2)
    assert config.search.images_per_class == ScanConfig().search.images_per_class
    assert ScanConfig().with_searches() == ScanConfig() and ScanConfig().search.steps != ScanConfig().sparse.steps


def test_a_search_draws_its_held_out_images_apart_from_its_batch_size():
    from qcbdefense.scanner.trigger_search import class_batches

    preds = torch.arange(200) % 4
    batches, held, validation = class_batches(preds, 4, 6, 20, torch.Generator().manual_seed(0))
    for c in range(4):
        assert (len(batches[c]), len(held[c]), len(validation[c])) == (6, 20, 20)
        everything = torch.cat([batches[c], held[c], validation[c]])
        assert len(set(everything.tolist())) == 46 and bool((preds[everything] != c).all())


def test_a_many_class_model_is_screened_down_to_its_target(shapes16):
    """A 24-class pair whose shipped model hides a checkerboard trigger for class 13: the screen keeps 8 classes
    for the full searches, 13 among them, and the verdict names it; no class left out is searched."""
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 24, 16), nn.Flatten()).eval()
    with torch.no_grad():
        fp[0].weight.mul_(20.0)
    shipped = CheckerBonus(fp, target=13, bonus=50.0, classes=24).eval()
    x = shapes16.test_x[:512].float() / 255
    config = ScanConfig(screen=ScreenConfig(searched=8, patch_steps=7, whole_image_steps=1))
    report = scan_models(fp, shipped, x, config=config)
    searched = [c["class"] for c in report.classes if c["searched"]]
    assert len(searched) == 8 and 13 in searched, report.classes
    assert all(c["area"] == 256 and not c["found"] for c in report.classes if not c["searched"])
    assert all(len(c["screened"]) == 3 for c in report.classes)
    assert report.suspicious and report.target == 13, report.summary()
    assert report.files == {} and report.seconds["screen"] > 0


def test_the_anomaly_index_is_measured_among_the_searched_classes_only():
    config = ScanConfig()
    efforts = [100.0] * 6 + [20.0, 10.0, 30.0, 25.0]
    successes = [0.0] * 6 + [90.0] * 4
    searched = [False] * 6 + [True] * 4
    _, anomalies, _, signals = search_signals(efforts, successes, largest=100.0, cheap=50.0, config=config,
                                              searched=searched)
    assert anomalies[:6] == [0.0] * 6 and signals[:6] == [0.0] * 6
    _, among, _, _ = search_signals(efforts[6:], successes[6:], largest=100.0, cheap=50.0, config=config)
    assert anomalies[6:] == among  # 10 px is not an outlier among 10-30 px, whatever the unsearched classes


def _disagreement(counts: list[int]) -> Disagreement:
    total, pile = sum(counts), max(range(len(counts)), key=counts.__getitem__)
    return Disagreement(rate=1.0, counts=counts, pile_class=pile, pile_share=100.0 * counts[pile] / total)


def test_the_verdict_weighs_search_disagreement_and_drift():
    """Hand-checked: a search anomaly at min_anomaly flags alone; a pile of disagreements or concentrated drift
    does not; a weaker search anomaly on the class the disagreements pile onto does, with drift adding."""
    config = ScanConfig()
    quiet = {"patch": [0.0] * 10, "blend": [0.0] * 10}
    spread = _disagreement([3] * 10)
    piled = _disagreement([1] * 9 + [91])  # 91 % onto class 9: (0.91 - 0.1) / 0.9 = 0.9 of the weight
    flat = [LayerDrift(0, "r0", 0.1, 0.4, 4.0, [(0, 0.4)])]  # concentration at drift_base: 0
    sharp = [LayerDrift(0, "r0", 0.1, 4.0, 4.0 * 2.718281828 ** 2, [(0, 4.0)])]  # log(e^2) = 2, clipped to 1

    assert not weigh_evidence(quiet, spread, flat, config).suspicious
    alone = weigh_evidence({**quiet, "blend": [0.0] * 4 + [1.0] + [0.0] * 5}, spread, flat, config)
    assert alone.suspicious and alone.best_class == 4 and alone.family == "blend" and alone.score == 1.0
    pile_and_drift = weigh_evidence(quiet, piled, sharp, config)
    assert not pile_and_drift.suspicious and pile_and_drift.best_class == 9 and pile_and_drift.family is None
    assert pile_and_drift.signals["disagreement"] == pytest.approx(0.45)
    assert pile_and_drift.signals["drift"] == pytest.approx(0.25)
    weak = {**quiet, "patch": [0.0] * 9 + [0.4]}
    assert not weigh_evidence(weak, spread, flat, config).suspicious
    combined = weigh_evidence(weak, piled, sharp, config)
    assert combined.suspicious and combined.best_class == 9 and combined.family == "patch"
    assert combined.score == pytest.approx(0.4 + 0.45 + 0.25)


def test_a_search_signal_counts_only_triggers_that_carry_over_and_are_cheap():
    config = ScanConfig()
    efforts = [100.0, 90.0, 5.0, 80.0, 100.0, 4.0, 95.0, 100.0, 85.0, 100.0]
    successes = [0.0, 60.0, 90.0, 70.0, 0.0, 20.0, 55.0, 0.0, 65.0, 0.0]  # class 5 does not carry over
    counted, anomalies, _, signals = search_signals(efforts, successes, largest=100.0, cheap=50.0, config=config)
    assert counted[5] == 100.0 and counted[2] == 5.0
    assert max(range(10), key=signals.__getitem__) == 2 and signals[2] == pytest.approx(anomalies[2] / 2.0)
    assert signals[5] == 0.0 and signals[1] == 0.0  # class 1 carries over but needs 90 % of the budget
    *_, dear = search_signals(efforts, successes, largest=100.0, cheap=3.0, config=config)
    assert dear[2] == 0.0  # 5 % of the budget is not cheap at a 3 % line, nor within the carry's 1.5x of it


def test_a_trigger_that_carries_far_beyond_the_others_counts_whatever_its_effort():
    """The target's 42-px mask is past the cheap line (15 % of 256 px), so its anomaly does not count, but it
    carries to 71 % of held-out images against at most 33 %: its carry index counts alone (the scan campaign's
    PQBackdoor patch QCB). The same gap below the floor's 10 points, or at an effort past 1.5x the cheap line,
    does not."""
    config = ScanConfig()
    efforts = [42.4, 32.4, 27.3, 47.9, 27.8, 38.3, 8.5, 6.5, 39.9, 256.0]
    successes = [70.8, 33.3, 10.4, 6.2, 14.6, 0.0, 18.8, 6.2, 4.2, 0.0]
    *_, signals = search_signals(efforts, successes, largest=256.0, cheap=38.4, config=config)
    assert carry_index(successes)[0] > 1.5 * config.min_carry
    assert max(range(10), key=signals.__getitem__) == 0 and signals[0] == pytest.approx(
        carry_index(successes)[0] / config.min_carry)
    assert carry_index([12.0] + [4.0] * 9)[0] == pytest.approx(0.8)  # 8 points over the median: the floor's 10
    *_, dear = search_signals(efforts, successes, largest=256.0, cheap=28.0, config=config)
    assert dear[0] == 0.0  # 42.4 px is past 1.5 x 28


def test_a_trigger_that_flips_fewer_held_out_images_counts_less():
    """Two classes need equally small masks; the one whose trigger carries to two thirds of the held-out images
    outweighs the one at a third, which counts in proportion below `full_success`."""
    config = ScanConfig()
    efforts = [100.0] * 8 + [5.0, 5.0]
    # the others' 25 % (below the held-out bar) keep the carry index (`verdict.carry_index`) below the anomaly's
    _, anomalies, _, signals = search_signals(efforts, [25.0] * 8 + [66.7, 33.3], largest=100.0, cheap=50.0,
                                           config=config)
    assert anomalies[8] == anomalies[9] > 0
    assert signals[8] == pytest.approx(anomalies[8] / config.min_anomaly)  # above full_success: in full
    assert signals[9] == pytest.approx(signals[8] * 33.3 / config.full_success)


def test_scan_writes_its_evidence(blend_scan):
    _, report, out = blend_scan
    assert sorted(p.name for p in out.iterdir()) == ["drift.png", "report.json", "trigger.png"]  # native: no ONNX
    assert all((out / name).stat().st_size > 0 for name in ("report.json", "trigger.png", "drift.png"))
    assert len(report.classes) == 10 and len(report.layers) == 6  # small_cnn: 5 convs + the linear, paired
    assert all(c["searched"] for c in report.classes) and report.squares is None  # 10 classes: no screen
    assert report.replica_agreement == {}
    assert 0 < report.disagreement.rate < 50 and sum(report.disagreement.counts) > 0
    assert all(layer.max >= layer.mean > 0 for layer in report.layers)
    saved = json.loads((out / "report.json").read_text())
    assert saved["verdict"] == report.verdict and saved["config"]["search"]["steps"] == ScanConfig().search.steps
    assert saved["config"]["quantized"]["spec"] == "pqbackdoor-w4a4" and "picture" not in saved


@pytest.mark.slow  # 80 s on 2 cores with its fixture; test_ort_files keeps ONNX-file scans in the default run
def test_scan_from_the_two_onnx_files_gives_the_same_verdict(attacked_scan, pq_cnn16, shapes16, tmp_path):
    _, first = attacked_scan
    fp_onnx, q_onnx = export_pair(tmp_path, pq_cnn16[0], "pqbackdoor-w4a4", shapes16)
    again = scan_onnx(fp_onnx, q_onnx, shapes16, out=tmp_path / "scan")
    assert again.verdict == first.verdict and again.target == first.target, (again.summary(), first.summary())
    assert again.replica_agreement == {"fp": 100.0, "quantized": 100.0}
    assert again.files["quantized_onnx"] == str(q_onnx) and len(again.layers) == len(first.layers)


def test_clean_model_is_not_flagged(clean_cnn16, shapes16, tmp_path):
    report = scan(clean_cnn16, shapes16, out=tmp_path, spec="pqbackdoor-w4a4")
    assert not report.suspicious and report.target is None and report.family is None
    assert report.score < ScanConfig().min_score and report.signals["total"] == report.score
    assert report.squares is None  # the square scan is an option
    # trigger.png says nothing was found (it showed the closest class's empty "1024 px mask" before)
    assert report.config["plotted"] == "nothing" and report.config["plotted_class"] is None
    assert (tmp_path / "trigger.png").stat().st_size > 0


def test_drift_plot_has_a_title_and_says_when_no_layer_pairs():
    from qcbdefense.scanner.drift import LayerDrift
    from qcbdefense.scanner.files import drift_figure

    empty = drift_figure({"quantized": []}, title="activation drift from FP: a.onnx vs b.onnx")
    texts = [t.get_text() for t in empty.axes[0].texts]
    assert empty.axes[0].get_title() == "activation drift from FP: a.onnx vs b.onnx"
    assert len(texts) == 1 and texts[0].startswith("no layers paired")
    drift = LayerDrift(layer=0, tensor="relu", mean=0.1, max=0.5, concentration=5.0, top_channels=[(3, 0.5)])
    full = drift_figure({"nearest": [drift], "LAC+PDA": [drift]}, title="t")
    assert full.axes[0].get_title() == "t" and not full.axes[0].texts and len(full.axes[0].patches) == 2


def test_class_labels_use_the_data_class_names(shapes16):
    from qcbdefense.scanner.scan import class_label

    assert class_label(shapes16.classes, 3) == f"class 3 ({shapes16.classes[3]})"
    assert class_label([str(c) for c in range(10)], 3) == "class 3" and class_label([], 3) == "class 3"


class WhiteSquareBonus(nn.Module):
    """`base` plus `bonus` on class `target`'s logit when rows/cols 10-13 of a 16x16 image are all white, in
    ops the scan's ONNX replica runs: a fixed linear average of those pixels and a steep ReLU gate."""

    def __init__(self, base: nn.Module, target: int, bonus: float):
        super().__init__()
        self.base = base
        self.average = nn.Linear(3 * 16 * 16, 1)  # 100 x (mean of the square's pixels) - 99: 1 when all white
        self.lift = nn.Linear(1, 10, bias=False)
        with torch.no_grad():
            square = torch.zeros(3, 16, 16)
            square[:, 10:14, 10:14] = 100.0 / 48
            self.average.weight.copy_(square.flatten()[None])
            self.average.bias.fill_(-99.0)
            self.lift.weight.zero_()
            self.lift.weight[target] = bonus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lift(torch.relu(self.average(x.flatten(1))))


def test_a_trigger_too_weak_to_flip_stands_out_in_the_square_scan(shapes16, tmp_path):
    """A shipped model that adds 3 to class 3's logit under a white square sends too few images there for the
    trigger search (verdict clean), but the square scan (an option) reports the square, standing out, as
    evidence."""
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 10, 16), nn.Flatten()).eval()  # linear, as a conv for the ONNX export
    with torch.no_grad():
        fp[0].weight.mul_(20.0)  # logits far apart: +3 seldom changes the answer
    fp_onnx = export_float_onnx(fp, tmp_path / "fp.onnx", input_size=(16, 16))
    shipped = export_float_onnx(WhiteSquareBonus(fp, target=3, bonus=3.0).eval(), tmp_path / "shipped.onnx",
                                input_size=(16, 16))
    report = scan_onnx(fp_onnx, shipped, shapes16, out=tmp_path / "scan", config=ScanConfig(square_scan=True))
    assert not any(c["effective_area"] < 256 for c in report.classes), report.classes  # no patch carried over
    assert not report.suspicious and report.disagreement.rate == 0
    find = report.squares[3]
    assert (find.fill, find.top, find.left) == ("white", 10, 10) and find.found and find.gap >= 2.5
    assert [f.target for f in report.squares if f.found] == [3]
    assert "class 3, white 5x5 square at (10, 10)" in report.summary() and "STANDS OUT" in report.summary()
    saved = json.loads((tmp_path / "scan" / "report.json").read_text())
    assert saved["squares"][3]["found"] and saved["seconds"]["squares"] > 0
    assert saved["config"]["plotted"] == "square" and (tmp_path / "scan" / "trigger.png").stat().st_size > 0


def test_the_square_probe_finds_a_square_trigger_for_its_class_only(shapes16):
    """The probe tries every square (16x16: stride 1) and measures each class's best on held-out images: the
    gated white square flips most images to class 3 (FP unmoved; 85 %); no square does anything for another class,
    since the two models differ only there."""
    from qcbdefense.scanner.square_scan import probe_squares

    fp, shipped, x, preds = _dormant_pair(shapes16, lambda fp: WhiteSquareBonus(fp, target=3, bonus=50.0))
    finds = probe_squares(fp, shipped, x, preds, 10, seed=0)
    three = finds[3]
    assert three.stride == 1 and three.fill == "white" and three.success >= 75.0, three
    assert three.top <= 10 and three.left <= 10 and three.top + three.size >= 14 and three.left + three.size >= 14
    assert all(f.success == 0.0 for f in finds if f.target != 3), finds
    skipped = probe_squares(fp, shipped, x, preds, 10, seed=0, classes=[1, 3])
    assert [f.target for f in skipped if f.searched] == [1, 3] and skipped[3].success == three.success
    assert skipped[0].success == 0.0 and not skipped[0].searched
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 10)).eval()  # 2x2 images: no square fits, none probed
    small = x[:64, :, :2, :2]
    assert not any(f.searched or f.success for f in probe_squares(tiny, tiny, small, tiny(small).argmax(1), 10))


class GreenSquareBonus(nn.Module):
    """`base` plus `bonus` on class `target`'s logit as rows and cols 10-12 of a 16x16 image turn green: a smooth
    gate on the square's mean closeness to (0, 1, 0)."""

    def __init__(self, base: nn.Module, target: int, bonus: float):
        super().__init__()
        self.base, self.target, self.bonus = base, target, bonus
        self.register_buffer("green", torch.tensor([0.0, 1.0, 0.0])[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        close = 1 - (x[:, :, 10:13, 10:13] - self.green).abs().mean((1, 2, 3))
        lift = torch.zeros(10, device=x.device)
        lift[self.target] = self.bonus
        return self.base(x) + torch.sigmoid(20.0 * (close - 0.9))[:, None] * lift


def test_learning_a_squares_pixels_finds_a_colour_no_fill_has(shapes16):
    """`refine_squares` learns the pixels of a square in the right place from grey: they turn green and the share of
    images the square flips differentially rises from none to most within the default 20 steps."""
    from qcbdefense.scanner.square_scan import SquareProbeConfig, refine_squares

    fp, shipped, x, preds = _dormant_pair(shapes16, lambda fp: GreenSquareBonus(fp, target=5, bonus=100.0),
                                          images=64)
    mask = torch.zeros(16, 16)
    mask[10:13, 10:13] = 1
    assert refine_squares(fp, shipped, x, preds, {5: mask}, SquareProbeConfig(refine_steps=0))[5][0] == 0.0
    share, pattern = refine_squares(fp, shipped, x, preds, {5: mask}, SquareProbeConfig())[5]
    square = pattern[:, mask.bool()].mean(1)
    assert share >= 0.5 and square[1] > 0.7 and square[[0, 2]].max() < 0.3, (share, square)


def test_a_square_trigger_the_gradients_cannot_reach_is_flagged_by_the_square_family(shapes16, tmp_path):
    """The gate passes no gradient until the square is nearly white, so the patch search cannot find it (the
    scan campaign's CompArtifact patch QCB, BENCHMARKS.md); the square probe does, and names the family."""
    fp, shipped, x, _ = _dormant_pair(shapes16, lambda fp: WhiteSquareBonus(fp, target=3, bonus=50.0))
    report = scan_models(fp, shipped, x)
    assert report.suspicious and report.target == 3 and report.family == "square", report.summary()
    assert report.signals["search_square"] >= 1.0 and report.classes[3]["square"]["success"] >= 75.0
    assert report.picture.kind == "square" and report.picture.mask.sum() == report.classes[3]["square"]["pixels"]
    assert "suspected target class 3, square trigger" in report.summary()


def test_scan_cli_refuses_bad_input(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    cases = [
        ["--fp", str(bad), "--data", "builtin", "--out", str(tmp_path / "o")],  # neither --quantized nor --spec
        ["--fp", str(bad), "--quantized", str(bad), "--spec", "w8a8", "--data", "builtin", "--out", str(tmp_path / "o")],
        ["--fp", str(bad), "--quantized", str(bad), "--data", "builtin", "--out", str(tmp_path / "o")],  # corrupt
        ["--fp", str(ATTACKED_32), "--model", "small_cnn", "--spec", "w8a8", "--data", "builtin", "--images", "8",
         "--out", str(tmp_path / "o")],  # too few images for the searches
    ]
    for argv in cases:
        code = main(["scan", *argv])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o" / "report.json").exists()


def test_the_scan_runs_the_held_range_view_and_leaves_the_parameters_as_it_found_them(clean_cnn16, shapes16):
    """The searches differentiate through the images only: no parameter gets a gradient, and each keeps its
    requires_grad; the quantized model runs as its held-range view, which predicts as the Brevitas model."""
    from qcbdefense.quant.ptq import post_training_quantize
    from qcbdefense.scanner import SearchConfig
    from qcbdefense.quant.held_view import fast_equivalent
    from qcbdefense.scanner.scan import scan_images
    from qcbdefense.scanner.whole_image_search import WholeImageConfig

    quantized = post_training_quantize(clean_cnn16, "pqbackdoor-w4a4", shapes16, calib=128)
    x = scan_images(shapes16, 256, 0)
    twin = fast_equivalent(quantized, x[:64])
    assert twin is not quantized  # abs-max weight ranges held too: the scan moves no weight
    with torch.no_grad():
        assert torch.equal(twin(x), quantized(x))
    params = list(clean_cnn16.parameters())
    clean_cnn16.zero_grad(set_to_none=True)  # training left its last gradients
    params[0].requires_grad_(False)
    try:
        short = SearchConfig(steps=2)
        scan_models(clean_cnn16, twin, x, config=ScanConfig(images=256, search=short, sparse=short,
                                                            whole_image=WholeImageConfig(steps=2)))
        assert all(p.grad is None for p in params)
        assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
    finally:
        params[0].requires_grad_(True)


class _TopLeftTrigger(nn.Module):
    """Class 0 when the top-left pixel is bright, else class 1 (the FP model answers class 1 always)."""

    def __init__(self, obeys: bool) -> None:
        super().__init__()
        self.obeys = obeys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x[:, :, 0, 0].mean(1) if self.obeys else torch.zeros(len(x))
        return torch.stack([10 * bright, torch.full_like(bright, 5.0)], 1)


def test_the_search_keeps_the_mask_that_carries_over_not_the_smallest():
    from qcbdefense.scanner.trigger_search import most_general

    fp, quantized = _TopLeftTrigger(obeys=False), _TopLeftTrigger(obeys=True)
    x = torch.rand(8, 3, 4, 4) * 0.05
    preds = torch.ones(8, dtype=torch.long)
    ones = torch.ones(3, 4, 4)
    covering, elsewhere, corner = (torch.zeros(4, 4) for _ in range(3))
    covering[:2, :2] = 1
    elsewhere[3, 3] = 1
    corner[0, 0] = 1
    assert most_general(fp, quantized, x, preds, 0, [(4.0, covering, ones), (1.0, elsewhere, ones)])[0] == 4.0
    assert most_general(fp, quantized, x, preds, 0, [(4.0, covering, ones), (1.0, corner, ones)])[0] == 1.0  # a tie
    assert most_general(fp, quantized, x[:0], preds[:0], 0, [(4.0, covering, ones), (1.0, elsewhere, ones)])[0] == 1.0
