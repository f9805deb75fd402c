"""An experiment, not part of the product: issue 23's purification bar under the deployment quantizer, on
small_cnn and the built-in shapes at 16x16 (scan_campaign.shapes16: 3,000 train / 1,000 test images, so that a
fake-quantized attack fits the shared 2-core CPU). A clean model, a Qu-ANTI-zation QCB that targets
`w8a8-deploy` (its 7-bit weights: `--bits 7`), then `harden --spec w8a8-deploy` (LAC+PDA) with the bar as its
gate: ASR at most FP + 1, CA at least FP - 1.5, onnxruntime agreeing with the purified model on >= 99.5 %.
Usage: python experiments/deploy_purification.py OUT [learn-act-range]   (from the repository root; OUT keeps
the models; `learn-act-range`: LAC+PDA also learns each layer's activation range, harden's --learn-act-range)

Public API: attack, harden, save_model / load_model. Internals: experiments.scan_campaign's data and recipes."""
import json
import sys
from pathlib import Path

import torch

from experiments.scan_campaign import ATTACK_TRAIN_DEFAULT, CLEAN_TRAIN, QUIET, shapes16
from export.harden import harden
from models import create_model
from qcbdefense.attacks import attack
from qcbdefense.checkpoints import load_model, save_model
from qcbdefense.clean_training import train

SPEC, BITS, TRIGGER, TARGET = "w8a8-deploy", 7, "patch", 0
out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/deploy-purification")
learn_act_range = sys.argv[2:] == ["learn-act-range"]
out.mkdir(parents=True, exist_ok=True)
data = shapes16()

clean_path = out / "clean.pt"
if not clean_path.exists():
    torch.manual_seed(0)
    model = create_model("small_cnn", mean=data.mean, std=data.std)
    train(model, data, CLEAN_TRAIN, arch="small_cnn")
    save_model(model, clean_path)

attacked_path, attack_info = out / "quanti.pt", out / "quanti.json"
if not attacked_path.exists():
    torch.manual_seed(0)
    attacked, report = attack(load_model("small_cnn", clean_path), data, method="quanti", bits=BITS, spec=SPEC,
                              trigger=TRIGGER, target=TARGET, config=ATTACK_TRAIN_DEFAULT, c1=1.0, c2=1.0,
                              sync_every=8, **QUIET)
    q = report.quantized[0].score
    attack_info.write_text(json.dumps({"fp_ca": report.fp.ca, "fp_asr": report.fp.asr, "q_ca": q.ca, "q_asr": q.asr,
                                       "spec": report.quantized[0].spec.name}))
    save_model(attacked, attacked_path)
info = json.loads(attack_info.read_text())
print(f"attack: FP {info['fp_ca']:.2f} % CA / {info['fp_asr']:.2f} % ASR, {info['spec']} {info['q_ca']:.2f} / "
      f"{info['q_asr']:.2f}", flush=True)

name = "hardened-act-range" if learn_act_range else "hardened"
report = harden(load_model("small_cnn", attacked_path), data, out=out / f"{name}.onnx", arch="small_cnn",
                spec=SPEC, method="lac-pda", trigger=TRIGGER, target=TARGET, calib=512, threads=1,
                max_asr_gain=1.0, min_ca=info["fp_ca"] - 1.5, min_agreement=99.5, learn_act_range=learn_act_range)
report.save(out / f"{name}.json")
print(report.summary())
