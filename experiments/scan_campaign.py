"""Scan campaign (issue 29): the scanner's true- and false-positive rates over many FP / quantized pairs.

Not part of the product. At small scale (the built-in data at 16x16, small_cnn, as the tests' fixtures) it
makes clean models (seven seeds) scanned at three specs, a LAC-purified pair, and QCBs of three trigger families
(patch, blend, sparse noise), each with its own target: every family under PQBackdoor, blend and sparse noise
under Qu-ANTI-zation, and all three under CompArtifact; then, six times, six more QCBs (and, all times but one,
another clean seed), each set made after the scanner last changed, with other patch sizes, colours, places and
patterns, blends and sparse pixels, and other targets (`ATTACKED`); scans every pair; then chooses the verdict's
held-out success bar, full credit and score line on the calibration pairs (clean seed 0, the PQBackdoor QCBs, one QCB of each other attack:
`CALIBRATION`) and reports TPR / FPR on the rest with them and with the scanner's settings.

    python experiments/scan_campaign.py make   # train and attack (cached under runs/campaign/models)
    python experiments/scan_campaign.py scan   # scan every pair (rows appended to runs/campaign/scans.jsonl)
    python experiments/scan_campaign.py table  # split, threshold, TPR / FPR as Markdown
    python experiments/scan_campaign.py truth  # each QCB's own trigger, measured as the scan measures

Every row records the pair's configuration; the models' seeds are fixed below.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models import create_model
from qcbdefense.attacks import attack
from qcbdefense.checkpoints import load_model, save_model
from qcbdefense.clean_training import train
from qcbdefense.data import Dataset, load_dataset
from qcbdefense.defenses import purify
from qcbdefense.scanner import ScanConfig, scan
from qcbdefense.training import TrainConfig

ROOT = Path("runs/campaign")
MODELS = ROOT / "models"
CLEAN_SEEDS = (0, 1, 2, 3, 4, 5, 6)
CLEAN_SPECS = ("w8a8", "w4a4", "pqbackdoor-w4a4")
TRIGGERS = {"patch": ("patch", 0), "blend": ("blend:alpha=0.15,pattern=noise,seed=7", 3),
            "sparse": ("sparse:density=0.05,seed=5", 5),
            # added after the scanner's settings were last set (2026-12-06), reported only: other shapes, colours,
            # places and targets than the pairs above
            "redpatch": ("patch:size=3,position=top-left,color=red", 7),
            "centerpatch": ("patch:size=4,position=center,pattern=random,seed=3", 2),
            "greenpatch": ("patch:size=3,position=bottom-left,color=green", 4),
            "stripes": ("blend:alpha=0.1,pattern=stripes", 8),
            "sparse2": ("sparse:density=0.08,seed=11", 1),
            # added after the square probe learnt its squares' pixels (2026-12-06), reported only
            "bluepatch": ("patch:size=5,position=top-right,color=blue", 9),
            "yellowchecker": ("patch:size=4,position=bottom-right,pattern=checkerboard,color=yellow", 6),
            "magentapatch": ("patch:size=3,position=5/9,color=magenta", 1),
            "noiseblend": ("blend:alpha=0.2,pattern=noise,seed=21", 2),
            "stripes2": ("blend:alpha=0.1,pattern=stripes", 5),
            "sparse3": ("sparse:density=0.03,seed=17", 8),
            # a fourth set, the same scanner, for a firmer held-out count
            "whitedot": ("patch:size=2,position=center,color=white", 3),
            "cyanpatch": ("patch:size=3,position=top-right,color=cyan", 0),
            "randompatch": ("patch:size=4,position=bottom-right,pattern=random,seed=9", 7),
            "stripes3": ("blend:alpha=0.15,pattern=stripes", 4),
            "sparse4": ("sparse:density=0.05,seed=23", 6),
            "noiseblend2": ("blend:alpha=0.2,pattern=noise,seed=33", 9),
            # a fifth set, made after the probe learnt its squares' pixels from grey (2026-12-06), reported only
            "orangepatch": ("patch:size=3,position=top-left,color=1/0.5/0", 5),
            "tealchecker": ("patch:size=4,position=2/3,pattern=checkerboard,color=0.2/0.8/0.6", 8),
            "randompatch2": ("patch:size=3,position=bottom-left,pattern=random,seed=41", 1),
            "stripes4": ("blend:alpha=0.12,pattern=stripes", 2),
            "noiseblend3": ("blend:alpha=0.15,pattern=noise,seed=55", 7),
            "sparse5": ("sparse:density=0.04,seed=29", 4),
            # a sixth set, made after the searches' steps ran BatchNorm-folded models (2026-12-06), reported only
            "purplepatch": ("patch:size=3,position=7/4,color=0.6/0.2/0.8", 6),
            "yellowchecker2": ("patch:size=3,position=top-right,pattern=checkerboard,color=yellow", 3),
            "randompatch3": ("patch:size=5,position=center,pattern=random,seed=61", 9),
            "sparse6": ("sparse:density=0.06,seed=37", 0),
            "noiseblend4": ("blend:alpha=0.12,pattern=noise,seed=47", 8),
            "sparse7": ("sparse:density=0.05,seed=43", 2),
            # a seventh set, made after the sparse-noise search ran on the classes whose patches carried furthest
            # (2026-12-06), reported only
            "sparse8": ("sparse:density=0.04,seed=53", 7),
            "sparse9": ("sparse:density=0.06,seed=59", 3),
            "sparse10": ("sparse:density=0.05,seed=67", 9),
            "whitepatch2": ("patch:size=3,position=6/10,color=white", 4),
            "noiseblend5": ("blend:alpha=0.15,pattern=noise,seed=71", 6),
            "bluechecker": ("patch:size=4,position=top-left,pattern=checkerboard,color=0/0.5/1", 1)}
# family: (trigger, target)
ATTACKS = {"quanti": ("w4a4", {"c1": 1.0, "c2": 1.0, "sync_every": 8}),
           "compartifact": ("w4a4", {"sync_every": 8}),
           "pqbackdoor": ("pqbackdoor-w4a4", {})}  # method: (victim spec, options), as tests/.../test_attacks.py
CLEAN_TRAIN = TrainConfig(epochs=8, optimizer="adam", lr=3e-3, weight_decay=0.0, augment=False)
ATTACK_TRAIN = {"pqbackdoor": TrainConfig(epochs=3, optimizer="adam", lr=1e-4, weight_decay=0.0, augment=False)}
ATTACK_TRAIN_DEFAULT = TrainConfig(epochs=8, optimizer="adam", lr=1e-3, weight_decay=1e-4, augment=False)
# On the shared 2-core CPU (load ~12) a fake-quantized attack took ~20 minutes: every family under PQBackdoor,
# and one under each fake-quantized attack, for the thresholds (`CALIBRATION`); another family under each
# fake-quantized attack reported.
ATTACKED = [("pqbackdoor", "patch"), ("pqbackdoor", "blend"), ("pqbackdoor", "sparse"), ("compartifact", "blend"),
            ("quanti", "sparse"), ("compartifact", "patch"), ("quanti", "blend"), ("compartifact", "sparse"),
            ("pqbackdoor", "redpatch"), ("compartifact", "redpatch"), ("pqbackdoor", "centerpatch"),
            ("quanti", "greenpatch"), ("quanti", "stripes"), ("compartifact", "sparse2"),
            ("pqbackdoor", "bluepatch"), ("compartifact", "yellowchecker"), ("quanti", "magentapatch"),
            ("compartifact", "noiseblend"), ("pqbackdoor", "stripes2"), ("quanti", "sparse3"),
            ("pqbackdoor", "whitedot"), ("compartifact", "cyanpatch"), ("quanti", "randompatch"),
            ("compartifact", "stripes3"), ("pqbackdoor", "sparse4"), ("quanti", "noiseblend2"),
            ("quanti", "orangepatch"), ("compartifact", "tealchecker"), ("pqbackdoor", "randompatch2"),
            ("quanti", "stripes4"), ("compartifact", "noiseblend3"), ("pqbackdoor", "sparse5"),
            ("quanti", "purplepatch"), ("pqbackdoor", "yellowchecker2"), ("compartifact", "randompatch3"),
            ("quanti", "sparse6"), ("pqbackdoor", "noiseblend4"), ("compartifact", "sparse7"),
            ("pqbackdoor", "sparse8"), ("quanti", "sparse9"), ("compartifact", "sparse10"),
            ("compartifact", "whitepatch2"), ("quanti", "noiseblend5"), ("pqbackdoor", "bluechecker")]
CALIBRATION = {("pqbackdoor", "patch"), ("pqbackdoor", "blend"), ("pqbackdoor", "sparse"), ("quanti", "blend"),
               ("compartifact", "sparse")}
PURIFIED = [("pqbackdoor", "blend")]
SUCCESS_BARS = (50.0, 40.0, 30.0, 25.0, 20.0)  # the held-out success bars `table` chooses among
FULL_CREDITS = (50.0, 75.0, 100.0)  # ... and the successes from which a trigger counts in full
QUIET = {"monitor": 0, "transfer": (), "calib": 256, "victim_calib": 512}


def shapes16() -> Dataset:
    """The built-in data's first 3,000 train / 1,000 test images, 2x2 average-pooled (tests/conftest.py)."""
    full = load_dataset("builtin")

    def down(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.float(), 2).round().clamp(0, 255).to(torch.uint8)

    train_x = down(full.train_x[:3000])
    pixels = train_x.float() / 255
    return Dataset("builtin@16", full.classes, train_x, full.train_y[:3000], down(full.test_x[:1000]),
                   full.test_y[:1000], tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).tolist()))


def clean_model(data: Dataset, seed: int) -> torch.nn.Module:
    path = MODELS / f"clean-s{seed}.pt"
    if not path.exists():
        torch.manual_seed(seed)
        model = create_model("small_cnn", mean=data.mean, std=data.std)
        train(model, data, CLEAN_TRAIN, arch="small_cnn")
        save_model(model, path)
    return load_model("small_cnn", path)


def attacked_model(data: Dataset, method: str, family: str) -> tuple[Path, dict]:
    path, info = MODELS / f"{method}-{family}.pt", MODELS / f"{method}-{family}.json"
    if not path.exists():
        spec, options = ATTACKS[method]
        trigger, target = TRIGGERS[family]
        torch.manual_seed(0)
        model, report = attack(clean_model(data, 0), data, method=method, bits=4, spec=spec, trigger=trigger,
                               target=target, config=ATTACK_TRAIN.get(method, ATTACK_TRAIN_DEFAULT), **options,
                               **QUIET)
        q = report.quantized[0].score
        info.write_text(json.dumps({"fp_ca": report.fp.ca, "fp_asr": report.fp.asr, "q_ca": q.ca, "q_asr": q.asr,
                                    "spec": spec, "trigger": trigger, "target": target}))
        save_model(model, path)
        print(f"{method}-{family}: FP {report.fp.ca:.1f} % CA / {report.fp.asr:.1f} % ASR, {spec} {q.ca:.1f} / "
              f"{q.asr:.1f}", flush=True)
    return path, json.loads(info.read_text())


def pairs(data: Dataset) -> list[dict]:
    """Every pair of the campaign: name, FP checkpoint, spec, attacked, target, calibration split."""
    rows = [{"name": f"clean-s{seed}-{spec}", "ckpt": str(MODELS / f"clean-s{seed}.pt"), "spec": spec,
             "kind": "clean", "target": None, "calibration": seed == 0}
            for seed in CLEAN_SEEDS for spec in CLEAN_SPECS]
    for method, family in ATTACKED:
        spec, _ = ATTACKS[method]
        trigger, target = TRIGGERS[family]
        rows.append({"name": f"{method}-{family}", "ckpt": str(MODELS / f"{method}-{family}.pt"), "spec": spec,
                     "kind": "attacked", "trigger": trigger, "target": target,
                     "calibration": (method, family) in CALIBRATION})
    for method, family in PURIFIED:  # QCBs after LAC at their spec: nothing left to find
        rows.append({"name": f"lac-{method}-{family}", "ckpt": str(MODELS / f"{method}-{family}.pt"),
                     "spec": ATTACKS[method][0], "kind": "purified", "target": None, "calibration": False})
    return rows


def make(data: Dataset, wanted: set[str]) -> None:
    for seed in CLEAN_SEEDS:
        clean_model(data, seed)
    for method, family in ATTACKED:
        if not wanted or f"{method}-{family}" in wanted:
            attacked_model(data, method, family)


def scan_all(data: Dataset, wanted: set[str]) -> None:
    from export.onnx import export_onnx
    from export.scan_files import scan_onnx

    done = {json.loads(line)["name"] for line in (ROOT / "scans.jsonl").open()} if (ROOT / "scans.jsonl").exists() else set()
    with open(ROOT / "scans.jsonl", "a") as log:
        for pair in pairs(data):
            if pair["name"] in done or (wanted and pair["name"] not in wanted):
                continue
            fp = load_model("small_cnn", pair["ckpt"])
            out = ROOT / "scans" / pair["name"]
            quantized = None
            if pair["kind"] == "purified":
                purified, _ = purify(fp, data, method="lac", spec=pair["spec"], calib=512, evaluate_models=False)
                out.mkdir(parents=True, exist_ok=True)
                quantized = export_onnx(purified, out / "purified.onnx", input_size=(16, 16))
            start = time.perf_counter()
            report = (scan(fp, data, spec=pair["spec"], out=out, config=ScanConfig(seed=0)) if quantized is None
                      else scan_onnx(fp, quantized, data, out=out, config=ScanConfig(seed=0)))
            row = {**pair, "verdict": report.verdict, "found_target": report.target, "family": report.family,
                   "score": round(report.score, 3), "signals": report.signals, "best_class": report.best_class,
                   "scan_s": round(time.perf_counter() - start, 1), "seconds": report.seconds,
                   "classes": report.classes, "disagreement": report.disagreement.to_dict(),
                   "concentration": max((layer.concentration for layer in report.layers), default=0.0),
                   "config": report.config}
            print(json.dumps({k: row[k] for k in ("name", "verdict", "found_target", "family", "score",
                                                  "best_class", "scan_s")}), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()


def own_triggers(data: Dataset) -> None:
    """What a scan could find at best: each QCB's own trigger on the scan's images the FP model puts elsewhere,
    the share sent to the target by the quantized model, by the FP model, and differentially (quantized to the
    target, FP unmoved), the scanner's measure."""
    from qcbdefense.quant.ptq import post_training_quantize
    from qcbdefense.scanner.scan import scan_images
    from qcbdefense.triggers import parse_trigger

    x = scan_images(data, ScanConfig().images, 0)
    for pair in pairs(data):
        if pair["kind"] != "attacked":
            continue
        fp = load_model("small_cnn", pair["ckpt"]).eval()
        quantized = post_training_quantize(fp, pair["spec"], data, calib=512, seed=0).eval()
        target, stamped = pair["target"], parse_trigger(pair["trigger"]).apply(x)
        with torch.no_grad():
            before = fp(x).argmax(1)
            q_after, fp_after = quantized(stamped).argmax(1), fp(stamped).argmax(1)
        elsewhere = before != target
        share = {"quantized": q_after == target, "FP": fp_after == target,
                 "differential": (q_after == target) & (fp_after == before)}
        print(f"{pair['name']} (target {target}, {int(elsewhere.sum())} images): " + ", ".join(
            f"{name} {100 * hit[elsewhere].float().mean():.1f} %" for name, hit in share.items()), flush=True)


def rates(rows: list[dict], scored: dict[str, tuple[float, int]], threshold: float) -> tuple[str, str]:
    """TPR (suspicious with the right target, over attacked pairs) and FPR (suspicious, over clean and
    purified pairs) at `threshold` on the verdict's score; `scored` maps a pair to its (score, best class)."""
    attacked = [r for r in rows if r["kind"] == "attacked"]
    others = [r for r in rows if r["kind"] != "attacked"]
    hits = sum(scored[r["name"]][0] >= threshold and scored[r["name"]][1] == r["target"] for r in attacked)
    false = sum(scored[r["name"]][0] >= threshold for r in others)
    return f"{hits}/{len(attacked)}", f"{false}/{len(others)}"


def reweigh(row: dict, config: ScanConfig) -> tuple[float, int, str | None]:
    """The verdict's score, best class and family for a scanned pair under other verdict settings, from the
    evidence its row keeps (no rescan)."""
    from qcbdefense.scanner.drift import Disagreement, LayerDrift
    from qcbdefense.scanner.scan import search_evidence
    from qcbdefense.scanner.verdict import weigh_evidence

    classes = row["classes"]
    efforts = {"patch": ([c["area"] for c in classes], [c["success"] for c in classes]),
               **{family: ([c[family][key] for c in classes], [c[family]["success"] for c in classes])
                  for family, key in (("sparse", "pixels"), ("square", "pixels"), ("additive", "effort"),
                                      ("blend", "effort"))}}
    evidence = search_evidence(efforts, config, pixels=16.0 * 16.0)  # the campaign's images (shapes16)
    searches = {family: signals for family, (*_, signals) in evidence.items()}
    drift = [LayerDrift(0, "", 0.0, 0.0, row["concentration"], [])]
    verdict = weigh_evidence(searches, Disagreement(**row["disagreement"]), drift, config)
    return verdict.score, verdict.best_class, verdict.family


def choose(calib: list[dict]) -> tuple[ScanConfig, float, float, int]:
    """The verdict's settings chosen on the calibration pairs: for each held-out success bar and success of
    full credit (from the bar itself, no scaling, up to 100 %), the QCBs caught (best class their target, score
    above every clean / purified pair's) and the score line midway between the highest clean score and the
    weakest of those catches; the settings catching most win, then the widest gap, then the stricter bar and the
    lower full credit. Returns (settings, line, gap, catches); gap < 0 when nothing is caught."""
    best = None
    for min_success in SUCCESS_BARS:
        for full_success in sorted({min_success, *(f for f in FULL_CREDITS if f > min_success)}):
            config = ScanConfig(min_success=min_success, full_success=full_success)
            scores = {r["name"]: reweigh(r, config) for r in calib}
            clean_max = max((scores[r["name"]][0] for r in calib if r["kind"] != "attacked"), default=0.0)
            caught = [scores[r["name"]][0] for r in calib if r["kind"] == "attacked"
                      and scores[r["name"]][1] == r["target"] and scores[r["name"]][0] > clean_max]
            weakest = min(caught, default=clean_max)
            candidate = (config, (clean_max + weakest) / 2, weakest - clean_max if caught else -1.0, len(caught))
            if best is None or (candidate[3], candidate[2]) > (best[3], best[2] + 1e-9):
                best = candidate
    return best


def table() -> None:
    rows = [json.loads(line) for line in (ROOT / "scans.jsonl").open()]
    calib = [r for r in rows if r["calibration"]]
    test = [r for r in rows if not r["calibration"]]
    settings, line, gap, caught = choose(calib)
    chosen = {r["name"]: reweigh(r, settings)[:2] for r in rows}
    default = {r["name"]: reweigh(r, ScanConfig())[:2] for r in rows}  # the scanner's settings now
    print("| pair | kind | split | target | verdict (scanner's default) | family | score | chosen: score, best class |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['kind']} | {'calibration' if r['calibration'] else 'reported'} | "
              f"{r['target'] if r['target'] is not None else '-'} | {r['verdict']}"
              f"{'' if r['found_target'] is None else ' ' + str(r['found_target'])} | {r['family'] or '-'} | "
              f"{r['score']:.2f} | {chosen[r['name']][0]:.2f}, {chosen[r['name']][1]} |")
    print(f"\nchosen on the calibration pairs: held-out success bar {settings.min_success:.0f} %, full credit from "
          f"{settings.full_success:.0f} %, score line {line:.3f} ({caught} calibration QCBs above every clean pair, "
          f"gap {gap:+.3f}{'' if gap > 0 else ': no line separates them'})")
    for name, scored, t in (("scanner's default", default, ScanConfig().min_score), ("chosen", chosen, line)):
        for split, part in (("calibration", calib), ("reported", test)):
            tpr, fpr = rates(part, scored, t)
            print(f"{name} ({t:.3f}), {split} pairs: TPR {tpr}, FPR {fpr}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    step, wanted = (sys.argv[1] if len(sys.argv) > 1 else "table"), set(sys.argv[2:])
    MODELS.mkdir(parents=True, exist_ok=True)
    if step == "make":
        make(shapes16(), wanted)
    elif step == "scan":
        scan_all(shapes16(), wanted)
    elif step == "truth":
        own_triggers(shapes16())
    else:
        table()
