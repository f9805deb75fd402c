"""A differentiable PyTorch replica of an ONNX image classifier, for the scanner's trigger search.

The scanner must work from two ONNX files alone (the FP model and the int8/int4 model that ships), and its
trigger search needs gradients through both. onnxruntime has no backward pass, and the ONNX-to-PyTorch
converters we know of do not run QuantizeLinear / DequantizeLinear, so this module interprets the graph node
by node with torch ops. Rounding in QuantizeLinear is straight-through (the gradient of the identity), the
clamp to the integer range is not, so a saturated activation passes no gradient: exactly the fake-quant
training semantics the attacks use. `OnnxReplica.check_against_ort` measures that the replica computes what
onnxruntime computes before the scanner trusts it.

Only the operators that classifiers exported by torch and Brevitas use are supported; any other raises an
InputError naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from qcbdefense.errors import InputError

# ONNX TensorProto data types that can appear in Cast / ConstantOfShape of classifier graphs.
_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
           2: torch.uint8, 3: torch.int8}
# The integer range of QuantizeLinear's output, from its zero point's data type.
_QRANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _along(param: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A per-axis scale / zero point shaped to broadcast against a tensor of `ndim` dimensions."""
    if param.dim() == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return param.reshape(shape)


def _quantize(x, scale, zero_point=None, *, axis=1):
    zp = torch.zeros((), dtype=torch.uint8) if zero_point is None else zero_point
    low, high = _QRANGE.get(zp.dtype, (None, None))
    if low is None:
        raise InputError(f"QuantizeLinear with a {zp.dtype} zero point is not supported")
    s, z = _along(scale.float(), axis, x.dim()), _along(zp.float(), axis, x.dim())
    return torch.clamp(_ste_round(x / s) + z, low, high)


def _dequantize(q, scale, zero_point=None, *, axis=1):
    q = q.float()
    z = 0.0 if zero_point is None else _along(zero_point.float(), axis, q.dim())
    return (q - z) * _along(scale.float(), axis, q.dim())


def _pairs(pads: list[int]) -> tuple[list[int], list[int]]:
    half = len(pads) // 2
    return pads[:half], pads[half:]


def _conv(x, w, b=None, *, pads=None, strides=None, dilations=None, group=1, auto_pad="NOTSET", **_):
    if auto_pad not in ("NOTSET", b"NOTSET"):
        raise InputError(f"Conv with auto_pad={auto_pad!r} is not supported")
    spatial = w.dim() - 2
    begin, end = _pairs(pads or [0] * (2 * spatial))
    if begin != end:  # asymmetric padding: pad explicitly (F.pad lists the last dimension first)
        x = F.pad(x, [p for b_, e_ in zip(reversed(begin), reversed(end)) for p in (b_, e_)])
        begin = [0] * spatial
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w.float(), None if b is None else b.float(), stride=strides or 1, padding=begin,
                dilation=dilations or 1, groups=group)


def _pool(kind: str):
    def run(x, *, kernel_shape, pads=None, strides=None, ceil_mode=0, count_include_pad=0, **_):
        begin, end = _pairs(pads or [0] * (2 * len(kernel_shape)))
        if begin != end:
            raise InputError(f"{kind} with asymmetric padding is not supported")
        if kind == "MaxPool":
            return F.max_pool2d(x, kernel_shape, strides or kernel_shape, begin, ceil_mode=bool(ceil_mode))
        return F.avg_pool2d(x, kernel_shape, strides or kernel_shape, begin, ceil_mode=bool(ceil_mode),
                            count_include_pad=bool(count_include_pad))
    return run


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    a, b = (a.t() if transA else a), (b.t() if transB else b)
    y = alpha * (a @ b.float())
    return y if c is None else y + beta * c.float()


def _reshape(x, shape, **_):
    shape = [int(s) if int(s) != 0 else x.shape[i] for i, s in enumerate(shape.tolist())]
    return x.reshape(shape)


def _slice(x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes.tolist()
    steps = [1] * len(starts) if steps is None else steps.tolist()
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes, steps):
        # Python's slice semantics clamp out-of-range bounds exactly as ONNX Slice does (INT64 sentinels too)
        kept = range(*slice(start, end, step).indices(x.shape[axis]))
        x = torch.index_select(x, axis, torch.tensor(list(kept), dtype=torch.int64))
    return x


def _pad(x, pads, value=None, *, mode="constant"):
    mode = mode.decode() if isinstance(mode, bytes) else mode
    begin, end = _pairs(pads.tolist())
    torch_pads = [p for b_, e_ in zip(reversed(begin), reversed(end)) for p in (b_, e_)]
    fill = 0.0 if value is None else float(value)
    return F.pad(x, torch_pads, mode=mode, value=fill) if mode == "constant" else F.pad(x, torch_pads, mode=mode)


def _batchnorm(x, scale, bias, mean, var, *, epsilon=1e-5, **_):
    return F.batch_norm(x, mean.float(), var.float(), scale.float(), bias.float(), False, 0.0, epsilon)


def _constant_of_shape(shape, value=None):
    fill = torch.zeros(1) if value is None else torch.from_numpy(numpy_helper.to_array(value).copy()).reshape(-1)
    return fill[:1].expand(shape.tolist()).clone() if shape.numel() else fill[0].clone()


def _unsqueeze(x, axes):
    for axis in sorted(a % (x.dim() + len(axes)) for a in axes.tolist()):
        x = x.unsqueeze(axis)
    return x


_OPS: dict[str, Callable] = {
    "Identity": lambda x: x,
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": lambda a, b: a / b if a.is_floating_point()
    else torch.div(a, b, rounding_mode="floor"),
    "Relu": F.relu,
    "Clip": lambda x, low=None, high=None: torch.clamp(x, low, high),
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "MaxPool": _pool("MaxPool"), "AveragePool": _pool("AveragePool"),
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Flatten": lambda x, axis=1: x.reshape(int(np.prod(x.shape[:axis])), -1),
    "Gemm": _gemm, "MatMul": lambda a, b: a @ b.float(),
    "Reshape": _reshape, "Slice": _slice, "Pad": _pad,
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "Transpose": lambda x, perm=None: x.permute(*(perm or reversed(range(x.dim())))),
    "Cast": lambda x, to: x.to(_DTYPES[to]),
    "ConstantOfShape": _constant_of_shape,
    "Shape": lambda x: torch.tensor(x.shape, dtype=torch.int64),
    "Gather": lambda x, i, axis=0: torch.index_select(x, axis, i.reshape(-1)).reshape(
        x.shape[:axis] + i.shape + x.shape[axis + 1:]),
    "Unsqueeze": _unsqueeze,
    "Squeeze": lambda x, axes=None: x.squeeze() if axes is None else x.squeeze(tuple(axes.tolist())),
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}


class OnnxReplica(nn.Module):
    """Runs an ONNX classifier with torch ops, differentiably; `taps` names tensors to return as well.

    `replica(x)` returns the logits; `replica(x, taps=True)` returns (logits, {tap name: tensor}).
    """

    def __init__(self, path: str | Path, *, taps: list[str] | None = None) -> None:
        super().__init__()
        try:
            proto = onnx.load(str(path))
        except Exception as err:  # the ONNX file is untrusted input
            raise InputError(f"cannot read ONNX model {path}: {str(err).splitlines()[0][:160]}") from None
        graph = proto.graph
        unsupported = sorted({n.op_type for n in graph.node if n.op_type not in _OPS and n.op_type != "Constant"})
        if unsupported:
            raise InputError(f"ONNX model {path} uses operators the scanner cannot differentiate through: "
                             f"{', '.join(unsupported)}")
        self.path = Path(path)
        self.nodes = list(graph.node)
        self.constants: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            self.constants[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy())
        for node in self.nodes:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = torch.from_numpy(
                    numpy_helper.to_array(_attrs(node)["value"]).copy())
        inputs = [i.name for i in graph.input if i.name not in self.constants]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise InputError(f"ONNX model {path} must have one image input and one logits output")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self.taps = list(taps or [])
        self.relu_outputs = activation_taps(proto)

    def _apply(self, fn, recurse=True):  # .to(device) moves the graph's constants, kept outside the buffers
        self.constants = {name: fn(value) for name, value in self.constants.items()}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, taps: bool = False):
        values = dict(self.constants)
        values[self.input_name] = x
        for node in self.nodes:
            if node.op_type == "Constant":
                continue
            args = [values[name] if name else None for name in node.input]
            while args and args[-1] is None:
                args.pop()
            out = _OPS[node.op_type](*args, **_attrs(node))
            values[node.output[0]] = out
        logits = values[self.output_name]
        return (logits, {name: values[name] for name in self.taps}) if taps else logits

    def check_against_ort(self, images: torch.Tensor, ort_logits: np.ndarray) -> float:
        """The largest |replica - onnxruntime| logit difference on `images`, relative to the logits' spread."""
        with torch.no_grad():
            mine = self(images).numpy()
        return float(np.abs(mine - ort_logits).max() / (ort_logits.std() + 1e-12))


def activation_taps(proto: onnx.ModelProto) -> list[str]:
    """The tensor after each ReLU, followed through the activation quantizer (QuantizeLinear / Clip /
    DequantizeLinear) that a QCDQ export places behind it, in graph order.

    An FP export and a quantized export of the same network have the same ReLUs in the same order, which is
    how the scanner pairs their layers.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    taps = []
    for node in proto.graph.node:
        if node.op_type != "Relu":
            continue
        name = node.output[0]
        while len(consumers.get(name, [])) == 1 and consumers[name][0].op_type in (
                "QuantizeLinear", "Clip", "DequantizeLinear"):
            name = consumers[name][0].output[0]
        taps.append(name)
    return taps
