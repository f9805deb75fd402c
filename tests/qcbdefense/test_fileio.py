"""Outputs: whole or absent, with the umask's permissions, valid JSON, and checked before the work."""

import json
import os
from pathlib import Path

import pytest

from qcbdefense.errors import InputError
from qcbdefense.fileio import atomic_path, check_output, removed_on_error, same_file, write_json


def test_json_holds_no_nan_or_infinity(tmp_path):
    path = write_json(tmp_path / "r.json", {"per_class": [50.0, float("nan")], "x": (float("inf"), 1), "n": 2})
    text = path.read_text()
    assert json.loads(text) == {"per_class": [50.0, None], "x": [None, 1], "n": 2}
    assert "NaN" not in text and "Infinity" not in text


def test_atomic_files_take_the_umask_and_leave_nothing_on_error(tmp_path):
    previous = os.umask(0o027)
    try:
        write_json(tmp_path / "r.json", {})
        with pytest.raises(RuntimeError), atomic_path(tmp_path / "half.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    finally:
        os.umask(previous)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_check_output(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    check_output(tmp_path / "new" / "deeper" / "r.json")
    check_output(tmp_path / "run", folder=True)
    check_output(afile)  # an existing file is replaced atomically
    for path, folder, message in [(tmp_path, False, "is a folder"), (afile, True, "is a file"),
                                  (afile / "r.json", False, "lies under"), (afile / "run", True, "lies under"),
                                  (Path("/proc/qcb.json"), False, "cannot be written")]:
        with pytest.raises(InputError, match=message):
            check_output(path, folder=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the checks wrote nothing


def test_same_file_sees_through_links(tmp_path):
    a = tmp_path / "a.pt"
    a.write_bytes(b"1")
    os.link(a, tmp_path / "hard.pt")
    (tmp_path / "soft.pt").symlink_to(a)
    assert same_file(a, tmp_path / "hard.pt") and same_file(a, tmp_path / "soft.pt")
    assert same_file(a, tmp_path / "x" / ".." / "a.pt") and not same_file(a, tmp_path / "b.pt")


def test_removed_on_error_removes_only_a_folder_it_saw_appear(tmp_path):
    with pytest.raises(ValueError), removed_on_error(tmp_path / "new"):
        (tmp_path / "new").mkdir()
        raise ValueError
    (tmp_path / "old").mkdir()
    with pytest.raises(ValueError), removed_on_error(tmp_path / "old"):
        raise ValueError
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
