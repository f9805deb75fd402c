"""The command line: subcommands listed, bad input refused in one line with exit 2, train/resume reproducible."""

import json
import subprocess
import sys

import pytest
import torch

from qcbdefense.checkpoints import load_state_dict
from qcbdefense.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("qcbdefense: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "qcbdefense", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in ["train", "quantize", "attack", "purify", "export", "verify", "scan", "harden", "bench", "demo"]:
        assert name in result.stdout


def test_unknown_model_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "nope", "--data", "builtin", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "nope")


def test_nonsense_option_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "small_cnn", "--data", "builtin", "--epochs", "-3", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "-3")


def test_missing_data_folder_writes_nothing(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", "small_cnn", "--data", f"folder:{tmp_path / 'absent'}",
                           "--out", str(out))
    assert_one_line_error(code, err, "absent")
    assert not out.exists()


def test_empty_data_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "train", "--model", "small_cnn", "--data", f"folder:{tmp_path / 'empty'}",
                           "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err)


def test_corrupt_init_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04 not a checkpoint")
    code, _, err = run_cli(capsys, "train", "--model", "small_cnn", "--data", "builtin", "--init", str(bad),
                           "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "bad.pt")


def test_cuda_without_gpu_is_refused(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "train", "--model", "small_cnn", "--data", "builtin", "--device", "cuda",
                           "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "cuda")


def test_train_resume_reproduces_an_uninterrupted_run(capsys, tmp_path, monkeypatch):
    common = ["train", "--model", "small_cnn", "--data", "builtin", "--train-subset", "256",
              "--batch-size", "64", "--seed", "3", "--epochs", "2"]
    assert run_cli(capsys, *common, "--out", str(tmp_path / "full"))[0] == 0

    # Interrupt the same command during its second epoch's evaluation, then resume it.
    import qcbdefense.clean_training as train_module

    real_evaluate, calls = train_module.evaluate, []

    def interrupting_evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", interrupting_evaluate)
    assert run_cli(capsys, *common, "--out", str(tmp_path / "part"))[0] == 130
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    assert run_cli(capsys, *common, "--out", str(tmp_path / "part"), "--resume")[0] == 0

    report = json.loads((tmp_path / "part" / "report.json").read_text())
    assert [r["epoch"] for r in report["history"]] == [1, 2]
    assert report["config"]["seed"] == 3 and report["dataset"]["name"] == "builtin"
    assert 0.0 <= report["final"]["ca"] <= 100.0
    a = load_state_dict(tmp_path / "full" / "model.pt")
    b = load_state_dict(tmp_path / "part" / "model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must end with the same weights"


def test_resume_with_other_settings_is_refused(capsys, tmp_path):
    common = ["train", "--model", "small_cnn", "--data", "builtin", "--train-subset", "64", "--out", str(tmp_path)]
    assert run_cli(capsys, *common, "--epochs", "1")[0] == 0
    code, _, err = run_cli(capsys, *common, "--epochs", "1", "--lr", "0.3", "--resume")
    assert_one_line_error(code, err, "lr")


def test_train_with_a_step_budget_takes_exactly_that_many_steps(capsys, tmp_path):
    """256 images at batch 64 are 4 steps an epoch: a budget of 5 steps is one epoch and one step of the next,
    recorded in the report; asking a step recipe for epochs drops its budget."""
    from qcbdefense.training import TrainConfig

    code, out, _ = run_cli(capsys, "train", "--model", "small_cnn", "--data", "builtin", "--train-subset", "256",
                           "--batch-size", "64", "--steps", "5", "--out", str(tmp_path))
    assert code == 0 and "2 epochs, 5 steps" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["steps"] == 5 and [r["steps"] for r in report["history"]] == [4, 1]
    assert TrainConfig(steps=1955).schedule(13_000) == (102, 20, 1955)
    assert TrainConfig(epochs=5, steps=1955).updated(epochs=2).steps is None
    assert TrainConfig(epochs=5, steps=1955).updated(lr=0.1).steps == 1955
    with pytest.raises(SystemExit) as refused:  # argparse refuses it in one line
        main(["train", "--model", "small_cnn", "--data", "builtin", "--steps", "0", "--out", str(tmp_path / "bad")])
    assert refused.value.code == 2 and "--steps" in capsys.readouterr().err
