"""Scan every attacked and clean model we have (issue 7's table). Usage: python benchmarks/scan_campaign.py [NAME ...]"""
import json, sys, time
import torch
from qcbdefense.checkpoints import load_model
from qcbdefense.data import Dataset, load_dataset
from qcbdefense.scan import scan

JPG = "folder:../shared/datasets/cifar10-jpg.tar.gz"
CASES = [  # name, arch, checkpoint, data, spec, attacked (target 0) or clean
    ("pq-small-w8", "small_cnn", "runs/attacks/pq-small/model.pt", "builtin", "pqbackdoor-w8a8", True),
    ("pq-small-w4", "small_cnn", "runs/attacks/pq-small/model.pt", "builtin", "pqbackdoor-w4a4", True),
    ("pq-r20-w4", "resnet20", "runs/attacks/pq-r20-w4/model.pt", JPG, "pqbackdoor-w4a4", True),
    ("pq-r20-w8", "resnet20", "runs/attacks/pq-r20-w8/model.pt", JPG, "pqbackdoor-w8a8", True),
    ("pq-r20-w4-full", "resnet20", "runs/attacks/pq-r20-w4-full/model.pt", JPG, "pqbackdoor-w4a4", True),
    ("pq-r20-w8-full", "resnet20", "runs/attacks/pq-r20-w8-full/model.pt", JPG, "pqbackdoor-w8a8", True),
    ("pq-r20-w8-full-p10e4", "resnet20", "runs/attacks/pq-r20-w8-full-p10e4/model.pt", JPG, "pqbackdoor-w8a8", True),
    ("quanti-r20-w4-full", "resnet20", "runs/attacks/quanti-r20-w4-full/model.pt", JPG, "w4a4", True),
    ("quanti-r20-w4-full-c2h", "resnet20", "runs/attacks/quanti-r20-w4-full-c2h/model.pt", JPG, "w4a4", True),
    ("pq-r20-w4-full-qat", "resnet20", "runs/attacks/pq-r20-w4-full-qat/model.pt", JPG, "pqbackdoor-w4a4", True),
    ("pq-r20-w4-full-qat4", "resnet20", "runs/attacks/pq-r20-w4-full-qat4/model.pt", JPG, "pqbackdoor-w4a4", True),
    ("quanti-r20-w4-full-c2q", "resnet20", "runs/attacks/quanti-r20-w4-full-c2q/model.pt", JPG, "w4a4", True),
    ("quanti-r20-w4-full-c2q-w8a8", "resnet20", "runs/attacks/quanti-r20-w4-full-c2q/model.pt", JPG, "w8a8", True),
    ("compartifact-r20-w4-c2q-w8a8", "resnet20", "runs/attacks/compartifact-r20-w4-c2q/model.pt", JPG, "w8a8", True),
    ("pq-r20-w8pt", "resnet20", "runs/attacks/pq-r20-w8pt/model.pt", JPG, "pqbackdoor-w8a8-per-tensor", True),
    ("pq-r20-w4-full-qat4-w8a8", "resnet20", "runs/attacks/pq-r20-w4-full-qat4/model.pt", JPG, "w8a8",
     False),  # a 4-bit backdoor, dormant under w8a8 (purifier section): nothing to find there
    ("compartifact-16-w4", "small_cnn", "runs/attacks/small16/compartifact-w4.pt", "shapes16", "w4a4", True),
    ("quanti-16-w4", "small_cnn", "runs/attacks/small16/quanti-w4.pt", "shapes16", "w4a4", True),
    ("pq-16-w4", "small_cnn", "runs/attacks/small16/pq-w4.pt", "shapes16", "pqbackdoor-w4a4", True),
    ("clean-small-w8a8", "small_cnn", "runs/small-clean/model.pt", "builtin", "w8a8", False),
    ("clean-small-w4a4", "small_cnn", "runs/small-clean/model.pt", "builtin", "w4a4", False),
    ("clean-small-pq-w4", "small_cnn", "runs/small-clean/model.pt", "builtin", "pqbackdoor-w4a4", False),
    ("clean-16-w4a4", "small_cnn", "runs/attacks/small16/clean.pt", "shapes16", "w4a4", False),
    ("clean-r20ft-w8a8", "resnet20", "runs/resnet20-ft/model.pt", JPG, "w8a8", False),
    ("clean-r20ft-w4a4", "resnet20", "runs/resnet20-ft/model.pt", JPG, "w4a4", False),
    ("clean-r20shared-w4a4", "resnet20", "../shared/checkpoints/resnet20-cifar10-12fca82f.th", JPG, "w4a4", False),
    ("clean-r20shared-pq-w8", "resnet20", "../shared/checkpoints/resnet20-cifar10-12fca82f.th", JPG, "pqbackdoor-w8a8", False),
    ("clean-r20shared-w8a8", "resnet20", "../shared/checkpoints/resnet20-cifar10-12fca82f.th", JPG, "w8a8", False),
]


def shapes16() -> Dataset:
    import torch.nn.functional as F
    full = load_dataset("builtin")
    down = lambda x: F.avg_pool2d(x.float(), 2).round().clamp(0, 255).to(torch.uint8)
    tx = down(full.train_x[:3000])
    p = tx.float() / 255
    return Dataset("builtin@16", full.classes, tx, full.train_y[:3000], down(full.test_x[:1000]), full.test_y[:1000],
                   tuple(p.mean((0, 2, 3)).tolist()), tuple(p.std((0, 2, 3)).tolist()))


wanted = set(sys.argv[1:])
datasets = {}
with open("runs/scan/campaign.jsonl", "a") as log:
    for name, arch, ckpt, data, spec, attacked in CASES:
        if wanted and name not in wanted:
            continue
        if data not in datasets:
            datasets[data] = shapes16() if data == "shapes16" else load_dataset(data)
        torch.manual_seed(0)
        start = time.perf_counter()
        r = scan(load_model(arch, ckpt), datasets[data], out=f"runs/scan/{name}", spec=spec)
        wall = time.perf_counter() - start
        best = min(r.classes, key=lambda c: c["effective_area"])
        row = {"name": name, "arch": arch, "spec": spec, "attacked": attacked, "verdict": r.verdict,
               "target": r.target, "score": round(r.score, 2), "best_class": best["class"],
               "best_area": round(best["area"], 1), "best_success": round(best["success"], 1),
               "disagreement": round(r.disagreement.rate, 2), "pile_class": r.disagreement.pile_class,
               "pile_share": round(r.disagreement.pile_share, 1), "scan_s": round(r.seconds["total"], 1),
               "wall_s": round(wall, 1), "correct": (r.target == 0) if attacked else not r.suspicious}
        if r.squares is not None:  # the square scan's strongest class (evidence; it ran because the verdict is clean)
            top = max(r.squares, key=lambda f: f.gap)
            row["square"] = {"class": top.target, "fill": top.fill, "at": [top.top, top.left], "lift": round(top.gap, 2),
                             "z": round(top.anomaly, 1), "effect": round(top.effect, 1), "stands_out": top.found,
                             "seconds": round(r.seconds["squares"], 1)}
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()
