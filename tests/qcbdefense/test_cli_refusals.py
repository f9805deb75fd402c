"""The command line as a careless or hostile user meets it (issue 28): every figure that could only be a false
all-clear is refused, no output lands on an input, outputs are checked before the work, a run that diverges
has its own exit code, and no refusal leaves a traceback or a half-written output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import create_model
from qcbdefense.checkpoints import save_model
from qcbdefense.cli import EXAMPLES, build_parser, main

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, *fragments, exit_code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code and len(lines) == 1, (code, err)
    assert lines[0].startswith("qcbdefense: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Untrained small CNNs with 10 (the built-in data's count), 5 and 100 classes."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    return {n: save_model(create_model("small_cnn", num_classes=n), folder / f"m{n}.pt") for n in (10, 5, 100)}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as loading its data (the work starts there)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded its data before refusing")

    monkeypatch.setattr("qcbdefense.data.load_dataset", refuse)


@pytest.mark.parametrize("command, extra", [
    ("quantize", ["--spec", "w8a8"]),
    ("purify", ["--method", "nearest", "--spec", "w8a8"]),
    ("harden", ["--method", "nearest", "--spec", "w8a8"]),
])
@pytest.mark.parametrize("target", ["10", "-1"])
def test_a_target_that_is_no_class_is_refused(capsys, tmp_path, ckpts, command, extra, target):
    out = tmp_path / ("o.onnx" if command == "harden" else "o")
    code, _, err = run_cli(capsys, command, "--model", "small_cnn", "--ckpt", ckpts[10], "--data", "builtin",
                           "--trigger", "patch", "--target", target, *extra, *([] if command == "quantize" else
                                                                                ["--out", out]))
    assert_refused(code, err, f"--target {target}", "0..9")
    assert not out.exists()


@pytest.mark.parametrize("classes", [5, 100])
@pytest.mark.parametrize("command", ["quantize", "export", "purify", "scan", "attack"])
def test_a_checkpoint_with_another_class_count_is_refused(capsys, tmp_path, ckpts, command, classes):
    ckpt = ckpts[classes]
    argv = {"quantize": ["--ckpt", ckpt, "--spec", "w8a8"],
            "export": ["--ckpt", ckpt, "--spec", "w8a8", "--out", tmp_path / "o.onnx"],
            "purify": ["--ckpt", ckpt, "--method", "nearest", "--out", tmp_path / "o"],
            "scan": ["--fp", ckpt, "--spec", "w8a8", "--out", tmp_path / "o"],
            "attack": ["--method", "pqbackdoor", "--init", ckpt, "--out", tmp_path / "o"]}[command]
    code, _, err = run_cli(capsys, command, "--model", "small_cnn", "--data", "builtin", *argv)
    assert_refused(code, err, f"has {classes} classes", "has 10")
    assert list(tmp_path.iterdir()) == []


def test_scan_of_an_onnx_pair_with_other_class_counts_is_refused_without_a_folder(capsys, tmp_path):
    from export.onnx import export_float_onnx

    fp = export_float_onnx(create_model("small_cnn").eval(), tmp_path / "fp.onnx")
    shipped = export_float_onnx(create_model("small_cnn", num_classes=5).eval(), tmp_path / "q.onnx")
    code, _, err = run_cli(capsys, "scan", "--fp", fp, "--quantized", shipped, "--data", "builtin",
                           "--out", tmp_path / "scan")
    assert_refused(code, err, "q.onnx has 5 classes")
    assert not (tmp_path / "scan").exists()


def test_scan_input_errors_leave_no_folder(capsys, tmp_path, ckpts):
    code, _, err = run_cli(capsys, "scan", "--fp", ckpts[10], "--model", "small_cnn", "--spec", "w8a8",
                           "--data", "builtin", "--images", "8", "--out", tmp_path / "scan")
    assert_refused(code, err, "--images")
    assert not (tmp_path / "scan").exists()


def test_more_calibration_images_than_the_data_has_are_refused(capsys, tmp_path, ckpts):
    code, _, err = run_cli(capsys, "quantize", "--model", "small_cnn", "--ckpt", ckpts[10], "--data", "builtin",
                           "--calib", "99999999", "--out", tmp_path / "r.json")
    assert_refused(code, err, "--calib 99999999", "only 10000 training images")
    assert not (tmp_path / "r.json").exists()


def test_the_default_calibration_count_is_cut_to_the_data_and_recorded(capsys, tmp_path, ckpts, make_image_folder):
    tiny = make_image_folder(tmp_path / "tiny", n_train=4)  # 12 training images, under the default 512
    ckpt = save_model(create_model("small_cnn", num_classes=3), tmp_path / "m3.pt")
    code, out, err = run_cli(capsys, "quantize", "--model", "small_cnn", "--ckpt", ckpt, "--data",
                             f"folder:{tiny.path}", "--spec", "w8a8", "--out", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["calib"] == len(tiny.train_y) == 12



def test_an_output_over_its_own_input_is_refused(capsys, tmp_path, ckpts, no_work):
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(ckpts[10].read_bytes())
    code, _, err = run_cli(capsys, "quantize", "--model", "small_cnn", "--ckpt", ckpt, "--data", "builtin",
                           "--out", ckpt)
    assert_refused(code, err, "--ckpt", "destroy the input")
    assert ckpt.read_bytes() == ckpts[10].read_bytes()

    onnx = tmp_path / "x.onnx"
    onnx.write_bytes(b"an onnx file")
    code, _, err = run_cli(capsys, "verify", onnx, "--data", "builtin", "--out", tmp_path / "." / "x.onnx")
    assert_refused(code, err, "destroy the input")
    assert onnx.read_bytes() == b"an onnx file"


def test_fine_tuning_into_the_folder_of_the_init_checkpoint_is_refused(capsys, tmp_path, ckpts, no_work):
    run = tmp_path / "run"
    run.mkdir()
    init = run / "model.pt"
    init.write_bytes(ckpts[10].read_bytes())
    code, _, err = run_cli(capsys, "train", "--model", "small_cnn", "--data", "builtin", "--init", init,
                           "--out", run)
    assert_refused(code, err, "--init")
    assert init.read_bytes() == ckpts[10].read_bytes()


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
@pytest.mark.parametrize("command", ["train", "quantize", "purify", "export", "verify", "scan", "attack", "harden"])
def test_outputs_that_cannot_be_written_are_refused_before_the_work(capsys, tmp_path, ckpts, no_work, command,
                                                                     where):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    folder_out = command in ("train", "purify", "scan", "attack")
    out = {"a file": afile if folder_out else tmp_path / "d.onnx",  # a file for a folder, a folder for a file
           "under a file": afile / ("run" if folder_out else "o.onnx"),
           "read-only": Path("/proc") / ("qcb-run" if folder_out else "o.onnx")}[where]
    if where == "a file" and not folder_out:
        out.mkdir()
    argv = {"train": [],
            "quantize": ["--ckpt", ckpts[10]],
            "purify": ["--ckpt", ckpts[10]],
            "export": ["--ckpt", ckpts[10], "--spec", "w8a8"],
            "verify": [],
            "scan": ["--fp", ckpts[10], "--spec", "w8a8"],
            "attack": ["--method", "pqbackdoor", "--init", ckpts[10]],
            "harden": ["--ckpt", ckpts[10]]}[command]
    head = [command, tmp_path / "m.onnx"] if command == "verify" else [command, "--model", "small_cnn"]
    code, _, err = run_cli(capsys, *head, "--data", "builtin", *argv, "--out", out)
    assert_refused(code, err, "output")
    assert afile.read_text() == "mine"


@pytest.fixture
def resumable(tmp_path):
    return ["train", "--model", "small_cnn", "--data", "builtin", "--train-subset", "64", "--epochs", "1",
            "--resume", "--out", tmp_path]


def test_a_corrupt_training_state_is_refused_on_resume(capsys, tmp_path, resumable):
    (tmp_path / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    code, _, err = run_cli(capsys, *resumable)
    assert_refused(code, err, "state.pt", "corrupt")


def test_a_hostile_training_state_is_refused_on_resume_and_never_runs(capsys, tmp_path, resumable):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"config": {}, "model": Payload()}, tmp_path / "state.pt")
    code, _, err = run_cli(capsys, *resumable)
    assert_refused(code, err, "state.pt", "pickled code")
    assert "weights_only" not in err and not (tmp_path / "ran").exists()


def test_a_training_state_of_another_shape_is_refused_on_resume(capsys, tmp_path, resumable):
    torch.save({"config": {"nope": 1}}, tmp_path / "state.pt")
    code, _, err = run_cli(capsys, *resumable)
    assert_refused(code, err, "not a training state")


def test_a_diverging_learning_rate_ends_in_one_line_and_its_own_exit_code(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--model", "small_cnn", "--data", "builtin", "--train-subset", "128",
                           "--batch-size", "64", "--epochs", "1", "--lr", "1e30", "--out", tmp_path / "run")
    assert_refused(code, err.split("\r")[-1], "diverged", "--lr", exit_code=3)  # after the cleared progress bar
    assert "Traceback" not in err


def test_version():
    result = subprocess.run([sys.executable, "-m", "qcbdefense", "--version"], capture_output=True, text=True)
    from qcbdefense import __version__

    assert result.returncode == 0 and result.stdout.strip() == f"qcbdefense {__version__}"


def test_every_subcommand_help_ends_with_examples(monkeypatch):
    import qcbdefense.cli

    monkeypatch.setattr(qcbdefense.cli, "_existing_file", Path)  # the examples' files need not exist here
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(EXAMPLES)
    for name, command in commands.items():
        lines = [line for line in command.format_help().splitlines() if line.strip()]
        examples = lines[lines.index("examples:") + 1:]
        assert examples and all(line.strip().startswith(f"qcbdefense {name} ") for line in examples), name
        for line in examples:  # every example parses
            parser.parse_args(line.split()[1:])


def test_a_users_own_models_and_export_folders_do_not_shadow_the_toolkit(tmp_path):
    for name in ("models", "export"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user own {name}')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "qcbdefense", "export", "--help"], capture_output=True,
                            text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-c", "import qcbdefense, models, export.onnx; print(models.__file__)"],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0 and result.stdout.strip() == str(REPO / "models" / "__init__.py"), result.stderr


def test_a_foreign_models_package_imported_first_is_one_clear_error(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    result = subprocess.run([sys.executable, "-c", "import models; import qcbdefense"], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    assert "qcbdefense needs its own top-level package 'models'" in result.stderr.strip().splitlines()[-1]
