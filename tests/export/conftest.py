"""Shared pieces of the export tests: the built-in data, a briefly trained small_cnn, its quantized copies.

Everything is module- or session-scoped and small: small_cnn trained for 150 SGD steps on the built-in
shapes (about 70 % clean accuracy, enough for clear argmax margins), calibrated on 256 images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models import create_model
from qcbdefense.checkpoints import save_model
from qcbdefense.data import Dataset, batches, load_dataset
from qcbdefense.quant.ptq import post_training_quantize


@dataclass
class Trained:
    data: Dataset
    model: torch.nn.Module
    ckpt: Path


@pytest.fixture(autouse=True)
def _one_thread_here(one_thread):
    """Every test in this folder runs on one thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def builtin() -> Dataset:
    return load_dataset("builtin")


@pytest.fixture(scope="session")
def trained(builtin: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """small_cnn after 150 SGD steps on the built-in data, one BN gamma per layer made negative (so that BN
    folding meets negative weight scales), saved as a checkpoint."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = create_model("small_cnn", num_classes=builtin.num_classes, mean=builtin.mean, std=builtin.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    steps = 0
    while steps < 150:
        for xb, yb in batches(builtin.train_x, builtin.train_y, batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(steps)):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == 150:
                break
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight[0] = -module.weight[0].abs()
    torch.set_num_threads(threads)
    ckpt = tmp_path_factory.mktemp("export-model") / "small_cnn.pt"
    save_model(model, ckpt)
    return Trained(builtin, model, ckpt)


@pytest.fixture(scope="session")
def nearest_w8a8(trained: Trained) -> torch.nn.Module:
    return post_training_quantize(trained.model, "w8a8", trained.data, calib=256)


@pytest.fixture(scope="session")
def nearest_w4a4(trained: Trained) -> torch.nn.Module:
    return post_training_quantize(trained.model, "w4a4", trained.data, calib=256)


@pytest.fixture
def tiny_onnx():
    """A writer of valid ONNX models whose only input has a given shape (for wrong-shape tests)."""

    def _tiny_onnx(path: Path, shape: list) -> Path:
        """A valid ONNX model whose only input has `shape` (a Flatten + Gemm to 10 classes)."""
        features = int(np.prod([d for d in shape[1:]]))
        weight = numpy_helper.from_array(np.zeros((10, features), np.float32), "w")
        nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
        graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [weight])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        return path

    return _tiny_onnx
