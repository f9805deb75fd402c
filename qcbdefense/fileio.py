"""Writing outputs safely: every file appears whole or not at all, outputs are checked before the work, and
JSON is written one way."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from qcbdefense.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash or an error midway leaves no half-written output under the final name. The file is created with
    the permissions the umask gives (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file_beside(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _new_file_beside(path: Path) -> Path:
    """Create an empty file with a fresh hidden name next to `path`, mode 0666 less the umask."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def removed_on_error(folder: str | os.PathLike) -> Iterator[None]:
    """Run a block that fills `folder`; if it fails and the folder did not exist before, remove the folder, so a
    refused or broken run leaves nothing behind."""
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically. NaN and infinities become null: JSON has no such numbers."""
    path = Path(path)
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: InputError saying why.

    A file output must not be a folder, a folder output not a file, neither may lie under a file, and the
    nearest folder that exists must take a new file (tried, so a read-only file system is caught too).
    Nothing is left behind.
    """
    path = Path(path)
    what = "output folder" if folder else "output"
    if path.is_dir() and not folder:
        raise InputError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not path.is_dir() and folder:
        raise InputError(f"{what} {path} is a file; give a folder")
    existing = path if path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {path} lies under {existing}, which is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InputError(f"{what} {path} cannot be written: {existing} does not take new files "
                         f"({err.strerror or type(err).__name__})") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (also through symbolic or hard links)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
