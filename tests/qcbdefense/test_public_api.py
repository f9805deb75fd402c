"""The public API of `qcbdefense/__init__.py`: every verb resolves to its function, lazily, and the README's
example runs as written."""

import doctest
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qcbdefense

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_public_name_is_its_modules_object_and_no_submodule_shadows_a_verb():
    # Importing a submodule binds its name on the package: a verb named like a submodule would turn into it.
    submodules = {info.name for info in pkgutil.iter_modules(qcbdefense.__path__) if info.name != "__main__"}
    assert not submodules & set(qcbdefense._API)
    for name in submodules:
        importlib.import_module(f"qcbdefense.{name}")
    for name, (module, attribute) in qcbdefense._API.items():
        assert getattr(qcbdefense, name) is getattr(importlib.import_module(module), attribute), name
    assert {"quantize", "calibrate", "train", "evaluate", "attack", "purify", "scan", "export_onnx",
            "verify"} <= set(qcbdefense._API)
    assert set(qcbdefense.__all__) == {"__version__", *qcbdefense._API}
    with pytest.raises(AttributeError, match="no_such_verb"):
        qcbdefense.no_such_verb  # noqa: B018


def test_importing_the_package_and_the_cli_loads_neither_brevitas_nor_onnxruntime():
    code = ("import sys, qcbdefense; bare = sorted(m for m in ('torch', 'brevitas', 'onnxruntime') if m in "
            "sys.modules); import qcbdefense.cli; cli = sorted(m for m in ('brevitas', 'onnxruntime') if m in "
            "sys.modules); print(bare, cli)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def _readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_a_doctest_of_the_public_api():
    examples = doctest.DocTestParser().get_examples(_readme_example())
    assert len(examples) >= 5
    assert "from qcbdefense import" in examples[0].source


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes purified.onnx
    test = doctest.DocTestParser().get_doctest(_readme_example(), {}, "README.md", str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert (tmp_path / "purified.onnx").is_file()
