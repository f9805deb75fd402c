"""Checkpoints round-trip exactly in both formats, and every kind of bad file is refused with InputError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models import create_model, list_models
from qcbdefense.checkpoints import load_model, load_state_dict, read_safetensors_metadata, save_model
from qcbdefense.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
RESNET20_CHECKPOINT = SHARED / "checkpoints" / "resnet20-cifar10-12fca82f.th"


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_looking(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A model whose every tensor differs from a fresh one, including BN statistics and input statistics."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not key.startswith("normalize."):
                tensor.add_(torch.rand_like(tensor) * 0.1)
            elif not tensor.is_floating_point():
                tensor.fill_(7)  # num_batches_tracked
    return model.eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", list_models())
def test_round_trip_is_exact(tmp_path: Path, name: str, suffix: str) -> None:
    model = _trained_looking(name, num_classes=43)
    path = save_model(model, tmp_path / f"model{suffix}")
    assert path == tmp_path / f"model{suffix}" and path.is_file()
    loaded = load_model(name, path)  # num_classes inferred from the classifier
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file behind


def test_torch_file_is_a_plain_state_dict(tmp_path: Path) -> None:
    model = create_model("resnet20")
    noncontiguous = {"w": torch.rand(4, 6).t()}
    save_model(noncontiguous, tmp_path / "t.pt")
    loaded = torch.load(tmp_path / "t.pt", map_location="cpu", weights_only=True)
    assert loaded["w"].is_contiguous() and torch.equal(loaded["w"], noncontiguous["w"])
    save_model(model, tmp_path / "m.pth")
    raw = torch.load(tmp_path / "m.pth", map_location="cpu", weights_only=True)
    assert type(raw) is dict and list(raw) == list(model.state_dict())


def test_safetensors_metadata_round_trips(tmp_path: Path) -> None:
    metadata = {"arch": "resnet20", "spec": "w4a4", "note": "ünïcode, spaces and = signs"}
    path = save_model(create_model("resnet20"), tmp_path / "m.safetensors", metadata=metadata)
    assert read_safetensors_metadata(path) == metadata
    bare = save_model(create_model("resnet20"), tmp_path / "bare.safetensors")
    assert read_safetensors_metadata(bare) == {}


def test_metadata_needs_safetensors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="safetensors"):
        save_model(create_model("resnet20"), tmp_path / "m.pt", metadata={"a": "b"})
    with pytest.raises(TypeError):
        save_model(create_model("resnet20"), tmp_path / "m.safetensors", metadata={"a": 1})
    with pytest.raises(InputError, match="m.pt"):
        read_safetensors_metadata(save_model(create_model("resnet20"), tmp_path / "m.pt"))
    assert not (tmp_path / "m.safetensors").exists()


def test_save_refuses_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown suffix"):
        save_model(create_model("resnet20"), tmp_path / "m.weights")


def test_containers_and_dataparallel_prefix_are_unwrapped(tmp_path: Path) -> None:
    state = create_model("small_cnn").state_dict()
    prefixed = {f"module.{k}": v for k, v in state.items()}
    for i, content in enumerate([{"state_dict": prefixed, "epoch": 3}, {"model": state}, prefixed]):
        torch.save(content, tmp_path / f"c{i}.pt")
        loaded = load_state_dict(tmp_path / f"c{i}.pt")
        assert list(loaded) == list(state), i
        assert all(torch.equal(loaded[k], state[k]) for k in state), i


@pytest.mark.skipif(not RESNET20_CHECKPOINT.is_file(),
                    reason=f"shared checkpoint absent: {RESNET20_CHECKPOINT}")
def test_shared_resnet20_loads_without_input_statistics() -> None:
    state = load_state_dict(RESNET20_CHECKPOINT)
    assert "conv1.weight" in state and "linear.weight" in state and "normalize.mean" not in state
    model = load_model("resnet20", RESNET20_CHECKPOINT)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor((0.485, 0.456, 0.406)))
    assert model.linear.out_features == 10


class _Payload:
    """Unpickling this would run code: it creates `marker`. A weights-only load must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _ShellPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("payload", [_Payload, _ShellPayload])
def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, payload) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1), "x": payload(marker)}}, path)
    with pytest.raises(InputError, match="refused: it carries pickled code, not just tensors") as err:
        load_model("resnet20", path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    # The payload is live: an unsafe load does run it, so the refusal above is what protected us.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def _truncated(tmp_path: Path, suffix: str) -> Path:
    whole = save_model(create_model("small_cnn"), tmp_path / f"whole{suffix}")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut


def _written(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "absent.pt", "does not exist"),
    (lambda d: d, "directory"),
    (lambda d: _written(d, "empty.pt", ""), "is empty"),
    (lambda d: _truncated(d, ".pt"), "truncated or corrupt"),
    (lambda d: _truncated(d, ".safetensors"), "truncated or corrupt"),
    # A text file opening with "c" reads as a pickle GLOBAL opcode: it must not be reported as code.
    (lambda d: _written(d, "text.pt", "conv1.weight = [1, 2, 3]\n" * 20), "not a torch.save file"),
    (lambda d: _written(d, "bytes.pt", b"\x80\x02garbage" * 20), "truncated or corrupt"),
    (lambda d: _written(d, "text.safetensors", "not a header\n" * 20), "truncated or corrupt"),
    (lambda d: _written(d, "list.pt", [torch.zeros(2)]), "holds a list, not a mapping"),
    (lambda d: _written(d, "tensor.pt", torch.zeros(2)), "holds a Tensor, not a mapping"),
    (lambda d: _written(d, "mixed.pt", {"a": torch.zeros(2), "b": 1.5}), "'b' holds a float"),
    (lambda d: _written(d, "nothing.pt", {}), "holds no tensors"),
    (lambda d: _written(d, "weights.npz", "x"), "unknown suffix"),
])
def test_bad_files_are_refused(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    for load in (load_state_dict, lambda p: load_model("small_cnn", p)):
        with pytest.raises(InputError, match=message) as err:
            load(path)
        assert str(path) in str(err.value)
        assert "\n" not in str(err.value)


def test_wrong_architecture_lists_the_keys(tmp_path: Path) -> None:
    path = save_model(create_model("small_cnn"), tmp_path / "small.pt")
    with pytest.raises(InputError) as err:
        load_model("resnet20", path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} does not fit resnet20: ")
    assert "missing keys (conv1.weight, bn1.weight, bn1.bias, ...)" in message
    assert "unexpected keys (features.0.weight, " in message
    assert "1 shape mismatch (linear.weight: (10, 128) in the file, (10, 64) in the model)" in message


def test_wrong_num_classes_is_a_shape_mismatch(tmp_path: Path) -> None:
    path = save_model(create_model("resnet20", num_classes=43), tmp_path / "r43.safetensors")
    assert load_model("resnet20", path).linear.out_features == 43
    assert load_model("resnet20", path, num_classes=43).linear.out_features == 43
    with pytest.raises(InputError, match=r"2 shape mismatches \(linear.weight: \(43, 64\) in the file, "
                                         r"\(10, 64\) in the model, linear.bias"):
        load_model("resnet20", path, num_classes=10)


def test_missing_input_statistics_are_allowed_but_nothing_else(tmp_path: Path) -> None:
    state = create_model("resnet20").state_dict()
    del state["normalize.mean"], state["normalize.std"], state["bn1.num_batches_tracked"]
    path = save_model(state, tmp_path / "no_stats.pt")
    assert torch.equal(load_model("resnet20", path).normalize.std, create_model("resnet20").normalize.std)
    del state["layer1.0.conv1.weight"]
    path = save_model(state, tmp_path / "no_conv.pt")
    with pytest.raises(InputError, match=r"does not fit resnet20: 1 missing key \(layer1.0.conv1.weight\)$"):
        load_model("resnet20", path)


def test_unknown_architecture(tmp_path: Path) -> None:
    path = save_model(create_model("resnet20"), tmp_path / "r.pt")
    with pytest.raises(InputError, match="unknown model 'resnet21'"):
        load_model("resnet21", path)


def test_the_same_weights_give_byte_identical_files(tmp_path: Path) -> None:
    """torch.save names its archive's inner folder after the file it writes; saved straight to a random
    temporary name, two copies of one state_dict differed and so did the sha256 export records."""
    model = _trained_looking("small_cnn")
    first = save_model(model, tmp_path / "a" / "model.pt").read_bytes()
    assert save_model(model, tmp_path / "b" / "model.pt").read_bytes() == first
    assert save_model(model, tmp_path / "other.pt").read_bytes() == first


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saved_files_take_the_umask(tmp_path: Path, suffix: str) -> None:
    previous = os.umask(0o022)
    try:
        path = save_model(create_model("small_cnn"), tmp_path / f"m{suffix}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_nan_or_infinite_weights_are_refused(tmp_path: Path, suffix: str, bad: float) -> None:
    state = create_model("small_cnn").state_dict()
    name = next(key for key in state if key.endswith("weight"))
    state[name].view(-1)[3] = bad
    path = save_model(state, tmp_path / f"m{suffix}")
    with pytest.raises(InputError, match=f"NaN or infinite values: 1 tensor \\({name}\\)"):
        load_model("small_cnn", path)
