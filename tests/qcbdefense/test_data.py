"""Datasets by spec (builtin, cifar10 pickles, ImageFolder trees and archives), the cache, augment and batches."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from qcbdefense import data as data_mod
from qcbdefense.data import Dataset, augment, batches, load_dataset, make_builtin, to_float
from qcbdefense.errors import InputError
from qcbdefense.triggers import PatchTrigger


def assert_same(a: Dataset, b) -> None:
    assert a.classes == b.classes
    for split in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, split), getattr(b, split)), split


def assert_types(d: Dataset, shape: tuple[int, int, int]) -> None:
    assert d.train_x.dtype == d.test_x.dtype == torch.uint8
    assert d.train_y.dtype == d.test_y.dtype == torch.int64
    assert d.train_x.shape[1:] == d.test_x.shape[1:] == shape
    assert len(d.train_x) == len(d.train_y) and len(d.test_x) == len(d.test_y)
    assert 0 <= int(d.train_y.min()) and int(d.train_y.max()) < d.num_classes


# ------------------------------------------------------------------------------------------------ builtin


@pytest.fixture(scope="module")
def builtin_pair(tmp_path_factory) -> tuple[Dataset, Dataset, Path]:
    """The full builtin dataset generated into a fresh cache, then loaded again from that cache."""
    cache = tmp_path_factory.mktemp("builtin-cache")
    return load_dataset("builtin", cache_dir=cache), load_dataset("builtin", cache_dir=cache), cache


def test_builtin_shapes_classes_and_stats(builtin_pair):
    d, _, _ = builtin_pair
    assert_types(d, (3, 32, 32))
    assert d.name == "builtin" and d.num_classes == 10 and d.classes == data_mod.BUILTIN_CLASSES
    assert (len(d.train_y), len(d.test_y)) == (10_000, 2_000)
    assert d.train_y.bincount(minlength=10).min() > 850                          # about balanced
    x = to_float(d.train_x)
    assert d.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()), abs=1e-5)
    assert d.std == pytest.approx(tuple(x.std(dim=(0, 2, 3), unbiased=False).tolist()), abs=1e-5)


def test_builtin_has_no_natural_white_corner_patch(builtin_pair):
    d, _, _ = builtin_pair
    corner = to_float(torch.cat([d.train_x, d.test_x])[:, :, 27:31, 27:31])
    assert corner.amin(dim=(1, 2, 3)).max() < 0.8


def test_builtin_cache_hit_returns_equal_tensors(builtin_pair, monkeypatch):
    first, second, cache = builtin_pair
    assert_same(first, second)
    assert (first.mean, first.std) == (second.mean, second.std)
    monkeypatch.setattr(data_mod, "make_builtin", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    assert_same(load_dataset("builtin:0", cache_dir=cache), first)


def test_builtin_is_deterministic_per_seed():
    a, b = make_builtin(3, n_train=50, n_test=20), make_builtin(3, n_train=50, n_test=20)
    assert_same(a, b)
    c = make_builtin(4, n_train=50, n_test=20)
    assert not torch.equal(a.train_x, c.train_x)


def test_builtin_seed_spec_and_name(cache_dir, monkeypatch):
    monkeypatch.setattr(data_mod, "make_builtin", lambda seed: make_builtin(seed, n_train=30, n_test=10))
    d = load_dataset("builtin:7", cache_dir=cache_dir)
    assert d.name == "builtin:7"
    assert_same(d, make_builtin(7, n_train=30, n_test=10))


def test_builtin_with_more_classes_has_each_shape_in_bands_of_hue():
    d = make_builtin(0, n_train=240, n_test=48, classes=24)
    assert d.num_classes == 24 and d.classes[11] == "ring-1" and d.classes[23] == "diamond-2"
    assert set(d.train_y.tolist()) == set(range(24))
    assert torch.equal(make_builtin(3, n_train=50, n_test=20, classes=10).train_x,
                       make_builtin(3, n_train=50, n_test=20).train_x)  # ten classes: the same images as before


@pytest.mark.parametrize("spec", ["builtin:x", "builtin:1.5", "builtin:", "builtin:-1"])
def test_builtin_bad_seed(spec, cache_dir):
    with pytest.raises(InputError, match="seed"):
        load_dataset(spec, cache_dir=cache_dir)


def test_describe_is_json_able(tiny_builtin):
    info = json.loads(json.dumps(tiny_builtin.describe()))
    assert info["name"] == "builtin" and info["num_classes"] == 10 and info["image_shape"] == [3, 32, 32]
    assert (info["train_size"], info["test_size"]) == (300, 100)
    assert info["mean"] == list(tiny_builtin.mean) and len(info["std"]) == 3


@pytest.mark.slow
def test_builtin_is_learnable_but_not_perfectly():
    """The property the attack and defence demos rely on: small_cnn reaches 85-95 %, never 100 %."""
    import models

    torch.manual_seed(0)
    d = load_dataset("builtin")
    model = models.create_model("small_cnn", num_classes=10, mean=d.mean, std=d.std)
    epochs, gen = 4, torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(d.train_y) / 128))
    for _ in range(epochs):
        model.train()
        for xb, yb in batches(d.train_x, d.train_y, batch_size=128, shuffle=True, generator=gen, augment=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in batches(d.test_x, d.test_y,
                                                                                      batch_size=500))
    assert 85.0 <= 100.0 * correct / len(d.test_y) <= 95.0


# ------------------------------------------------------------------------------------------------ cifar10


@pytest.mark.parametrize("form", ["batches-folder", "parent"])
def test_cifar10_both_path_forms(tiny_cifar10, cache_dir, form):
    path = tiny_cifar10.path if form == "batches-folder" else tiny_cifar10.path.parent
    d = load_dataset(f"cifar10:{path}", cache_dir=cache_dir)
    assert_types(d, (3, 32, 32))
    assert_same(d, tiny_cifar10)
    assert d.name == f"cifar10:{path}" and d.num_classes == 10 and d.classes[0] == "airplane"


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar10_pickled_by_python3(make_cifar10, tmp_path, cache_dir, protocol):
    tiny = make_cifar10(tmp_path, protocol=protocol)
    assert_same(load_dataset(f"cifar10:{tiny.path}", cache_dir=cache_dir), tiny)


class _Evil:
    """Unpickling this runs `command` in a shell: the classic malicious pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvilEval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("where", ["whole-file", "inside-the-dict", "eval"])
def test_cifar10_malicious_pickle_is_refused_and_not_run(tiny_cifar10, tmp_path, cache_dir, where):
    sentinel = tmp_path / "pwned"
    payload = {
        "whole-file": _Evil(f"touch {sentinel}"),
        "inside-the-dict": {b"data": np.zeros((4, 3072), np.uint8), b"labels": _Evil(f"touch {sentinel}")},
        "eval": _EvilEval(f"open({str(sentinel)!r}, 'w')"),
    }[where]
    (tiny_cifar10.path / "data_batch_3").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(InputError, match="data_batch_3.*refusing"):
        load_dataset(f"cifar10:{tiny_cifar10.path}", cache_dir=cache_dir)
    assert not sentinel.exists()


def test_cifar10_only_latin1_codec_is_allowed(tiny_cifar10, cache_dir):
    # Protocol 2 spells bytes as _codecs.encode(text, "latin1"); any other codec is refused.
    evil = pickle.dumps({b"data": b"x"}, protocol=2).replace(b"latin1", b"rot_13")
    (tiny_cifar10.path / "test_batch").write_bytes(evil)
    with pytest.raises(InputError, match="refusing"):
        load_dataset(f"cifar10:{tiny_cifar10.path}", cache_dir=cache_dir)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-dict", "wrong-shape", "no-labels"])
def test_cifar10_corrupt_file(tiny_cifar10, cache_dir, damage):
    target = tiny_cifar10.path / "data_batch_2"
    raw = target.read_bytes()
    target.write_bytes({
        "truncated": raw[: len(raw) // 2],
        "garbage": b"\x00not a pickle at all" * 10,
        "empty": b"",
        "not-a-dict": pickle.dumps([1, 2, 3], protocol=2),
        "wrong-shape": pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, protocol=2),
        "no-labels": pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}, protocol=2),
    }[damage])
    with pytest.raises(InputError, match="data_batch_2"):
        load_dataset(f"cifar10:{tiny_cifar10.path}", cache_dir=cache_dir)


def test_cifar10_missing_batch(tiny_cifar10, cache_dir):
    (tiny_cifar10.path / "test_batch").unlink()
    with pytest.raises(InputError, match="missing test_batch"):
        load_dataset(f"cifar10:{tiny_cifar10.path}", cache_dir=cache_dir)


def test_cifar10_label_out_of_range(tiny_cifar10, cache_dir):
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    (tiny_cifar10.path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(InputError, match="labels must be in 0..9"):
        load_dataset(f"cifar10:{tiny_cifar10.path}", cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------------ folder


def test_folder_png_tree_exact(tiny_folder, cache_dir):
    d = load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir)
    assert_types(d, (3, 8, 8))
    assert_same(d, tiny_folder)
    assert d.classes == ["cat", "dog", "frog"] and d.name == f"folder:{tiny_folder.path}"


def test_folder_decodes_in_a_process_pool(tiny_folder, cache_dir, monkeypatch):
    monkeypatch.setattr(data_mod, "POOL_MIN_IMAGES", 1)
    assert_same(load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir), tiny_folder)
    (tiny_folder.path / "train" / "dog" / "0002.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image .*0002.png"):
        load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir)


def test_folder_jpeg_tree_with_val_split(make_image_folder, tmp_path, cache_dir):
    tiny = make_image_folder(tmp_path / "jpg", ext="jpg", test_split="val", size=(6, 10))
    d = load_dataset(f"folder:{tiny.path}", cache_dir=cache_dir)
    assert_types(d, (3, 6, 10))
    assert torch.equal(d.train_y, tiny.train_y) and torch.equal(d.test_y, tiny.test_y)
    # JPEG is lossy: compare with Pillow's decoding of the same files, in the loader's order.
    from PIL import Image

    files = sorted((tiny.path / "val").glob("*/*.jpg"))
    decoded = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])
    assert torch.equal(d.test_x, torch.from_numpy(decoded))


def test_folder_archive_extracts_once_and_matches_tree(tiny_archive, cache_dir):
    d = load_dataset(f"folder:{tiny_archive.path}", cache_dir=cache_dir)
    assert_same(d, tiny_archive)
    for npz in cache_dir.glob("*.npz"):                                          # drop the decoded cache only
        npz.unlink()
    assert_same(load_dataset(f"folder:{tiny_archive.path}", cache_dir=cache_dir), tiny_archive)
    assert len(list((cache_dir / "extracted").iterdir())) == 1


def test_folder_archive_with_a_top_folder(tiny_folder, tmp_path, cache_dir):
    archive = tmp_path / "wrapped.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_folder.path, arcname="cifar-jpg")
    assert_same(load_dataset(f"folder:{archive}", cache_dir=cache_dir), tiny_folder)


def test_folder_archive_escaping_its_folder_is_refused(tmp_path, cache_dir):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(InputError, match="cannot extract"):
        load_dataset(f"folder:{archive}", cache_dir=cache_dir)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_folder_corrupt_archive(tmp_path, cache_dir):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08 definitely not gzip")
    with pytest.raises(InputError, match="cannot extract dataset archive"):
        load_dataset(f"folder:{archive}", cache_dir=cache_dir)


def test_folder_cache_hit_and_invalidation(tiny_folder, cache_dir, monkeypatch):
    first = load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir)
    build = data_mod._build_folder
    monkeypatch.setattr(data_mod, "_build_folder", lambda *a: pytest.fail("decoded again despite the cache"))
    second = load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir)
    assert_same(second, first)
    assert (second.mean, second.std) == (first.mean, first.std)
    # A new image changes the key: the tree is decoded again.
    shutil.copy(tiny_folder.path / "train" / "cat" / "0000.png", tiny_folder.path / "train" / "cat" / "0099.png")
    monkeypatch.setattr(data_mod, "_build_folder", build)
    assert len(load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir).train_y) == len(first.train_y) + 1


def test_folder_unreadable_cache_is_rebuilt(tiny_folder, cache_dir):
    first = load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir)
    (npz,) = cache_dir.glob("*.npz")
    npz.write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        assert_same(load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir), first)


def test_folder_mixed_sizes_are_resized_to_the_most_common(tiny_folder, cache_dir):
    from PIL import Image

    Image.new("RGB", (5, 7), (10, 20, 30)).save(tiny_folder.path / "test" / "dog" / "0000.png")
    with pytest.warns(UserWarning, match="resizing all to 8x8"):
        d = load_dataset(f"folder:{tiny_folder.path}", cache_dir=cache_dir)
    assert_types(d, (3, 8, 8))


def test_default_cache_dir_follows_the_environment(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QCBDEFENSE_CACHE", str(tmp_path / "env-cache"))
    load_dataset(f"folder:{tiny_folder.path}")
    assert list((tmp_path / "env-cache").glob("folder-*.npz"))


def _break(kind: str, tiny, tmp_path: Path) -> Path:
    """Damage a copy of the tiny tree in one way; return the folder to load."""
    root = tiny.path
    if kind == "no-class-folders":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif kind == "no-images":
        for f in (root / "train").rglob("*.png"):
            f.rename(f.with_suffix(".txt"))
    elif kind == "no-train":
        shutil.rmtree(root / "train")
    elif kind == "no-test":
        shutil.rmtree(root / "test")
    elif kind == "unreadable-image":
        (root / "test" / "frog" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif kind == "test-class-not-in-train":
        shutil.copytree(root / "test" / "dog", root / "test" / "zebra")
    elif kind == "empty-class-folder":
        shutil.rmtree(root / "train" / "dog")
        (root / "train" / "dog").mkdir()
    elif kind == "empty-folder":
        root = tmp_path / "empty"
        root.mkdir()
    return root


@pytest.mark.parametrize("kind, message", [
    ("no-class-folders", "split 'train' has no class folders"),
    ("no-images", "split 'train' has no images"),
    ("no-train", "no 'train' split"),
    ("no-test", "no 'test' \\(or 'val'\\) split"),
    ("unreadable-image", "cannot read image .*0001.png"),
    ("test-class-not-in-train", "test classes \\['zebra'\\]"),
    ("empty-folder", "no 'train' split"),
    ("empty-class-folder", "class folder\\(s\\) dog in split 'train' hold no images"),
])
def test_folder_bad_trees(tiny_folder, tmp_path, cache_dir, kind, message):
    root = _break(kind, tiny_folder, tmp_path)
    with pytest.raises(InputError, match=message):
        load_dataset(f"folder:{root}", cache_dir=cache_dir)


@pytest.mark.parametrize("spec, message", [
    ("foo:bar", "unknown dataset kind 'foo'"),
    ("cifar100", "unknown dataset kind 'cifar100'"),
    ("", "non-empty"),
    ("folder", "needs a path"),
    ("cifar10:", "needs a path"),
    ("folder:/no/such/dir", "'/no/such/dir' does not exist"),
    ("cifar10:/no/such/dir", "'/no/such/dir' does not exist"),
])
def test_bad_specs(spec, message, cache_dir):
    with pytest.raises(InputError, match=message):
        load_dataset(spec, cache_dir=cache_dir)


def test_folder_spec_on_a_plain_file(tmp_path, cache_dir):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="neither a folder nor"):
        load_dataset(f"folder:{tmp_path / 'notes.txt'}", cache_dir=cache_dir)


def test_cifar10_spec_on_an_image_folder(tiny_folder, cache_dir):
    with pytest.raises(InputError, match="not a CIFAR-10 python folder"):
        load_dataset(f"cifar10:{tiny_folder.path}", cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------------ tensors


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([0.0, 0.2, 1.0])) and to_float(x).dtype == torch.float32
    with pytest.raises(TypeError):
        to_float(x.float())


def _candidates(img: torch.Tensor) -> list[torch.Tensor]:
    """Every crop of the 4-pixel zero-padded image, flipped or not: what augment may return."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    crops = [padded[:, r:r + h, c:c + w] for r in range(9) for c in range(9)]
    return crops + [c.flip(-1) for c in crops]


def test_augment_shifts_and_flips_per_sample():
    x = torch.rand(64, 3, 12, 12) + 0.1                        # no zeros: padding is recognisable
    out = augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    chosen = []
    for img, aug in zip(x, out):
        matches = [i for i, c in enumerate(_candidates(img)) if torch.equal(c, aug)]
        assert len(matches) == 1
        chosen.append(matches[0])
    assert any(i >= 81 for i in chosen) and any(i < 81 for i in chosen)       # some flipped, some not
    assert len({i % 81 for i in chosen}) > 10                                  # many different shifts
    assert not torch.equal(x, augment(x, generator=torch.Generator().manual_seed(1)))


def test_augment_is_deterministic_for_a_generator_and_keeps_the_input():
    x = torch.rand(16, 3, 8, 8)
    before = x.clone()
    a = augment(x, generator=torch.Generator().manual_seed(5))
    b = augment(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(x, before)


def test_batches_cover_every_sample_once():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    y = torch.arange(10)
    out = list(batches(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(yb) for _, yb in out] == [4, 4, 2]
    labels = torch.cat([yb for _, yb in out])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
    images = torch.cat([xb for xb, _ in out])
    assert images.dtype == torch.float32 and torch.allclose(images[:, 0, 0, 0] * 255, labels.float())
    plain = torch.cat([yb for _, yb in batches(x, y, batch_size=3)])
    assert plain.tolist() == list(range(10))


def test_batches_shuffle_is_reproducible_with_a_generator():
    x, y = torch.zeros(50, 3, 2, 2, dtype=torch.uint8), torch.arange(50)

    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([yb for _, yb in batches(x, y, batch_size=8, shuffle=True, generator=gen)]).tolist()

    assert order(1) == order(1) and order(1) != order(2)


def test_batches_apply_transform_before_augment():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(6, dtype=torch.long)
    seen = []
    trigger = PatchTrigger()

    def transform(xb):
        seen.append(xb)
        return trigger.apply(xb)

    (xb, _), = batches(x, y, batch_size=6, augment=True, transform=transform,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen[0], to_float(x))                   # the transform saw un-augmented pixels
    expected = augment(trigger.apply(to_float(x)), generator=torch.Generator().manual_seed(3))
    assert torch.equal(xb, expected)


def test_batches_bad_batch_size():
    with pytest.raises(InputError, match="batch size"):
        next(batches(torch.zeros(2, 3, 2, 2), torch.zeros(2), batch_size=0))
