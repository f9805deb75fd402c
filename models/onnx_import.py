"""An FP `.onnx` classifier as a torch model made of real nn.Conv2d / nn.Linear / nn.BatchNorm2d modules.

A deployment engineer may hold only the ONNX file. The quantizer swaps nn.Conv2d / nn.Linear for Brevitas
layers and the layer-wise reconstruction walks a torch.fx graph, so the file becomes a `torch.fx.GraphModule`
built node by node: every Conv / Gemm becomes a module holding the file's weights, activations become their
torch.nn modules (x * Sigmoid(x) is nn.SiLU, x * HardSigmoid(x) nn.Hardswish), and the remaining arithmetic
(residual and squeeze-excitation products and sums, normalisation constants) becomes operator / torch calls
with literal arguments, so the module re-traces with torch.fx and deep-copies like any other model.

`export.replica` runs quantized graphs op by op for the scanner; it keeps weights as graph constants, which
the quantizer cannot see, hence this converter. Only what FP classifier exports use is converted; any other
operator is refused by name. `import_onnx` checks the result against onnxruntime on random images before
anyone uses it.

Examples:
    >>> model = import_onnx("fp.onnx")                       # doctest: +SKIP
    >>> model(torch.rand(2, 3, 32, 32)).shape                 # doctest: +SKIP
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy
import math
import operator
import re
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from qcbdefense.errors import InputError, first_line

# How far the converted model may be from onnxruntime: the largest logit difference over the logits' spread.
MAX_RELATIVE_ERROR = 1e-3
CHECK_IMAGES = 8
DEFAULT_IMAGE = (3, 32, 32)  # for a file whose input size is dynamic


def import_onnx(path: str | Path, *, check: bool = True) -> OnnxModel:
    """Convert the FP ONNX classifier at `path` into a GraphModule; with `check`, compare it with onnxruntime.

    InputError (one line) for an unreadable file, an operator or attribute that cannot be converted, or a
    model whose logits on random images differ from onnxruntime's (more than MAX_RELATIVE_ERROR of their
    spread, or another arg-max).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX model {path} does not exist")
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # protobuf and onnx raise their own types on a corrupt file
        raise InputError(f"cannot read ONNX model {path}: {first_line(err)}") from None
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear")
           for n in proto.graph.node):
        raise InputError(f"ONNX model {path} is quantized; --model takes the FP model (scan and verify take "
                         f"quantized files)")
    unsupported = sorted({n.op_type for n in proto.graph.node if n.op_type not in _CONVERTERS})
    if unsupported:
        raise InputError(f"ONNX model {path} uses operators that cannot be converted into torch modules: "
                         f"{', '.join(unsupported)}")
    model = _Converter(proto, path).convert()
    if check:
        check_against_onnxruntime(model, path)
    model.qcb_onnx_source = str(path)
    return model


def check_against_onnxruntime(model: nn.Module, path: str | Path, *, seed: int = 0) -> float:
    """The largest |model - onnxruntime| logit difference on random images, relative to the logits' spread;
    InputError when it exceeds MAX_RELATIVE_ERROR or an arg-max differs."""
    from export.ort import OrtModel

    session = OrtModel(path, threads=1)
    shape = tuple(want or default for want, default in zip(session.image_shape, DEFAULT_IMAGE))
    images = torch.rand((CHECK_IMAGES, *shape), generator=torch.Generator().manual_seed(seed))
    expected = session.logits(images)
    with torch.no_grad():
        mine = model.eval()(images).numpy()
    error = float(np.abs(mine - expected).max() / (expected.std() + 1e-12))
    if error > MAX_RELATIVE_ERROR or (mine.argmax(1) != expected.argmax(1)).any():
        raise InputError(f"ONNX model {path} converted into torch computes other logits than onnxruntime "
                         f"(largest difference {error:.2g} of their spread on random images); it cannot be "
                         f"used as --model")
    return error


class OnnxModel(fx.GraphModule):
    """The converted model. A GraphModule's deep copy rebuilds it from its graph and forgets other attributes;
    this one keeps the toolkit's own (`qcb_model_ref`, and `qcb_spec` etc. on a quantized copy), as a deep
    copy of any other module does."""

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        for name, value in self.__dict__.items():
            if name.startswith("qcb_"):
                setattr(copied, name, copy.deepcopy(value, memo))
        return copied


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(values) -> list[int]:
    return [int(v) for v in values]


class _Converter:
    """Builds the fx graph: `values` maps an ONNX tensor name to an fx.Node or (a constant) a torch.Tensor."""

    def __init__(self, proto: onnx.ModelProto, path: Path) -> None:
        self.proto, self.path = proto, path
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.values: dict[str, fx.Node | torch.Tensor] = {}
        self.names: set[str] = set()
        self.uses: dict[str, int] = {}  # how many nodes read each tensor
        for node in proto.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1

    def convert(self) -> OnnxModel:
        graph = self.proto.graph
        for init in graph.initializer:
            self.values[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy())
        inputs = [i.name for i in graph.input if i.name not in self.values]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise InputError(f"ONNX model {self.path} must have one image input and one logits output")
        self.values[inputs[0]] = self.graph.placeholder("pixels")
        for node in graph.node:
            try:
                out = _CONVERTERS[node.op_type](self, node, [self.values[n] if n else None for n in node.input],
                                                _attrs(node))
            except KeyError as err:
                raise InputError(f"ONNX model {self.path}: node {node.name or node.op_type} reads {err}, "
                                 f"which no earlier node computes") from None
            self.values[node.output[0]] = out
        result = self.values[graph.output[0].name]
        if not isinstance(result, fx.Node):
            raise InputError(f"ONNX model {self.path}: its output does not depend on its input")
        self.graph.output(result)
        module = OnnxModel(self.root, self.graph, class_name="OnnxModel")
        module.graph.eliminate_dead_code()  # the Sigmoid / Hardsigmoid fused into SiLU / Hardswish
        module.delete_all_unused_submodules()
        module.recompile()
        return module.eval()

    # ---- building blocks ----

    def refuse(self, node: onnx.NodeProto, why: str) -> InputError:
        return InputError(f"ONNX model {self.path}: cannot convert {node.op_type} node "
                          f"{node.name or node.output[0]!r}: {why}")

    def fresh(self, base: str) -> str:
        name = re.sub(r"\W+", "_", base).strip("_").lower() or "node"
        name = name if not name[0].isdigit() else "n" + name
        unique, i = name, 1
        while unique in self.names:
            unique, i = f"{name}_{i}", i + 1
        self.names.add(unique)
        return unique

    def module(self, node: onnx.NodeProto, module: nn.Module, *args) -> fx.Node:
        name = self.fresh(node.name or node.output[0])
        self.root.add_module(name, module)
        return self.graph.call_module(name, tuple(args))

    def tensor(self, node: onnx.NodeProto, value) -> fx.Node:
        """A node for an operand: itself, or a constant registered as a buffer (it travels in the state_dict)."""
        if isinstance(value, fx.Node):
            return value
        name = self.fresh(f"{node.name or node.output[0]}_const")
        self.root.register_buffer(name, value.float() if value.is_floating_point() else value)
        return self.graph.get_attr(name)

    def constant(self, node: onnx.NodeProto, value, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise self.refuse(node, f"its {what} is computed in the graph, not stored in the file")
        return value

    def is_module(self, value, kind: type) -> bool:
        return isinstance(value, fx.Node) and value.op == "call_module" \
            and isinstance(self.root.get_submodule(value.target), kind)


def _split_pads(pads: list[int]) -> tuple[list[int], list[int] | None]:
    """(padding for the torch module, explicit F.pad list or None) for ONNX begin/end pads."""
    half = len(pads) // 2
    begin, end = pads[:half], pads[half:]
    if begin == end:
        return begin, None
    return [0] * half, [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]


def _check_auto_pad(conv: _Converter, node, attrs) -> None:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", "NOTSET"):
        raise conv.refuse(node, f"auto_pad={auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad} "
                                f"(export with explicit pads)")


def _conv(conv: _Converter, node, args, attrs):
    x, weight = args[0], conv.constant(node, args[1], "weight")
    bias = conv.constant(node, args[2], "bias") if len(args) > 2 and args[2] is not None else None
    if weight.dim() != 4:
        raise conv.refuse(node, f"only 2-D convolutions are converted (weight of {weight.dim()} dims)")
    _check_auto_pad(conv, node, attrs)
    groups = int(attrs.get("group", 1))
    padding, explicit = _split_pads(_ints(attrs.get("pads", [0, 0, 0, 0])))
    layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                      stride=tuple(_ints(attrs.get("strides", [1, 1]))), padding=tuple(padding),
                      dilation=tuple(_ints(attrs.get("dilations", [1, 1]))), groups=groups, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    if explicit is not None:
        x = conv.graph.call_function(F.pad, (conv.tensor(node, x), explicit))
    return conv.module(node, layer, x)


def _linear(conv: _Converter, node, x, weight: torch.Tensor, bias: torch.Tensor | None):
    """nn.Linear computing x @ weight.T + bias."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.reshape(-1).expand(weight.shape[0]))
    return conv.module(node, layer, x)


def _gemm(conv: _Converter, node, args, attrs):
    if attrs.get("transA", 0):
        raise conv.refuse(node, "transA=1 (the image batch must be the first operand)")
    weight = conv.constant(node, args[1], "weight").float()
    weight = weight if attrs.get("transB", 0) else weight.t()
    weight = weight * float(attrs.get("alpha", 1.0))
    bias = args[2] if len(args) > 2 else None
    if bias is not None:
        bias = conv.constant(node, bias, "bias").float() * float(attrs.get("beta", 1.0))
        if bias.numel() not in (1, weight.shape[0]):
            raise conv.refuse(node, f"a bias of shape {list(bias.shape)} is not one value per output")
    return _linear(conv, node, args[0], weight, bias)


def _matmul(conv: _Converter, node, args, attrs):
    weight = conv.constant(node, args[1], "second operand").float()
    if weight.dim() != 2:
        raise conv.refuse(node, "only a product with a stored 2-D matrix is converted")
    return _linear(conv, node, args[0], weight.t(), None)


def _batchnorm(conv: _Converter, node, args, attrs):
    scale, bias, mean, var = (conv.constant(node, a, what).float() for a, what in
                              zip(args[1:5], ("scale", "bias", "mean", "variance")))
    layer = nn.BatchNorm2d(scale.numel(), eps=float(attrs.get("epsilon", 1e-5)))
    with torch.no_grad():
        layer.weight.copy_(scale)
        layer.bias.copy_(bias)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    return conv.module(node, layer.eval(), args[0])


def _pool(kind: type):
    def run(conv: _Converter, node, args, attrs):
        _check_auto_pad(conv, node, attrs)
        kernel = _ints(attrs["kernel_shape"])
        if len(kernel) != 2 or _ints(attrs.get("dilations", [1, 1])) != [1, 1]:
            raise conv.refuse(node, "only 2-D pooling without dilation is converted")
        padding, explicit = _split_pads(_ints(attrs.get("pads", [0, 0, 0, 0])))
        if explicit is not None:
            raise conv.refuse(node, "asymmetric padding")
        options = dict(kernel_size=tuple(kernel), stride=tuple(_ints(attrs.get("strides", kernel))),
                       padding=tuple(padding), ceil_mode=bool(attrs.get("ceil_mode", 0)))
        if kind is nn.AvgPool2d:
            options["count_include_pad"] = bool(attrs.get("count_include_pad", 0))
        return conv.module(node, kind(**options), args[0])
    return run


def _activation(make: Callable[[dict], nn.Module]):
    return lambda conv, node, args, attrs: conv.module(node, make(attrs), args[0])


def _hard_sigmoid(conv: _Converter, node, args, attrs):
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    if not (math.isclose(alpha, 1 / 6, rel_tol=1e-5) and math.isclose(beta, 0.5, rel_tol=1e-5)):
        raise conv.refuse(node, f"alpha={alpha:g}, beta={beta:g}; only torch's Hardsigmoid (1/6, 0.5) is converted")
    return conv.module(node, nn.Hardsigmoid(), args[0])


def _clip(conv: _Converter, node, args, attrs):
    bounds = [attrs.get("min"), attrs.get("max")]  # opset < 11: attributes; later: optional inputs
    for i, value in enumerate(args[1:3]):
        if value is not None:
            bounds[i] = float(conv.constant(node, value, "bound"))
    low, high = bounds
    if low == 0.0 and high == 6.0:
        return conv.module(node, nn.ReLU6(), args[0])
    if low == 0.0 and high is None:
        return conv.module(node, nn.ReLU(), args[0])
    if low is None or high is None:
        return conv.graph.call_function(torch.clamp, (conv.tensor(node, args[0]),), {"min": low, "max": high})
    return conv.module(node, nn.Hardtanh(low, high), args[0])


def _mul(conv: _Converter, node, args, attrs):
    """x * Sigmoid(x) is nn.SiLU and x * Hardsigmoid(x) nn.Hardswish (torch exports both that way); any other
    product (a squeeze-excitation gate, a constant) stays a product."""
    a, b = args
    for x, gate, gate_name in ((a, b, node.input[1]), (b, a, node.input[0])):
        if isinstance(gate, fx.Node) and gate.args and gate.args[0] is x and conv.uses[gate_name] == 1:
            for kind, fused in ((nn.Sigmoid, nn.SiLU), (nn.Hardsigmoid, nn.Hardswish)):
                if conv.is_module(gate, kind):
                    return conv.module(node, fused(), x)
    return _binary(operator.mul)(conv, node, args, attrs)


def _binary(op: Callable):
    def run(conv: _Converter, node, args, attrs):
        a, b = args
        if not isinstance(a, fx.Node) and not isinstance(b, fx.Node):
            return op(a, b)
        return conv.graph.call_function(op, (conv.tensor(node, a), conv.tensor(node, b)))
    return run


def _flatten(conv: _Converter, node, args, attrs):
    axis = int(attrs.get("axis", 1))
    if axis != 1:
        raise conv.refuse(node, f"axis={axis} (only a flatten after the batch axis is converted)")
    return conv.module(node, nn.Flatten(), args[0])


def _reshape(conv: _Converter, node, args, attrs):
    shape = _ints(conv.constant(node, args[1], "target shape").tolist())
    if len(shape) != 2 or shape[0] not in (0, -1) or shape[1] in (0,):
        raise conv.refuse(node, f"shape {shape}: only a flatten to [batch, features] is converted")
    return conv.graph.call_function(torch.flatten, (conv.tensor(node, args[0]), 1)) if shape[1] == -1 else \
        conv.graph.call_method("reshape", (conv.tensor(node, args[0]), -1, shape[1]))


def _reduce_mean(conv: _Converter, node, args, attrs):
    axes = attrs.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:  # opset 18: axes is an input
        axes = conv.constant(node, args[1], "axes").tolist()
    if axes is None:
        raise conv.refuse(node, "a mean over every axis")
    return conv.graph.call_function(torch.mean, (conv.tensor(node, args[0]), tuple(_ints(axes))),
                                    {"keepdim": bool(attrs.get("keepdims", 1))})


def _softmax(conv: _Converter, node, args, attrs):
    return conv.module(node, nn.Softmax(dim=int(attrs.get("axis", -1))), args[0])


def _concat(conv: _Converter, node, args, attrs):
    return conv.graph.call_function(torch.cat, ([conv.tensor(node, a) for a in args],),
                                    {"dim": int(attrs["axis"])})


def _pad(conv: _Converter, node, args, attrs):
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = _ints(attrs["pads"] if "pads" in attrs else conv.constant(node, args[1], "pads").tolist())
    value = float(conv.constant(node, args[2], "value")) if len(args) > 2 and args[2] is not None else 0.0
    half = len(pads) // 2
    torch_pads = [p for b, e in zip(reversed(pads[:half]), reversed(pads[half:])) for p in (b, e)]
    while len(torch_pads) > 4 and torch_pads[-1] == 0 and torch_pads[-2] == 0:  # batch / channel unpadded
        torch_pads = torch_pads[:-2]
    options = {"mode": mode, "value": value} if mode == "constant" else {"mode": mode}
    return conv.graph.call_function(F.pad, (conv.tensor(node, args[0]), torch_pads), options)


def _constant(conv: _Converter, node, args, attrs):
    if "value" not in attrs:
        raise conv.refuse(node, "only a tensor 'value' is converted")
    return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())


_CONVERTERS: dict[str, Callable] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "BatchNormalization": _batchnorm,
    "MaxPool": _pool(nn.MaxPool2d), "AveragePool": _pool(nn.AvgPool2d),
    "GlobalAveragePool": _activation(lambda a: nn.AdaptiveAvgPool2d(1)),
    "Relu": _activation(lambda a: nn.ReLU()), "Sigmoid": _activation(lambda a: nn.Sigmoid()),
    "Tanh": _activation(lambda a: nn.Tanh()), "HardSwish": _activation(lambda a: nn.Hardswish()),
    "LeakyRelu": _activation(lambda a: nn.LeakyReLU(float(a.get("alpha", 0.01)))),
    "Elu": _activation(lambda a: nn.ELU(float(a.get("alpha", 1.0)))),
    "Erf": lambda conv, node, args, attrs: conv.graph.call_function(torch.erf, (conv.tensor(node, args[0]),)),
    "HardSigmoid": _hard_sigmoid, "Clip": _clip,
    "Add": _binary(operator.add), "Sub": _binary(operator.sub), "Mul": _mul, "Div": _binary(operator.truediv),
    "Flatten": _flatten, "Reshape": _reshape, "ReduceMean": _reduce_mean, "Softmax": _softmax,
    "Concat": _concat, "Pad": _pad, "Constant": _constant,
    "Identity": lambda conv, node, args, attrs: args[0], "Dropout": lambda conv, node, args, attrs: args[0],
}
