"""Datasets by spec string, and the batching every training and evaluation loop shares.

A spec names a dataset on the command line:

- ``builtin`` or ``builtin:SEED``: ten classes of smooth coloured shapes, generated from the seed (default 0)
  in about a second with no download; small_cnn learns it to about 90 % but, by design, never 100 %.
  ``builtin:classes=N`` (or ``builtin:SEED,classes=N``) makes N classes: each shape in ceil(N / 10) bands of
  foreground hue, class c being shape c mod 10 in band c // 10 (a task with many classes, for timing).
- ``cifar10:PATH``: the python-pickle CIFAR-10 (``cifar-10-batches-py``); PATH is that folder or its parent.
- ``folder:PATH``: an ImageFolder tree ``PATH/{train,test}/<class>/*.jpg|jpeg|png|ppm`` (``val`` stands in for a
  missing ``test``), or a ``.tar.gz``/``.tgz`` archive of one, extracted once into the cache. Classes are the
  sorted class folder names; images are converted to RGB, and any whose size differs from the most common
  one is resized to it (with a warning).

Images are kept as uint8 ``[N, 3, H, W]`` and turned into float pixels in [0, 1] batch by batch (`batches`):
models normalise inside, and triggers are applied in pixel space. Decoded images and generated datasets are
cached as ``.npz`` files in ``cache_dir`` (default: ``$QCBDEFENSE_CACHE`` or ``~/.cache/qcbdefense``), keyed by
a hash of the source, so the 60,000 shared CIFAR-10 JPEGs decode once.

Examples:
    >>> data = load_dataset("builtin")                                          # doctest: +SKIP
    >>> for xb, yb in batches(data.train_x, data.train_y, batch_size=128, shuffle=True, augment=True):  # doctest: +SKIP
    ...     loss = criterion(model(xb), yb)
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from qcbdefense.errors import InputError
from qcbdefense.fileio import atomic_path
from qcbdefense.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm")
POOL_MIN_IMAGES = 2000          # decode in a process pool from this many images on; below, startup costs more

# Bump when the generator of the builtin dataset changes, so stale cached copies are not reused.
BUILTIN_VERSION = 1

# A loader takes the text after "kind:" (None when there was no colon) and the cache folder.
DATASETS: Registry[Callable[[str | None, Path], "Dataset"]] = Registry("dataset kind")


@dataclass
class Dataset:
    """Train and test splits as uint8 images ``[N, 3, H, W]`` and int64 labels ``[N]``.

    `mean` and `std` are the per-channel statistics of the train images scaled to [0, 1]; pass them to
    ``models.create_model`` so the model's Normalize layer fits this data.
    """

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        """A small JSON-able summary for run records."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "train_size": len(self.train_y),
            "test_size": len(self.test_y),
            "image_shape": list(self.train_x.shape[1:]),
            "mean": list(self.mean),
            "std": list(self.std),
        }


def load_dataset(spec: str, *, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load the dataset a spec string names (see the module docstring); InputError for any bad spec or file."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"dataset spec must be a non-empty string such as 'builtin' or 'folder:DIR', got {spec!r}")
    kind, sep, arg = spec.partition(":")
    loader = DATASETS.get(kind)
    return loader(arg if sep else None, default_cache_dir() if cache_dir is None else Path(cache_dir))


def default_cache_dir() -> Path:
    return Path(os.environ.get("QCBDEFENSE_CACHE") or Path.home() / ".cache" / "qcbdefense")


# ---------------------------------------------------------------------------------------------------------
# Tensors and batches


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1], same shape and device."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {x_uint8.dtype}")
    return x_uint8.to(torch.float32).div_(255.0)


def augment(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation, per sample: a random crop, of the image's own size, from the image
    zero-padded by 4 pixels on each side, then a horizontal flip with probability 1/2.

    `x` is a float batch ``[N, C, H, W]`` on any device; the result is a new tensor on the same device. The
    random numbers come from `generator` (drawn on the generator's device, then moved), so a seeded generator
    gives the same crops and flips on CPU and GPU.
    """
    if x.dim() != 4:
        raise ValueError(f"augment expects a batch [N, C, H, W], got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    pad = 4
    rng_device = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rng_device).to(x.device)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rng_device).to(x.device)
    flip = torch.rand(n, generator=generator, device=rng_device).lt(0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = top[:, None] + torch.arange(h, device=x.device)                       # [N, H]
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + left[:, None]         # a flip reverses the columns
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices split by a slice put their broadcast dims first: the result is [N, H, W, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


_augment = augment  # `batches` takes a flag of the same name


def batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None, device: str | torch.device = "cpu",
            augment: bool = False, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` on `device` covering every sample once, the last batch possibly smaller.

    Images come out as float32 in [0, 1]. `transform` (a trigger's ``apply``, say) acts in pixel space before
    the augmentation, as a poisoned image would have been stored before a victim's data pipeline crops it.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    n = len(x)
    order = None
    if shuffle:
        rng_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=rng_device).to(x.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        xb = x[idx].to(device)
        xb = to_float(xb) if xb.dtype == torch.uint8 else xb.to(torch.float32)
        if transform is not None:
            xb = transform(xb)
        if augment:
            xb = _augment(xb, generator=generator)
        yield xb, y[idx].to(device)


# ---------------------------------------------------------------------------------------------------------
# Caching


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Exact per-channel mean and std of uint8 images scaled to [0, 1], from 256-bin histograms.

    Histograms avoid a float copy of the whole split (600 MB for CIFAR-10's train set).
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = (hist * levels).sum() / total
        var = (hist * (levels - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)  # type: ignore[return-value]


def _make_dataset(name: str, classes: list[str], train_x: torch.Tensor, train_y: torch.Tensor,
                  test_x: torch.Tensor, test_y: torch.Tensor) -> Dataset:
    mean, std = _channel_stats(train_x)
    return Dataset(name, list(classes), train_x, train_y, test_x, test_y, mean, std)


def _as_triple(values: np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _cache_file(cache_dir: Path, kind: str, key: str) -> Path:
    return cache_dir / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _read_cache(path: Path, name: str) -> Dataset | None:
    """The cached dataset at `path`, or None when there is none or it cannot be read (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:                             # no pickle: a cache is data
            arrays = [torch.from_numpy(f[k]) for k in ("train_x", "train_y", "test_x", "test_y")]
            classes = [str(c) for c in f["classes"]]
            # Stored statistics save recomputing them (0.15 s for CIFAR-10): a cache hit stays well under 1 s.
            mean, std = _as_triple(f["mean"]), _as_triple(f["std"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"ignoring unreadable dataset cache {path} ({err}); rebuilding it")
        return None
    return Dataset(name, classes, *arrays, mean, std)


def _write_cache(path: Path, data: Dataset) -> None:
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            # np.savez on a file object: given a name it would append ".npz" to the temporary name.
            np.savez(f, train_x=data.train_x.numpy(), train_y=data.train_y.numpy(), test_x=data.test_x.numpy(),
                     test_y=data.test_y.numpy(), classes=np.array(data.classes, dtype=str),
                     mean=np.array(data.mean, dtype=np.float64), std=np.array(data.std, dtype=np.float64))
    except OSError as err:
        raise InputError(f"cannot write the dataset cache in {path.parent} ({err.strerror or err}); "
                         "set QCBDEFENSE_CACHE to a writable folder") from err


def _cached(cache_dir: Path, kind: str, key: str, name: str, build: Callable[[], Dataset]) -> Dataset:
    path = _cache_file(cache_dir, kind, key)
    data = _read_cache(path, name)
    if data is None:
        data = build()
        _write_cache(path, data)
    return data


# ---------------------------------------------------------------------------------------------------------
# builtin: shapes


BUILTIN_CLASSES = ["disc", "ring", "square", "diamond", "plus", "triangle", "hstripes", "vstripes", "twodots",
                   "crescent"]
BUILTIN_TRAIN, BUILTIN_TEST = 10_000, 2_000
BUILTIN_SIZE = 32
BUILTIN_BLEND_SHARE = 0.08      # drawn half one class, half another: a coin toss for any model
BUILTIN_LABEL_NOISE = 0.04      # a uniformly random wrong label, in both splits


def _class_sdf(cls: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A signed distance (positive inside, in units of the shape's radius) of class `cls` at (u, v), the
    coordinates ``[N, H, W]`` in the shape's own frame (centred, rotated, radius 1)."""
    rho = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    if cls == 0:                                                                # disc
        return 1.0 - rho
    if cls == 1:                                                                # ring
        return 0.22 - (rho - 0.75).abs()
    if cls == 2:                                                                # square
        return 0.8 - torch.maximum(au, av)
    if cls == 3:                                                                # diamond
        return (1.05 - au - av) / math.sqrt(2.0)
    if cls == 4:                                                                # plus
        return torch.maximum(torch.minimum(0.3 - au, 0.95 - av), torch.minimum(0.3 - av, 0.95 - au))
    if cls == 5:                                                                # triangle, apex up
        return torch.minimum(0.75 - v, (0.62 * (v + 1.0) - au) * 0.85)
    if cls in (6, 7):                                                           # horizontal, vertical stripes
        across = v if cls == 6 else u
        return torch.minimum(1.0 - rho, torch.sin(3.0 * math.pi * across) / (3.0 * math.pi))
    if cls == 8:                                                                # two dots
        return torch.maximum(0.42 - torch.sqrt((u - 0.55) ** 2 + v * v), 0.42 - torch.sqrt((u + 0.55) ** 2 + v * v))
    return torch.minimum(1.0 - rho, torch.sqrt((u - 0.45) ** 2 + v * v) - 0.75)  # crescent


def _shape_sdf(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`_class_sdf` for a batch of mixed classes `cls` ``[N]``: each sample's own shape only."""
    out = torch.empty_like(u)
    for c in range(len(BUILTIN_CLASSES)):
        idx = (cls == c).nonzero().squeeze(1)
        if len(idx):
            out[idx] = _class_sdf(c, u[idx], v[idx])
    return out


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N] hue, saturation, value in [0, 1] -> [N, 3] RGB."""
    k = torch.stack([torch.full_like(h, 5.0), torch.full_like(h, 3.0), torch.full_like(h, 1.0)], dim=1)
    k = (k + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _generate_shapes(n: int, gen: torch.Generator, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images ``[n, 3, 32, 32]`` uint8 and labels ``[n]``, balanced over the classes (`classes` > 10: the
    shapes in bands of foreground hue)."""
    size = BUILTIN_SIZE
    bands = -(-classes // len(BUILTIN_CLASSES))

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (n,), generator=gen)

    label = torch.arange(n) % classes
    label = label[torch.randperm(n, generator=gen)]
    y, band = label % len(BUILTIN_CLASSES), label // len(BUILTIN_CLASSES)

    # Each image: one shape with a random centre, radius, aspect and small rotation (small, so that square
    # and diamond, or the two stripe classes, stay apart), on a darker two-colour gradient, with texture.
    cy, cx = uniform(11.0, 21.0), uniform(11.0, 21.0)
    radius = uniform(6.0, 11.0)
    aspect = uniform(0.8, 1.25)
    angle = uniform(-0.35, 0.35)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = (grid[None, :, None] - cy[:, None, None]).expand(n, size, size)
    dx = (grid[None, None, :] - cx[:, None, None]).expand(n, size, size)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy) / (radius * aspect)[:, None, None]
    v = (-sin * dx + cos * dy) / (radius / aspect)[:, None, None]
    # Edge softness: the signed distance in pixels through a logistic of slope ~2.5 per pixel.
    pixel_scale = radius[:, None, None] * 2.5
    mask = torch.sigmoid(_shape_sdf(y, u, v) * pixel_scale)

    # A share of deliberately ambiguous images: the shape of a second class drawn at half strength over a
    # half-strength first, labelled as the first. Which half is "first" is a coin toss, so nobody beats 50 %.
    blend = torch.rand(n, generator=gen) < BUILTIN_BLEND_SHARE
    other = (y + torch.randint(1, len(BUILTIN_CLASSES), (n,), generator=gen)) % len(BUILTIN_CLASSES)
    other_mask = torch.sigmoid(_shape_sdf(other, u, v) * pixel_scale)
    mask = torch.where(blend[:, None, None], 0.5 * mask + 0.5 * other_mask, mask)

    # Colours: a saturated foreground (value <= 0.9, saturation >= 0.45, so never near white: the default
    # trigger is a white square) on a darker, duller gradient background.
    fg = _hsv_to_rgb((band + uniform(0.0, 1.0) * (0.8 if bands > 1 else 1.0)) / bands, uniform(0.45, 1.0),
                     uniform(0.55, 0.9))  # bands of hue, apart by a fifth of a band
    bg_a = _hsv_to_rgb(uniform(0.0, 1.0), uniform(0.0, 0.7), uniform(0.05, 0.45))
    bg_b = _hsv_to_rgb(uniform(0.0, 1.0), uniform(0.0, 0.7), uniform(0.05, 0.45))
    direction = uniform(0.0, 2.0 * math.pi)
    ramp = (torch.cos(direction)[:, None, None] * dx + torch.sin(direction)[:, None, None] * dy) / size + 0.5
    ramp = ramp.clamp(0.0, 1.0)[:, None]
    background = bg_a[:, :, None, None] * (1.0 - ramp) + bg_b[:, :, None, None] * ramp
    image = background * (1.0 - mask[:, None]) + fg[:, :, None, None] * mask[:, None]

    # Texture: a smooth brightness field (4x4 noise, upsampled) and a little pixel noise.
    field = torch.nn.functional.interpolate(uniform(-0.1, 0.1, n, 1, 4, 4), size=(size, size), mode="bilinear",
                                            align_corners=False)
    image = image + field + 0.03 * torch.randn(image.shape, generator=gen)

    # Label noise: a few labels replaced by a different class.
    flip = torch.rand(n, generator=gen) < BUILTIN_LABEL_NOISE
    wrong = (label + torch.randint(1, classes, (n,), generator=gen)) % classes
    label = torch.where(flip, wrong, label)

    x = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x, label.to(torch.int64)


def builtin_classes(classes: int) -> list[str]:
    """The class names: the ten shapes, or with more classes each shape with its hue band ("disc-1")."""
    if classes == len(BUILTIN_CLASSES):
        return BUILTIN_CLASSES
    return [f"{BUILTIN_CLASSES[c % len(BUILTIN_CLASSES)]}-{c // len(BUILTIN_CLASSES)}" for c in range(classes)]


def make_builtin(seed: int = 0, *, n_train: int = BUILTIN_TRAIN, n_test: int = BUILTIN_TEST,
                 classes: int = 10) -> Dataset:
    """Generate the builtin dataset (no cache); the same seed gives the same tensors on every machine."""
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    # One thread: these are many small element-wise ops, and on a busy machine torch's thread pool made
    # generation 5-10x slower (measured: 1 s on one thread, 2-10 s on two).
    torch.set_num_threads(1)
    try:
        n = n_train + n_test
        chunks = [_generate_shapes(min(2000, n - start), gen, classes)
                  for start in range(0, n, 2000)]  # bounds memory
    finally:
        torch.set_num_threads(threads)
    x = torch.cat([c[0] for c in chunks])
    y = torch.cat([c[1] for c in chunks])
    name = "builtin" if seed == 0 else f"builtin:{seed}"
    return _make_dataset(name, builtin_classes(classes), x[:n_train], y[:n_train], x[n_train:], y[n_train:])


@DATASETS.register("builtin")
def _load_builtin(arg: str | None, cache_dir: Path) -> Dataset:
    seed_text, classes = "0", 10
    for part in ("" if arg is None else arg).split(","):
        key, _, value = part.strip().rpartition("=")
        if key == "classes":
            if not value.isdigit() or not 2 <= int(value) <= 1000:
                raise InputError(f"builtin dataset classes must be an integer in 2..1000 (builtin:classes=N), "
                                 f"got {value!r}")
            classes = int(value)
        elif key or value:
            seed_text = part.strip()
    try:
        seed = int(seed_text)
    except ValueError:
        raise InputError(f"builtin dataset seed must be an integer (builtin:SEED), got {arg!r}") from None
    if not 0 <= seed < 2**63:
        raise InputError(f"builtin dataset seed must be in 0..2**63-1, got {seed}")
    name = "builtin" if arg is None else f"builtin:{arg}"
    key = f"builtin-v{BUILTIN_VERSION}-{seed}" + ("" if classes == 10 else f"-c{classes}")
    data = _cached(cache_dir, "builtin", key, name,
                   lambda: make_builtin(seed) if classes == 10 else make_builtin(seed, classes=classes))
    data.name = name
    return data


# ---------------------------------------------------------------------------------------------------------
# cifar10: the python-pickle batches


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR-10 pickle may name: what numpy needs to rebuild an array and its dtype.

    The functions are taken from numpy's own reductions, so this works whether numpy calls its core
    ``numpy.core`` (1.x, and the official files, written by Python 2) or ``numpy._core`` (2.x).
    """
    reconstruct = np.zeros(1).__reduce__()[0]               # pickle protocols 0-4
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]            # protocol 5
    scalar = np.uint8(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str) -> bytes:
    """How Python 3 writes bytes at pickle protocol 2: ``_codecs.encode(text, "latin1")``; no other codec."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global but numpy's array rebuilders.

    A pickle runs code by naming a callable (``os.system``, ``builtins.eval``) and calling it; with nothing
    callable to name but array constructors, a hostile file can at worst fail to load.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}") from None


def _load_pickle(path: Path) -> dict:
    """One CIFAR-10 batch file as a dict with str keys (the official files, from Python 2, have bytes keys)."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError) as err:
        raise InputError(f"CIFAR-10 file {path} is corrupt or not a CIFAR-10 pickle ({err})") from None
    except OSError as err:
        raise InputError(f"cannot read CIFAR-10 file {path} ({err.strerror or err})") from None
    if not isinstance(obj, dict):
        raise InputError(f"CIFAR-10 file {path} holds a {type(obj).__name__}, not the expected dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _load_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise InputError(f"CIFAR-10 file {path} lacks the 'data' or 'labels' entry (has: {sorted(batch)})")
    data, labels = batch["data"], batch["labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise InputError(f"CIFAR-10 file {path}: 'data' must be a uint8 array [N, 3072], got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise InputError(f"CIFAR-10 file {path}: 'labels' are not integers ({err})") from None
    if len(y) != len(data):
        raise InputError(f"CIFAR-10 file {path}: {len(data)} images but {len(y)} labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


@DATASETS.register("cifar10")
def _load_cifar10(arg: str | None, cache_dir: Path) -> Dataset:
    """No cache: reading the pickles is as fast as reading a cache would be."""
    root = _existing_path(arg, "cifar10")
    if not (root / "data_batch_1").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise InputError(f"{root} is not a CIFAR-10 python folder (cifar-10-batches-py): missing "
                         f"{', '.join(missing)}")
    meta = _load_pickle(root / "batches.meta")
    label_names = meta.get("label_names")
    classes = ([c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in label_names]
               if isinstance(label_names, (list, tuple)) else [])
    if not classes:
        raise InputError(f"CIFAR-10 file {root / 'batches.meta'} has no 'label_names'")
    train = [_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _cifar_batch(root / "test_batch")
    train_x, train_y = torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train])
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < len(classes)):
            raise InputError(f"CIFAR-10 folder {root}: {split} labels must be in 0..{len(classes) - 1}, "
                             f"found {int(y.min())}..{int(y.max())}")
    return _make_dataset(f"cifar10:{arg}", classes, train_x, train_y, test_x, test_y)


# ---------------------------------------------------------------------------------------------------------
# folder: ImageFolder trees and archives of them


def _existing_path(arg: str | None, kind: str) -> Path:
    if arg is None or not arg.strip():
        raise InputError(f"dataset spec {kind!r} needs a path: {kind}:PATH")
    path = Path(arg).expanduser()
    if not path.exists():
        raise InputError(f"dataset path {arg!r} does not exist")
    return path


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract `archive` once into the cache and return the folder; later calls reuse it.

    tarfile's "data" filter refuses absolute paths, ``..``, links out of the tree and device files, so a
    hostile archive cannot write outside its folder. The archive is extracted into a temporary folder that
    is renamed into place only when complete.
    """
    target = cache_dir / "extracted" / hashlib.sha256(_stat_key(archive).encode()).hexdigest()[:20]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, target)
    except (tarfile.TarError, EOFError, OSError) as err:
        if target.is_dir():                                 # another process finished first: use its copy
            return target
        raise InputError(f"cannot extract dataset archive {archive} ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)              # gone already when the rename succeeded
    return target


def _find_splits(root: Path, source: str) -> tuple[Path, Path]:
    """The train and test folders of an ImageFolder tree at `root`, or in its only subfolder."""
    while True:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        names = {p.name for p in subdirs}
        if "train" in names or "test" in names or "val" in names or len(subdirs) != 1:
            break
        root = subdirs[0]
    if "train" not in names:
        raise InputError(f"dataset folder {source} has no 'train' split folder (expected "
                         f"train/<class>/*.jpg and test/<class>/*.jpg; found: {sorted(names) or 'nothing'})")
    test = "test" if "test" in names else "val" if "val" in names else None
    if test is None:
        raise InputError(f"dataset folder {source} has no 'test' (or 'val') split folder")
    return root / "train", root / test


def _list_split(split: Path, source: str) -> dict[str, list[Path]]:
    """Class name -> sorted image files of one split."""
    classes = sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"dataset folder {source}: split '{split.name}' has no class folders")
    files = {c.name: sorted(f for f in c.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
             for c in classes}
    if not any(files.values()):
        raise InputError(f"dataset folder {source}: split '{split.name}' has no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    empty = [name for name, found in files.items() if not found]
    if empty:  # a class nothing can be learned or scored on: a dead output, and NaN per-class accuracy
        raise InputError(f"dataset folder {source}: class folder(s) {', '.join(empty)} in split '{split.name}' "
                         f"hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _decode(path: str) -> tuple[np.ndarray | None, str]:
    """One image as uint8 [H, W, 3], or None and the reason it cannot be read (runs in worker processes)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")), ""
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return None, str(err) or type(err).__name__


def _decode_all(paths: list[Path], workers: int = 2) -> list[np.ndarray]:
    """Decode `paths` in order, in a pool of `workers` processes when there are many."""
    names = [str(p) for p in paths]
    if workers > 1 and len(names) >= POOL_MIN_IMAGES:
        # fork: the workers need only PIL and numpy, and skip re-importing torch (seconds under spawn).
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(workers) as pool:
            results = pool.map(_decode, names, chunksize=500)
    else:
        results = [_decode(n) for n in names]
    images = []
    for name, (img, why) in zip(names, results):
        if img is None:
            raise InputError(f"cannot read image {name} ({why})")
        images.append(img)
    return images


def _stack(images: list[np.ndarray], source: str) -> torch.Tensor:
    """Stack decoded images into uint8 [N, 3, H, W]; images of another size than the most common one are
    resized to it (bilinear), so a mixed-size folder loads rather than fails."""
    sizes = Counter(img.shape[:2] for img in images)
    (h, w), _ = sizes.most_common(1)[0]
    if len(sizes) > 1:
        warnings.warn(f"dataset folder {source}: images have {len(sizes)} sizes; resizing all to {h}x{w}")
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = img if img.shape[:2] == (h, w) else np.asarray(Image.fromarray(img).resize((w, h),
                                                                                              Image.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _build_folder(name: str, root: Path, source: str) -> Dataset:
    train_dir, test_dir = _find_splits(root, source)
    train_files, test_files = _list_split(train_dir, source), _list_split(test_dir, source)
    classes = sorted(train_files)
    extra = sorted(set(test_files) - set(classes))
    if extra:
        raise InputError(f"dataset folder {source}: test classes {extra} have no train folder")
    labelled = [[(f, i) for i, c in enumerate(classes) for f in files.get(c, [])]
                for files in (train_files, test_files)]
    if not labelled[1]:
        raise InputError(f"dataset folder {source}: split '{test_dir.name}' has no images")
    images = _decode_all([f for split in labelled for f, _ in split])
    x = _stack(images, source)
    y = torch.tensor([i for split in labelled for _, i in split], dtype=torch.int64)
    n = len(labelled[0])
    return _make_dataset(name, classes, x[:n], y[:n], x[n:], y[n:])


def _tree_key(root: Path) -> str:
    """Path, names, sizes and modification times of every file under `root`: any change makes a new key."""
    parts = [str(root.resolve())]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            st = os.stat(os.path.join(dirpath, fname))
            parts.append(f"{os.path.relpath(os.path.join(dirpath, fname), root)}|{st.st_size}|{st.st_mtime_ns}")
    return "\n".join(parts)


@DATASETS.register("folder")
def _load_folder(arg: str | None, cache_dir: Path) -> Dataset:
    path = _existing_path(arg, "folder")
    name = f"folder:{arg}"
    if _is_archive(path):
        # Keyed by the archive alone: a cache hit needs neither the extraction nor a walk of 60,000 files.
        return _cached(cache_dir, "folder", f"archive|{_stat_key(path)}", name,
                       lambda: _build_folder(name, _extract_archive(path, cache_dir), str(path)))
    if not path.is_dir():
        raise InputError(f"dataset path {arg!r} is neither a folder nor a .tar.gz/.tgz archive")
    return _cached(cache_dir, "folder", f"tree|{_tree_key(path)}", name, lambda: _build_folder(name, path, arg))
