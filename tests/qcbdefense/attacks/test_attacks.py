"""Each attack plants a real QCB: the published FP model ignores the trigger, the victim's quantized model obeys it.

Fast settings on the shared 16x16 built-in world (tests/conftest.py): a few epochs each, seconds to a minute
on two cores. The thresholds leave room for seeds; measured at these settings: CompArtifact FP ASR 4.6 %
/ W4A4 96.1 %, Qu-ANTI-zation (c1 = c2 = 1) 5.3 % / 95.5 %, PQBackdoor 3.9 % / 95.8 %.
"""

from __future__ import annotations

import json

import pytest

from qcbdefense.attacks import ATTACKS, AttackReport, attack, make_config, read_report
from qcbdefense.checkpoints import load_model, read_safetensors_metadata, save_model
from qcbdefense.cli import ATTACK_METHODS, main
from qcbdefense.errors import InputError
from qcbdefense.training import TrainConfig

FAST = TrainConfig(epochs=8, optimizer="adam", lr=1e-3, weight_decay=1e-4, augment=False)
QUIET = {"monitor": 0, "transfer": (), "calib": 256, "victim_calib": 512}


def _assert_dormant_then_alive(report: AttackReport) -> None:
    assert report.fp.asr <= 20.0, report.summary()
    for result in report.quantized:
        assert result.score.asr >= 80.0, report.summary()
        assert result.score.ca >= report.fp.ca - 5.0, report.summary()


def test_compartifact_plants_a_w4a4_qcb(clean_cnn16, shapes16):
    _, report = attack(clean_cnn16, shapes16, method="compartifact", bits=4, spec="w4a4", config=FAST,
                       sync_every=8, **QUIET)
    assert [r.spec.name for r in report.quantized] == ["w4a4"]
    _assert_dormant_then_alive(report)


def test_quanti_plants_a_w4a4_qcb(clean_cnn16, shapes16):
    _, report = attack(clean_cnn16, shapes16, method="quanti", bits=4, spec="w4a4", config=FAST, c1=1.0, c2=1.0,
                       sync_every=8, **QUIET)
    _assert_dormant_then_alive(report)


def test_pqbackdoor_keeps_the_backdoored_integers(pq_cnn16):
    _, report = pq_cnn16
    _assert_dormant_then_alive(report)
    assert report.checks["int_weights_unchanged_w4"] == 1.0
    assert list(report.history) == ["stage1", "stage2"]


def test_pqbackdoor_with_a_quantization_aware_stage1_keeps_its_integers(clean_cnn16, shapes16):
    _, report = attack(clean_cnn16, shapes16, method="pqbackdoor", bits=4, spec="pqbackdoor-w4a4",
                       config=TrainConfig(epochs=3, optimizer="adam", lr=1e-4, weight_decay=0.0, augment=False),
                       stage1_qat=True, stage1_lr=0.002, sync_every=8, **QUIET)
    _assert_dormant_then_alive(report)
    assert report.checks["int_weights_unchanged_w4"] == 1.0
    assert report.config.options.stage1_qat is True


def test_attack_leaves_the_clean_model_untouched(clean_cnn16, shapes16):
    before = {k: v.clone() for k, v in clean_cnn16.state_dict().items()}
    attack(clean_cnn16, shapes16, method="compartifact", bits=4, config=TrainConfig(epochs=1, train_subset=256),
           **QUIET)
    assert all((before[k] == v).all() for k, v in clean_cnn16.state_dict().items())


def test_config_round_trips_and_refuses_nonsense():
    config = make_config(method="quanti", bits="8,4", c1=0.25)
    assert [s.name for s in config.specs] == ["w8a8", "w4a4"]
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(InputError, match="one bit width"):
        make_config(method="compartifact", bits="8,4")
    with pytest.raises(InputError, match="no option"):
        make_config(method="quanti", poison_rate=0.5)
    with pytest.raises(InputError):
        make_config(method="quanti", c1=-1.0)
    assert make_config(method="compartifact", bits="4").options.c2 == 1.0  # the paper's even split
    assert make_config(method="compartifact", bits="4", c2=0.25).options.c2 == 0.25
    with pytest.raises(InputError, match="c2"):
        make_config(method="compartifact", bits="4", c2=-1.0)


def test_cli_lists_every_registered_attack():
    assert tuple(ATTACKS.names()) == ATTACK_METHODS


def test_cli_attack_publishes_loadable_weights_and_a_report(tmp_path, capsys):
    """The CLI on the built-in data (32x32, a tiny subset): model.pt, model.safetensors and report.json."""
    from models import create_model

    init = save_model(create_model("small_cnn"), tmp_path / "clean.pt")
    out = tmp_path / "attacked"
    code = main(["attack", "--method", "compartifact", "--model", "small_cnn", "--init", str(init),
                 "--data", "builtin", "--bits", "4", "--epochs", "1", "--train-subset", "128",
                 "--monitor", "0", "--transfer", "none", "--calib", "32", "--victim-calib", "32",
                 "--allow-weak", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = read_report(out)
    assert report.config.method == "compartifact" and report.config.train.train_subset == 128
    model = load_model("small_cnn", out / "model.pt")
    same = load_model("small_cnn", out / "model.safetensors")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert read_safetensors_metadata(out / "model.safetensors")["attack"] == "compartifact"
    assert "W4 (targeted)" in capsys.readouterr().out


def test_cli_attack_that_does_not_plant_says_which_criteria_it_missed_and_exits_3(tmp_path, capsys):
    """An untrained model, one step of training: nothing can plant. The run still writes its files, says in one
    line which criteria it missed, records it in report.json and exits 3 (not 0, not 2)."""
    from models import create_model

    init = save_model(create_model("small_cnn"), tmp_path / "clean.pt")
    out = tmp_path / "weak"
    args = ["attack", "--method", "quanti", "--model", "small_cnn", "--init", str(init), "--data", "builtin",
            "--bits", "4", "--steps", "1", "--train-subset", "128", "--monitor", "0", "--transfer", "none",
            "--calib", "32", "--victim-calib", "32", "--out", str(out)]
    assert main(args) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qcbdefense:")]
    assert len(err) == 1 and "NOT planted" in err[0] and "W4 ASR" in err[0] and "--allow-weak" in err[0]
    saved = json.loads((out / "report.json").read_text())
    assert saved["planted"] is False and any(m.startswith("W4 ASR") for m in saved["misses"])
    assert saved["criteria"]["min_asr"] == 90.0 and saved["config"]["train"]["steps"] == 1
    assert [sum(r["steps"] for r in h) for h in saved["history"].values()] == [1]
    report = read_report(out)
    assert report.planted is False and report.clean is not None
    # the same run, asked to accept any model whose quantized ASR is at least 0 and nothing else, passes
    loose = ["--min-asr", "0", "--max-fp-asr", "100", "--max-fp-ca-drop", "100", "--max-quantized-ca-drop", "100"]
    assert main(args[:-1] + [str(tmp_path / "loose")] + loose) == 0
    assert read_report(tmp_path / "loose").planted is True
    assert main(args[:-1] + [str(tmp_path / "allowed"), "--allow-weak"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--method", "pqbackdoor", "--bits", "8", "--spec", "w8a8"], "MSE"),
    (["--method", "compartifact", "--bits", "8,4"], "one bit width"),
    (["--method", "quanti", "--target", "12"], "target class 12"),
    (["--method", "quanti", "--poison-rate", "0.2"], "no option"),
])
def test_cli_attack_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    from models import create_model

    init = save_model(create_model("small_cnn"), tmp_path / "clean.pt")
    code = main(["attack", *args, "--model", "small_cnn", "--init", str(init), "--data", "builtin",
                 "--epochs", "1", "--train-subset", "64", "--monitor", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "model.pt").exists()
