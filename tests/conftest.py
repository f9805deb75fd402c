"""Shared fixtures: tiny datasets on disk in every format `load_dataset` reads, and an isolated cache.

Every fixture writes a few dozen pixels, so any test may use them freely. The writers are fixtures that
return functions (``make_image_folder(root, ext="jpg")``) for tests that need a variant or a copy to break.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class TinyData:
    """What a tiny dataset on disk holds, to compare `load_dataset` against (uint8 [N, 3, H, W], int64 [N])."""

    path: Path
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@pytest.fixture(scope="session", autouse=True)
def _one_core_per_worker():
    """Under pytest-xdist (setup.cfg runs two workers) each worker takes one core: two OpenMP threads in each of
    two processes would oversubscribe a 2-core machine, and spin-waiting threads then cost more than they give."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point the dataset cache at a session temporary folder, unless the developer chose one.

    Tests then never write to ~/.cache; set QCBDEFENSE_CACHE to keep decoded data between runs.
    """
    if os.environ.get("QCBDEFENSE_CACHE"):
        yield
        return
    os.environ["QCBDEFENSE_CACHE"] = str(tmp_path_factory.mktemp("qcb-cache"))
    yield
    del os.environ["QCBDEFENSE_CACHE"]


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread, restored afterwards. The two cores are shared with other jobs: with
    two OpenMP threads a small forward waited ~100x longer (3.4 s vs 0.035 s for MobileNetV2 on two images)
    than with one. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty cache folder of the test's own."""
    return tmp_path / "cache"


def _random_images(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3, height, width), dtype=np.uint8)


def write_cifar10(root: Path, *, n_train: int = 20, n_test: int = 10, seed: int = 0,
                  protocol: int = 2) -> TinyData:
    """Write ``root/cifar-10-batches-py`` in the official layout: five ``data_batch_i`` and a ``test_batch``,
    each a pickled dict with bytes keys (``b"data"``: uint8 [n, 3072], ``b"labels"``: a list of ints, ...),
    and ``batches.meta`` with ``b"label_names"``. The official files are Python 2 pickles, protocol 2."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, test_x = _random_images(rng, n_train, 32, 32), _random_images(rng, n_test, 32, 32)
    train_y, test_y = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)

    def batch(label: str, x: np.ndarray, y: np.ndarray) -> dict:
        return {b"batch_label": label.encode(), b"labels": [int(v) for v in y], b"data": x.reshape(len(x), -1),
                b"filenames": [f"img_{i}.png".encode() for i in range(len(x))]}

    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        dump(f"data_batch_{i}", batch(f"training batch {i} of 5", train_x[part], train_y[part]))
    dump("test_batch", batch("testing batch 1 of 1", test_x, test_y))
    dump("batches.meta", {b"num_cases_per_batch": n_train // 5, b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                          b"num_vis": 3072})
    return TinyData(folder, list(CIFAR10_CLASSES), torch.from_numpy(train_x), torch.from_numpy(train_y).long(),
                    torch.from_numpy(test_x), torch.from_numpy(test_y).long())


def write_image_folder(root: Path, *, classes: tuple[str, ...] = ("cat", "dog", "frog"), n_train: int = 4,
                       n_test: int = 2, size: tuple[int, int] = (8, 8), ext: str = "png", test_split: str = "test",
                       seed: int = 0) -> TinyData:
    """Write an ImageFolder tree ``root/{train,<test_split>}/<class>/NNNN.<ext>`` of random RGB images.

    PNG is lossless, so the returned tensors are exactly what a loader must produce; JPEG ones are only close.
    Images are listed class by class in sorted order, files sorted by name, as the loader orders them.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    out: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for split, n in (("train", n_train), (test_split, n_test)):
        xs, ys = [], []
        for label, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, img in enumerate(_random_images(rng, n, height, width)):
                Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:04d}.{ext}")
                xs.append(img)
                ys.append(label)
        out[split] = xs, ys

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = out[split]
        return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)

    return TinyData(root, sorted(classes), *tensors("train"), *tensors(test_split))


def write_archive(tree: Path, archive: Path) -> Path:
    """A ``.tar.gz`` of the tree's contents (``train/...`` at the archive's top, like the shared CIFAR-10)."""
    with tarfile.open(archive, "w:gz") as tar:
        for child in sorted(tree.iterdir()):
            tar.add(child, arcname=child.name)
    return archive


@pytest.fixture
def make_cifar10() -> Callable[..., TinyData]:
    return write_cifar10


@pytest.fixture
def make_image_folder() -> Callable[..., TinyData]:
    return write_image_folder


@pytest.fixture
def tiny_cifar10(tmp_path: Path) -> TinyData:
    """20 train and 10 test images in the CIFAR-10 python-pickle layout; `.path` is the batches folder."""
    return write_cifar10(tmp_path / "cifar")


@pytest.fixture
def tiny_folder(tmp_path: Path) -> TinyData:
    """A PNG ImageFolder tree: 3 classes, 4 train and 2 test 8x8 images each."""
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def tiny_archive(tiny_folder: TinyData, tmp_path: Path) -> TinyData:
    """`tiny_folder` as a ``.tar.gz``; `.path` is the archive."""
    archive = write_archive(tiny_folder.path, tmp_path / "images.tar.gz")
    return TinyData(archive, tiny_folder.classes, tiny_folder.train_x, tiny_folder.train_y, tiny_folder.test_x,
                    tiny_folder.test_y)


@pytest.fixture(scope="session")
def tiny_builtin():
    """A small builtin dataset (300 train, 100 test, 3x32x32, 10 classes), generated once a session."""
    from qcbdefense.data import make_builtin

    return make_builtin(0, n_train=300, n_test=100)


# ---- a backdoor-sized world: the built-in data at 16x16 and a small CNN trained on it ---------------------
# Attack and purifier tests need a trained model and real QCBs; at 16x16 (a quarter of the FLOPs) and 3,000
# training images each costs seconds to a minute on two cores. Session-scoped: built once, shared.

SHAPES16_TRAIN, SHAPES16_TEST = 3000, 1000


@pytest.fixture(scope="session")
def shapes16():
    """The built-in data, first 3,000 train / 1,000 test images, 2x2 average-pooled to 16x16."""
    import torch.nn.functional as F

    from qcbdefense.data import Dataset, load_dataset

    full = load_dataset("builtin")

    def down(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.float(), 2).round().clamp(0, 255).to(torch.uint8)

    train_x = down(full.train_x[:SHAPES16_TRAIN])
    pixels = train_x.float() / 255
    return Dataset("builtin@16", full.classes, train_x, full.train_y[:SHAPES16_TRAIN],
                   down(full.test_x[:SHAPES16_TEST]), full.test_y[:SHAPES16_TEST],
                   tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).tolist()))


@pytest.fixture(scope="session")
def clean_cnn16(shapes16):
    """small_cnn trained 8 epochs on shapes16 (about 89 % CA)."""
    from models import create_model
    from qcbdefense.clean_training import train
    from qcbdefense.training import TrainConfig

    torch.manual_seed(0)
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    train(model, shapes16, TrainConfig(epochs=8, optimizer="adam", lr=3e-3, weight_decay=0.0, augment=False),
          arch="small_cnn")
    return model.eval()


@pytest.fixture(scope="session")
def pq_cnn16(clean_cnn16, shapes16):
    """clean_cnn16 with a PQBackdoor QCB for pqbackdoor-w4a4 (target 0, the default patch): the model and its
    AttackReport."""
    from qcbdefense.attacks import attack
    from qcbdefense.training import TrainConfig

    model, report = attack(clean_cnn16, shapes16, method="pqbackdoor", bits=4, spec="pqbackdoor-w4a4",
                           config=TrainConfig(epochs=3, optimizer="adam", lr=1e-4, weight_decay=0.0,
                                              augment=False),
                           monitor=0, transfer=(), calib=256, victim_calib=512)
    return model.eval(), report
