"""Safe checkpoint loading and saving: weights only, never code.

A QCB defense exists to be run on a stranger's model, so every file is untrusted. Torch files go through
`torch.load(weights_only=True)`, which refuses any pickle that names a callable (`os.system`, a class
whose `__reduce__` runs code, but also numpy arrays and `argparse.Namespace`: convert those elsewhere,
once, by someone who trusts the file). `.safetensors` files hold only a JSON header and raw tensor bytes.

Files are read by suffix:
    .pt .pth .th .bin .ckpt   torch.save output: a state_dict, or a container {"state_dict": ...} or
                              {"model": ...}, keys optionally prefixed "module." (nn.DataParallel)
    .safetensors              safetensors; `read_safetensors_metadata` returns its string header

`save_model` writes the first kind as a plain state_dict (tensors only) and the second with metadata.
Everything a stranger's file can get wrong surfaces as one `InputError` naming the file.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from models.reference import check_reference, model_for_state
from qcbdefense.errors import InputError, first_line
from qcbdefense.fileio import atomic_path

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"

# Keys a checkpoint may lack. normalize.mean/std: files from other code bases (the shared ResNet-20 among
# them) store no input statistics, and the model then keeps its default CIFAR ones. num_batches_tracked:
# BatchNorm's step counter, absent from older files (the shared ResNet-20 again); BatchNorm's own loader
# fills it in as well, and it only matters with momentum=None, which no model here uses.
_OPTIONAL_KEYS = ("normalize.mean", "normalize.std")
_OPTIONAL_SUFFIX = "num_batches_tracked"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict on CPU, refusing anything but tensors.

    Unwraps {"state_dict": ...} and {"model": ...} containers and strips a "module." prefix that every key
    shares (nn.DataParallel). The shared ResNet-20 ({"best_prec1", "state_dict"}, "module." keys, saved on
    CUDA) loads through here as it is.

    Raises InputError for a missing path, a directory, an empty, truncated or corrupt file, an unknown
    suffix, a pickle that carries code, content that is not a mapping of names to tensors, or weights that
    are NaN or infinite (a diverged run: every figure of it would be noise).
    """
    path = Path(path)
    _check_is_file(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        content = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        content = _read_torch(path)
    else:
        raise InputError(f"checkpoint {path} has an unknown suffix {path.suffix!r}; "
                         f"use one of {', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}")
    return _as_state_dict(content, path)


def load_model(arch: str, path: str | Path, *, num_classes: int | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Build the model `arch` refers to and load the checkpoint at `path` into it strictly; return it in eval
    mode on CPU.

    `arch` is a model reference (`models.reference`: a zoo name, torchvision:NAME, timm:NAME,
    PACKAGE.MODULE:CALLABLE or an FP .onnx file). `num_classes=None` reads the class count from the
    checkpoint's classifier (the model's last nn.Linear). mean/std: the input statistics of a model the
    checkpoint has none for (default CIFAR's). Only normalize.mean/std and BatchNorm's num_batches_tracked
    may be missing; any other missing or unexpected key, or a shape that differs, raises InputError listing
    them, e.g. "checkpoint x.pt does not fit resnet20: 12 missing keys (...)".

    Examples:
        >>> path = "../shared/checkpoints/resnet20-cifar10-12fca82f.th"
        >>> model = load_model("resnet20", path)  # doctest: +SKIP
        >>> model(torch.rand(1, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([1, 10])
    """
    check_reference(arch)  # an unknown architecture fails before the file is read
    if num_classes is not None and num_classes < 1:
        raise InputError(f"num_classes must be at least 1, got {num_classes}")
    model, state = model_for_state(arch, load_state_dict(path), num_classes=num_classes, mean=mean, std=std)
    _check_fits(model, state, arch, path)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(map(_is_optional, result.missing_keys)), result
    return model.eval()


def save_model(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path, *,
               metadata: dict[str, str] | None = None) -> Path:
    """Write a model's state_dict atomically: safetensors for a .safetensors path, else torch.save.

    Tensors are saved as contiguous CPU copies, so the file loads anywhere with `weights_only=True` and
    safetensors never sees views sharing memory. `metadata` (str -> str) goes into the safetensors header;
    a torch file stays a plain state_dict, so it cannot take metadata and InputError says so.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,):
        raise InputError(f"cannot save a checkpoint as {path}: unknown suffix {path.suffix!r}; "
                         f"use one of {', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}")
    if metadata and suffix != SAFETENSORS_SUFFIX:
        raise InputError(f"cannot store metadata in {path}: only a {SAFETENSORS_SUFFIX} file has a header "
                         f"for it, a torch file is a plain state_dict")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise TypeError(f"metadata must map str to str, got {metadata!r}")
    state = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
             else model_or_state_dict)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"a state_dict maps str to tensors, but {name!r} holds a {type(value).__name__}")
        tensors[name] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    if suffix != SAFETENSORS_SUFFIX:
        return save_torch(tensors, path)
    content = safetensors.torch.save(tensors, metadata=metadata)  # in memory: save_file would make its own 0600 file
    with atomic_path(path) as tmp:
        tmp.write_bytes(content)
    return path


def save_torch(obj: object, path: str | Path) -> Path:
    """torch.save `obj` to `path` atomically, byte for byte the same for the same content.

    torch.save names the folder inside its zip archive after the file it writes to; saved straight to a
    temporary file, that random name would make every copy differ (and the sha256 that export records with
    it). Saved to memory first, the folder is always "archive".
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(path)


def read_torch_file(path: str | Path) -> object:
    """What a torch.save file holds, read weights-only (tensors, containers, numbers and strings; never code).

    InputError for a missing, empty, truncated or corrupt file, or one that carries pickled code.
    """
    path = Path(path)
    _check_is_file(path)
    return _read_torch(path)


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a .safetensors header ({} when it has none); InputError for a bad file."""
    path = Path(path)
    _check_is_file(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise InputError(f"{path} is not a {SAFETENSORS_SUFFIX} file, so it has no metadata header")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except (SafetensorError, OSError) as err:
        raise InputError(f"checkpoint {path} is not a readable safetensors file: {err}") from err
    return dict(metadata or {})


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise InputError(f"checkpoint {path} is a directory (or other non-file), not a checkpoint file")
    if path.stat().st_size == 0:
        raise InputError(f"checkpoint {path} is empty")


def _read_torch(path: Path) -> object:
    # torch.save writes a zip archive (torch >= 1.6) or a pickle of protocol >= 2, which opens with 0x80.
    # Anything else is refused before the unpickler sees it: a text file starting with "c" would otherwise
    # parse as a pickle GLOBAL opcode and be reported as code.
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":
        raise InputError(f"checkpoint {path} is not a torch.save file: "
                         f"it is neither a zip archive nor a pickle")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files it then rejects: the error below says it all.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Weights only load failed" not in message:
            raise InputError(f"checkpoint {path} is truncated or corrupt ({first_line(message)})") from err
        named = re.search(r"GLOBAL (\S+)", message)
        if named:
            raise InputError(f"checkpoint {path} refused: it carries pickled code, not just tensors "
                             f"(it references {named.group(1)})") from err
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        reason = detail.group(1).strip() if detail else "no reason given"
        raise InputError(f"checkpoint {path} is truncated or corrupt, or not a plain torch.save file: "
                         f"the weights-only unpickler rejects it ({reason})") from err
    except Exception as err:
        # Broad on purpose: a damaged file can break the unpickler or the zip reader almost anywhere, and
        # each place raises its own type (EOFError for a cut pickle, OSError or RuntimeError for a cut zip,
        # KeyError for stray bytes). Whatever it is, the file is unreadable; the message and the exception
        # chain keep the original type.
        raise InputError(f"checkpoint {path} is truncated or corrupt: torch.load failed with "
                         f"{type(err).__name__} ({first_line(str(err))})") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise InputError(f"checkpoint {path} is truncated or corrupt: not a readable safetensors file "
                         f"({first_line(str(err))})") from err


def _as_state_dict(content: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap a training container, check that every entry is a named tensor, strip "module."."""
    if isinstance(content, Mapping):
        for container_key in ("state_dict", "model"):
            if isinstance(content.get(container_key), Mapping):
                content = content[container_key]
                break
    if not isinstance(content, Mapping):
        raise InputError(f"checkpoint {path} holds a {type(content).__name__}, "
                         f"not a mapping of names to tensors")
    if not content:
        raise InputError(f"checkpoint {path} holds no tensors")
    for name, value in content.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"checkpoint {path} is not a mapping of names to tensors: "
                             f"{name!r} holds a {type(value).__name__}")
    broken = [name for name, value in content.items()
              if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise InputError(f"checkpoint {path} holds NaN or infinite values: {_count_and_list(broken, 'tensor')}")
    prefix = "module."
    if all(name.startswith(prefix) for name in content):
        return {name[len(prefix):]: value for name, value in content.items()}
    return dict(content)


def _is_optional(key: str) -> bool:
    return key in _OPTIONAL_KEYS or key.rsplit(".", 1)[-1] == _OPTIONAL_SUFFIX


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, path: Path) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not _is_optional(key)]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key}: {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model"
                  for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = [_count_and_list(keys, noun) for keys, noun in
                ((missing, "missing key"), (unexpected, "unexpected key"), (mismatched, "shape mismatch"))
                if keys]
    if problems:
        raise InputError(f"checkpoint {path} does not fit {arch}: {', '.join(problems)}")


def _count_and_list(items: list[str], noun: str, shown: int = 3) -> str:
    plural = noun + ("es" if noun.endswith("h") else "s") if len(items) != 1 else noun
    listed = ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")
    return f"{len(items)} {plural} ({listed})"
