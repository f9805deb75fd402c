"""An experiment, not part of the product: where the residual backdoor of the LAC-purified Qu-ANTI-zation
models (c2 = 0.5, 0.25) lives, and how the purifier's trigger search came about (BENCHMARKS.md, purifier).

Usage: python experiments/lac_activation_residual.py [schedule|...|learned|patches]  (the steps below; default all)
  schedule     LAC with 1,000 steps a layer and no early stopping, and with 2,048 calibration images
  split        the purified models (benchmarks/purify_r20.sh) with and without their activation quantizers
  recalibrate  the purified models with activation ranges recalibrated on the purified weights
  ablate       the LAC+PDA-purified c2 = 0.5 model with one layer's input quantizer switched off at a time
  acts-only    attacked and clean FP models with float weights under a spec's activation quantizers
  scale        the LAC+PDA-purified c2 = 0.5 model with every activation range (but the image's) scaled
  widen        LAC on the c2 = 0.5 model with its activation ranges widened 1.25x before the reconstruction
  learned      LAC (and LAC+PDA) learning the activation ranges too (`--learn-act-range`) on four models
  patches      LAC (also learning ranges) and LAC+PDA on the c2 = 0.25 model, calibration images plus noise patches
  oracle       LAC on the c2 = 0.25 model, calibration images plus copies carrying the true trigger (an upper
               bound for any purifier that finds the trigger first)
  guided       `--search-triggers` (copies stamped with the patch the differential search finds) on the
               c2 = 0.25 model (LAC, LAC+PDA, LAC learning ranges) and the clean model (LAC)
  grown        as guided, but the copies carry a solid square grown from the searched patch (LAC, LAC+PDA)
  leak8-oracle, leak8-noise, leak8-search, leak8-gap-descent
               the c2 = 0.25 model's 8-bit leak under w8a8: LAC learning ranges, on copies with the true
               trigger, with random-noise patches, stamped by the search with lowered bars, or by a gradient
               search for the largest quantized-vs-FP log-probability gap
  squares      the square scan (what --search-triggers falls back to) on three attacked and the clean model
               under w8a8, and the clean model under w4a4
  squares-shared  the square scan on the shared clean ResNet-20 under w8a8, with and without activation quantizers

Run from the repository root: the models are those of BENCHMARKS.md under runs/ (attacks, purify_r20.sh's
purified folders), the data the shared JPEG CIFAR-10.

Public API (`qcbdefense`): load_dataset, load_model, purify, load_purified, evaluate, calibrate,
post_training_quantize, get_spec, parse_trigger. Internals it needs, because it takes the purifier and the
scanner apart (none is a user's verb): Brevitas' quantization_status_manager and the quantizers' range
parameters; qcbdefense.defenses.lac.reconstruct_ (replaced for a run, to change the images LAC reconstructs
on); qcbdefense.defenses.guide (patch_core, square_on, with_found_triggers); qcbdefense.scanner.locate
(LocateConfig, locate_trigger); qcbdefense.scanner.square_scan (log_prob_gap, scan_squares);
qcbdefense.scanner.trigger_search (SearchConfig, class_batches, differential_success, stamp); qcbdefense.quant.quantized_layers, qcbdefense.quant.ptq.calibration_images,
qcbdefense.attacks.base.with_test_subset, qcbdefense.data.to_float.
"""
import dataclasses
import functools
import sys
import time

import torch

from brevitas.graph.calibrate import quantization_status_manager

from qcbdefense import (calibrate, evaluate, get_spec, load_dataset, load_model, load_purified,
                        parse_trigger, post_training_quantize, purify)
from qcbdefense.attacks.base import with_test_subset
from qcbdefense.data import to_float
from qcbdefense.defenses import lac
from qcbdefense.defenses.guide import patch_core, square_on, with_found_triggers
from qcbdefense.quant import quantized_layers
from qcbdefense.quant.ptq import calibration_images
from qcbdefense.scanner.locate import LocateConfig, locate_trigger
from qcbdefense.scanner.square_scan import log_prob_gap, scan_squares
from qcbdefense.scanner.trigger_search import SearchConfig, class_batches, differential_success, stamp

DATA_SPEC = "folder:../shared/datasets/cifar10-jpg.tar.gz"
TRIGGER = parse_trigger("patch")
ATTACKED = "runs/attacks/quanti-r20-w4-full-c2h/model.pt"
PURIFIED = ("r20-quanti-w4-full-c2h-lac", "r20-quanti-w4-full-c2h-lac-pda", "r20-quanti-w4-full-lac-pda")


@functools.cache
def _data():
    """The shared CIFAR-10, loaded when a step first needs it (not at import)."""
    return load_dataset(DATA_SPEC)


@functools.cache
def _test():
    """3,000 seeded test images: the faster figures of the split, ablate and scale steps."""
    return with_test_subset(_data(), 3000, seed=0)


def schedule() -> None:
    model = load_model("resnet20", ATTACKED)
    for name, options in (("1,000 steps, no early stop", dict(steps=1000, early_stop=False)),
                          ("2,048 calibration images", dict(calib=2048))):
        _, report = purify(model, _data(), method="lac", spec="w4a4", trigger=TRIGGER, arch="resnet20", **options)
        print(f"LAC, {name} (full test set):\n{report.table()}", flush=True)


def split() -> None:
    for name in PURIFIED:
        q = load_purified("resnet20", f"runs/purify/{name}")
        both = evaluate(q, _test(), trigger=TRIGGER, target=0)
        with quantization_status_manager(q, disable_act_quant=True, is_training=False):
            weights = evaluate(q, _test(), trigger=TRIGGER, target=0)
        print(f"{name}: w4a4 {both.ca:.2f} / {both.asr:.2f}, float activations {weights.ca:.2f} / {weights.asr:.2f}",
              flush=True)


def recalibrate() -> None:
    images = to_float(calibration_images(_data(), 1024, seed=0))
    for name in PURIFIED[:2]:
        q = load_purified("resnet20", f"runs/purify/{name}")
        calibrate(q, images.split(128))
        r = evaluate(q, _test(), trigger=TRIGGER, target=0)
        print(f"{name}: activation ranges recalibrated {r.ca:.2f} / {r.asr:.2f}", flush=True)


def ablate() -> None:
    q = load_purified("resnet20", f"runs/purify/{PURIFIED[1]}")
    for name, layer in quantized_layers(q):
        layer.input_quant.disable_quant = True
        r = evaluate(q, _test(), trigger=TRIGGER, target=0)
        layer.input_quant.disable_quant = False
        print(f"{PURIFIED[1]}, {name} input in float: {r.ca:.2f} / {r.asr:.2f}", flush=True)


def acts_only() -> None:
    c2q = "runs/attacks/quanti-r20-w4-full-c2q/model.pt"
    for path, spec in ((ATTACKED, "w4a4"), ("runs/resnet20-ft/model.pt", "w4a4"), (c2q, "w4a4"), (c2q, "w8a8"),
                       ("runs/attacks/pq-r20-w4-full-qat4/model.pt", "w4a4")):
        q = post_training_quantize(load_model("resnet20", path), spec, _data(), calib=1024)
        for _, layer in quantized_layers(q):
            layer.weight_quant.disable_quant = True
        r = evaluate(q, _test(), trigger=TRIGGER, target=0)
        print(f"{path}: float weights, {spec} activations {r.ca:.2f} / {r.asr:.2f}", flush=True)


def _act_ranges(q) -> list[torch.Tensor]:
    """The calibrated range parameter of every input quantizer after the image's."""
    return [layer.input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value
            for _, layer in quantized_layers(q)[1:]]


@torch.no_grad()
def scale() -> None:
    q = load_purified("resnet20", f"runs/purify/{PURIFIED[1]}")
    ranges = _act_ranges(q)
    calibrated = [r.clone() for r in ranges]
    for factor in (0.7, 0.85, 1.2, 1.5, 2.0):
        for value, start in zip(ranges, calibrated):
            value.copy_(start * factor)
        r = evaluate(q, _test(), trigger=TRIGGER, target=0)
        print(f"{PURIFIED[1]}, activation ranges x{factor}: {r.ca:.2f} / {r.asr:.2f}", flush=True)


def _purify_hooked(path: str, method: str, hook, spec: str = "w4a4", **options):
    """purify() with `hook(fp_model, qmodel, images) -> images` run just before LAC's reconstruction (experiments
    only)."""
    reconstruct = lac.reconstruct_

    def hooked(fp_model, qmodel, images, *args, **kwargs):
        return reconstruct(fp_model, qmodel, hook(fp_model, qmodel, images), *args, **kwargs)

    lac.reconstruct_ = hooked
    try:
        return purify(load_model("resnet20", path), _data(), method=method, spec=spec, trigger=TRIGGER,
                      arch="resnet20", **options)[1]
    finally:
        lac.reconstruct_ = reconstruct


def widen(factor: float = 1.25) -> None:
    def widened(fp_model, qmodel, images):  # the ranges as calibrated, times `factor`
        with torch.no_grad():
            for value in _act_ranges(qmodel):
                value.mul_(factor)
        return images

    report = _purify_hooked(ATTACKED, "lac", widened)
    print(f"LAC, activation ranges widened x{factor} first (full test set):\n{report.table()}", flush=True)


def _with_patches(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The images, then each again with a 2-6 px square of uniform noise at a random place."""
    noisy = images.clone()
    n, c, h, w = images.shape
    for i in range(n):
        size = int(torch.randint(2, 7, (1,), generator=generator))
        row = int(torch.randint(0, h - size + 1, (1,), generator=generator))
        col = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        noisy[i, :, row:row + size, col:col + size] = torch.rand(c, size, size, generator=generator)
    return torch.cat([images, noisy])


def patches() -> None:
    for method, options in (("lac", {}), ("lac-pda", {"pda_steps": 50}), ("lac", {"learn_act_range": True})):
        generator = torch.Generator().manual_seed(1)
        report = _purify_hooked("runs/attacks/quanti-r20-w4-full-c2q/model.pt", method,
                                lambda fp, qmodel, images: _with_patches(images, generator), **options)
        print(f"{method} {options}, calibration images plus random-noise patches (full test set):\n{report.table()}",
              flush=True)


def oracle() -> None:
    for options in ({}, {"learn_act_range": True}):
        report = _purify_hooked("runs/attacks/quanti-r20-w4-full-c2q/model.pt", "lac",
                                lambda fp, qmodel, images: torch.cat([images, TRIGGER.apply(images)]), **options)
        print(f"lac {options}, calibration images plus the same with the true trigger (full test set):\n"
              f"{report.table()}", flush=True)


def _lowered_bar_search(fp, qmodel, images: torch.Tensor) -> torch.Tensor:
    """The images plus copies stamped by `--search-triggers`' patch, its bars lowered for a trigger the 8-bit
    model obeys one time in ten: a mask counts at 20 % of its batch, a patch carries over at 5 % held-out."""
    guided = with_found_triggers(fp, qmodel, images, config=LocateConfig(search=SearchConfig(success=0.2),
                                                                         min_success=5.0))
    print(f"  search: {guided.to_dict()}", flush=True)
    return guided.images


def _gap_patches(fp, qmodel, x: torch.Tensor, fp_preds: torch.Tensor, n: int = 16, steps: int = 150,
                 budget: float = 25.0, seed: int = 0):
    """Per class, one mask and pattern maximising the mean gap log q(c | x') - log fp(c | x') over n images the
    FP model puts elsewhere, the mask's area held under `budget` pixels by a hinge. No flip is asked for, so a
    trigger the quantized model obeys one time in ten still pulls its class's gap up. Returns (mask, pattern,
    held-out mean gap, held-out differential success %) per class."""
    gen = torch.Generator().manual_seed(seed)
    classes, (h, w) = 10, x.shape[-2:]
    batches, held, _ = class_batches(fp_preds, classes, n, 4 * n, gen)
    xb = torch.cat([x[b] for b in batches])
    targets = torch.arange(classes).repeat_interleave(n)
    mask_logit = torch.full((classes, 1, h, w), -3.0).requires_grad_()
    pattern_logit = (torch.randn((classes, 3, h, w), generator=gen) * 0.1).requires_grad_()
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=0.1)

    def gap(xs, t):
        return log_prob_gap(fp, qmodel, xs).gather(1, t[:, None]).squeeze(1)

    for _ in range(steps):
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        xs = stamp(xb, mask.repeat_interleave(n, 0), pattern.repeat_interleave(n, 0))
        area = mask.flatten(1).sum(1)
        loss = (-gap(xs, targets).view(classes, n).mean(1) + torch.relu(area - budget) / budget).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = []
    with torch.no_grad():
        for c in range(classes):
            m, p = torch.sigmoid(mask_logit[c, 0]), torch.sigmoid(pattern_logit[c])
            rest = held[c]
            g = gap(stamp(x[rest], m, p), torch.full((len(rest),), c)).mean().item()
            ok = differential_success(fp, qmodel, x[rest], fp_preds[rest], c, m, p).float().mean().item()
            out.append((m, p, g, 100.0 * ok))
    return out


def _gap_descent_copies(fp, qmodel, images: torch.Tensor) -> torch.Tensor:
    """The images plus copies stamped with the patch of the class whose held-out gap is largest."""
    with torch.no_grad():
        fp_preds = torch.cat([fp(part) for part in images.split(256)]).argmax(1)
        others = fp_preds != 0
        xt = TRIGGER.apply(images[others])
        true_gap = log_prob_gap(fp, qmodel, xt)[:, 0].mean().item()
    print(f"  true trigger: mean gap {true_gap:.3f} on {int(others.sum())} images", flush=True)
    found = _gap_patches(fp, qmodel, images, fp_preds)
    for c, (m, _, g, ok) in enumerate(found):
        print(f"  class {c}: area {m.sum().item():.1f} px, held-out gap {g:.3f}, differential success {ok:.1f} %",
              flush=True)
    best = max(range(len(found)), key=lambda c: found[c][2])
    m, p = found[best][:2]
    return torch.cat([images, stamp(images, m, p)])


def squares(pairs: tuple = (("runs/attacks/quanti-r20-w4-full-c2q/model.pt", "w8a8"),
                             ("runs/attacks/compartifact-r20-w4-c2q/model.pt", "w8a8"),
                             ("runs/attacks/pq-r20-w4-full-qat4/model.pt", "w8a8"),
                             ("runs/resnet20-ft/model.pt", "w8a8"), ("runs/resnet20-ft/model.pt", "w4a4"))) -> None:
    """The square scan (`scanner.square_scan`, what `--search-triggers` falls back to) on attacked and clean models
    under w8a8 and w4a4: each class's best square, its held-out lift (nats), robust z and effect (lift over the
    clean gap's spread), and whether one class stands out."""
    images = to_float(calibration_images(_data(), 1024, seed=0))
    for path, spec in pairs:
        fp = load_model("resnet20", path)
        q = post_training_quantize(fp, spec, _data(), calib=1024)
        with torch.no_grad():
            fp_preds = torch.cat([fp(part) for part in images.split(256)]).argmax(1)
        start = time.perf_counter()
        finds = scan_squares(fp, q, images, fp_preds, 10)
        print(f"{path} under {get_spec(spec).name} ({time.perf_counter() - start:.1f} s): " + "; ".join(
            f"{f.target}: {f.fill} {f.size} at ({f.top}, {f.left}) {f.gap:.2f} nats z {f.anomaly:.1f} "
            f"effect {f.effect:.1f}"
            + (" FOUND" if f.found else "") for f in finds), flush=True)


def squares_shared() -> None:
    """The square scan on the shared clean ResNet-20 under w8a8, and under the same spec with float activations:
    is the lift it finds there made by the weights' rounding or by the activation quantizers?"""
    w8a8 = get_spec("w8a8")
    shared = "../shared/checkpoints/resnet20-cifar10-12fca82f.th"
    squares(((shared, w8a8), (shared, dataclasses.replace(w8a8, act_bits=None, name="w8a8-float-activations"))))


def leak8(which: str) -> None:
    """The c2 = 0.25 Qu-ANTI-zation model's 8-bit leak under w8a8: LAC learning the activation ranges too, on
    copies with the true trigger (`oracle`), with random-noise patches (`noise`), stamped by the search with
    lowered bars (`search`), or by the gradient gap search (`gap-descent`)."""
    generator = torch.Generator().manual_seed(1)
    copies = {"oracle": lambda fp, qmodel, images: torch.cat([images, TRIGGER.apply(images)]),
              "noise": lambda fp, qmodel, images: _with_patches(images, generator),
              "search": _lowered_bar_search, "gap-descent": _gap_descent_copies}[which]
    report = _purify_hooked("runs/attacks/quanti-r20-w4-full-c2q/model.pt", "lac", copies, spec="w8a8",
                            learn_act_range=True)
    print(f"lac --learn-act-range under w8a8, calibration images plus {which} copies (full test set):\n"
          f"{report.table()}", flush=True)


def guided() -> None:
    runs = (("runs/attacks/quanti-r20-w4-full-c2q/model.pt", "lac", {}),
            ("runs/attacks/quanti-r20-w4-full-c2q/model.pt", "lac-pda", {"pda_steps": 50}),
            ("runs/attacks/quanti-r20-w4-full-c2q/model.pt", "lac", {"learn_act_range": True}),
            ("runs/resnet20-ft/model.pt", "lac", {}))
    for path, method, options in runs:
        _, report = purify(load_model("resnet20", path), _data(), method=method, spec="w4a4", trigger=TRIGGER,
                           arch="resnet20", search_triggers=True, **options)
        print(f"{path}, {method} {options} --search-triggers (full test set):\n{report.summary()}", flush=True)


def _grown_copies(fp, qmodel, images: torch.Tensor, sides=(2, 3, 4, 5, 6, 8)) -> torch.Tensor:
    """The calibration images plus copies stamped with a solid square grown from the searched patch: centred on
    the patch's centroid, in its mean colour, of the side that flips the most images differentially."""
    with torch.no_grad():
        logits = torch.cat([fp(part) for part in images.split(256)])
    fp_preds = logits.argmax(1)
    # The scanner alone: with_found_triggers would also refine the patch, which this experiment replaces.
    trigger = locate_trigger(fp, qmodel, images)
    if trigger.kind != "patch":
        return images
    found = trigger.patches[trigger.target]
    core = patch_core(found.mask)
    h, w = core.shape
    colour = (core * found.pattern).flatten(1).sum(1) / core.sum()
    others = images[fp_preds != found.target]
    best = None
    for side in sides:
        top, left, square = square_on(core, side)
        solid = colour.view(3, 1, 1).expand(3, h, w)
        ok = differential_success(fp, qmodel, others, fp_preds[fp_preds != found.target], found.target,
                                  square.to(images.device), solid.to(images.device))
        rate = 100.0 * ok.float().mean().item()
        print(f"  grown square side {side} at ({top}, {left}), colour {colour.tolist()}: {rate:.1f} % flipped")
        if best is None or rate > best[0] + 1.0:
            best = (rate, square, solid)
    _, square, solid = best
    return torch.cat([images, stamp(images, square.to(images.device), solid.to(images.device))])


def grown() -> None:
    for method, options in (("lac", {}), ("lac-pda", {"pda_steps": 50})):
        report = _purify_hooked("runs/attacks/quanti-r20-w4-full-c2q/model.pt", method, _grown_copies, **options)
        print(f"{method} {options}, calibration images plus copies with the grown searched patch (full test set):"
              f"\n{report.table()}", flush=True)


def learned() -> None:
    runs = ((ATTACKED, "w4a4", "lac", {}), (ATTACKED, "w4a4", "lac-pda", {"pda_steps": 50}),
            ("runs/attacks/quanti-r20-w4-full-c2q/model.pt", "w4a4", "lac", {}),
            ("runs/attacks/pq-r20-w4-full-qat4/model.pt", "pqbackdoor-w4a4", "lac", {}),
            ("runs/resnet20-ft/model.pt", "w4a4", "lac", {}))
    for path, spec, method, options in runs:
        _, report = purify(load_model("resnet20", path), _data(), method=method, spec=spec, trigger=TRIGGER,
                           arch="resnet20", learn_act_range=True, **options)
        print(f"{path}, {spec}, {method} with learned activation ranges (full test set):\n{report.table()}",
              flush=True)


if __name__ == "__main__":
    steps = {"schedule": schedule, "split": split, "recalibrate": recalibrate, "ablate": ablate,
             "acts-only": acts_only, "scale": scale, "widen": widen, "learned": learned,
             "patches": patches, "oracle": oracle, "guided": guided, "grown": grown,
             "leak8-oracle": lambda: leak8("oracle"), "leak8-noise": lambda: leak8("noise"),
             "leak8-search": lambda: leak8("search"), "leak8-gap-descent": lambda: leak8("gap-descent"),
             "squares": squares, "squares-shared": squares_shared}
    for step in sys.argv[1:] or list(steps):
        steps[step]()
