"""A differentiable PyTorch replica of an ONNX image classifier, for the scanner's trigger search.

The scanner must work from two ONNX files alone (the FP model and the int8/int4 model that ships), and its
trigger search needs gradients through both. onnxruntime has no backward pass, and the ONNX-to-PyTorch
converters we know of do not run QuantizeLinear / DequantizeLinear, so this module interprets the graph node
by node with torch ops. Rounding in QuantizeLinear is straight-through (the gradient of the identity), the
clamp to the integer range is not, so a saturated activation passes no gradient: exactly the fake-quant
training semantics the attacks use. `OnnxReplica.check_against_ort` measures that the replica computes what
onnxruntime computes before the scanner trusts it.

It runs the files torch and Brevitas export and the ones onnxruntime's quantization tools make:
QDQ from `quantize_static` (int8, uint8 and int4 Q/DQ), QOperator (QLinearConv, com.microsoft QGemm,
QLinearAdd, ...: each computed as dequantize -> the float op -> quantize, i.e. exact integer arithmetic up to
float rounding) and `quantize_dynamic` (DynamicQuantizeLinear, ConvInteger, MatMulInteger). Any other
operator raises an InputError naming it.

The replica is exact; onnxruntime is not always: its 8-bit integer kernels on an x86 CPU without VNNI add
pairs of products in int16 (VPMADDUBSW), which saturates with full-range int8 weights
(../shared/docs/TOOLCHAIN.md). `check_agreement` names that cause and its remedy when the two part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from qcbdefense.errors import InputError, first_line

# ONNX TensorProto data types that can appear in Cast / ConstantOfShape of classifier graphs.
_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
           2: torch.uint8, 3: torch.int8}
# The integer range of a quantized tensor, from its zero point's ONNX data type (uint8 when it has none).
_QRANGE = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767), 21: (0, 15), 22: (-8, 7)}
_UINT8 = _QRANGE[2]
# Where a quantizing operator takes its output's scale and zero point (input positions).
_OUTPUT_QPARAMS = {"QuantizeLinear": (1, 2), "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QLinearAdd": (6, 7),
                   "QLinearMul": (6, 7), "QGemm": (7, 8), "QLinearGlobalAveragePool": (3, 4),
                   "QLinearAveragePool": (3, 4), "QLinearSigmoid": (3, 4), "QLinearLeakyRelu": (3, 4),
                   "QLinearConcat": (0, 1)}
# Layers with weights and the input position of their weight: how drift pairs two graphs' layers.
WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "QLinearConv": 3, "QGemm": 3, "QLinearMatMul": 3}
# Operators between a layer and the tensor the next layer reads that keep it "the same layer's output".
_LAYER_TAIL = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSwish", "QuantizeLinear",
               "DequantizeLinear", "QLinearLeakyRelu", "Identity"}
_SHAPE_KEEPING = {"DequantizeLinear", "QuantizeLinear", "Clip", "Identity", "Transpose", "Cast"}


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


def _quantize(x, scale, zero_point=None, *, axis=1, qrange=_UINT8, **_):
    """Float -> integers (held in a float tensor) in `qrange`, the range of the zero point's type."""
    z = 0.0 if zero_point is None else _along(zero_point.float(), axis, x.dim())
    return torch.clamp(_ste_round(x / _along(scale.float(), axis, x.dim())) + z, *qrange)


def _dequantize(q, scale, zero_point=None, *, axis=1, **_):
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


def _qlinear_conv(x, xs, xz, w, ws, wz, ys, yz, b=None, *, qrange=_UINT8, **conv):
    bias = None if b is None else b.float() * (xs.float() * ws.float()).reshape(-1)
    y = _conv(_dequantize(x, xs, xz), _dequantize(w, ws, wz, axis=0), bias, **conv)
    return _quantize(y, ys, yz, qrange=qrange)


def _qgemm(a, as_, az, b, bs, bz, c=None, ys=None, yz=None, *, alpha=1.0, transA=0, transB=0, qrange=_UINT8):
    """com.microsoft QGemm: the int32 bias C is in steps of alpha * a_scale * b_scale; no y_scale: float out."""
    bias = None if c is None else c.float() * alpha * (as_.float() * bs.float()).reshape(-1)
    y = _gemm(_dequantize(a, as_, az), _dequantize(b, bs, bz, axis=0 if transB else 1), bias, alpha=alpha,
              transA=transA, transB=transB)
    return y if ys is None else _quantize(y, ys, yz, qrange=qrange)


def _qlinear_matmul(a, as_, az, b, bs, bz, ys, yz, *, qrange=_UINT8):
    y = _dequantize(a, as_, az, axis=-1) @ _dequantize(b, bs, bz, axis=-1)
    return _quantize(y, ys, yz, qrange=qrange)


def _qlinear_binary(op: Callable):
    def run(a, as_, az, b, bs, bz, ys, yz, *, qrange=_UINT8):
        return _quantize(op(_dequantize(a, as_, az), _dequantize(b, bs, bz)), ys, yz, qrange=qrange)
    return run


def _qlinear_unary(op: Callable):
    def run(x, xs, xz, ys, yz, *, qrange=_UINT8, channels_last=0, **attrs):
        if channels_last:
            raise InputError("quantized operators with channels_last=1 are not supported")
        return _quantize(op(_dequantize(x, xs, xz), **attrs), ys, yz, qrange=qrange)
    return run


def _qlinear_concat(ys, yz, *inputs, axis, qrange=_UINT8):
    parts = [_dequantize(*inputs[i:i + 3]) for i in range(0, len(inputs), 3)]
    return _quantize(torch.cat(parts, dim=axis), ys, yz, qrange=qrange)


def _dynamic_quantize(x):
    """DynamicQuantizeLinear: uint8 over the batch's range (which always holds 0)."""
    low, high = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = ((high - low) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255).detach()
    return _quantize(x, scale, zero_point), scale, zero_point


def _conv_integer(x, w, xz=None, wz=None, **conv):
    x = x.float() - (0.0 if xz is None else xz.float())
    return _conv(x, w.float() - (0.0 if wz is None else _along(wz.float(), 0, w.dim())), **conv)


def _matmul_integer(a, b, az=None, bz=None):
    return (a.float() - (0.0 if az is None else az.float())) @ (b.float() - (0.0 if bz is None else bz.float()))


def _reduce_mean(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
    axes = axes.tolist() if isinstance(axes, torch.Tensor) else axes
    if not axes:
        return x if noop_with_empty_axes else x.mean(dim=tuple(range(x.dim())), keepdim=bool(keepdims))
    return x.mean(dim=tuple(axes), keepdim=bool(keepdims))


def _hard_sigmoid(x, alpha=0.2, beta=0.5):
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


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
    "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt, "Exp": torch.exp,
    "Pow": torch.pow, "Neg": torch.neg,
    "HardSigmoid": _hard_sigmoid, "HardSwish": lambda x: x * _hard_sigmoid(x, 1.0 / 6.0),
    "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "Softmax": lambda x, axis=-1: torch.softmax(x, dim=axis),
    "ReduceMean": _reduce_mean,
    "QLinearConv": _qlinear_conv, "QGemm": _qgemm, "QLinearMatMul": _qlinear_matmul,
    "QLinearAdd": _qlinear_binary(torch.add), "QLinearMul": _qlinear_binary(torch.mul),
    "QLinearGlobalAveragePool": _qlinear_unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "QLinearAveragePool": _qlinear_unary(_pool("AveragePool")),
    "QLinearSigmoid": _qlinear_unary(torch.sigmoid),
    "QLinearLeakyRelu": _qlinear_unary(lambda x, alpha=0.01: F.leaky_relu(x, alpha)),
    "QLinearConcat": _qlinear_concat,
    "DynamicQuantizeLinear": _dynamic_quantize, "ConvInteger": _conv_integer, "MatMulInteger": _matmul_integer,
}


@dataclass(frozen=True)
class LayerTap:
    """A layer with weights and the tensor the next layer reads from it (after its BN, ReLU and quantizer)."""

    op: str
    weight_shape: tuple[int, ...]
    tensor: str


class OnnxReplica(nn.Module):
    """Runs an ONNX classifier with torch ops, differentiably; `taps` names tensors to return as well.

    `replica(x)` returns the logits; `replica(x, taps=True)` returns (logits, {tap name: tensor}). A tapped
    tensor that the graph holds as integers (a quantizer's output) is returned dequantized, so that taps of a
    float graph and of a quantized one compare. `layers` lists the graph's weight layers in order (`LayerTap`).
    """

    def __init__(self, path: str | Path, *, taps: list[str] | None = None) -> None:
        super().__init__()
        try:
            proto = onnx.load(str(path))
        except Exception as err:  # the ONNX file is untrusted input
            raise InputError(f"cannot read ONNX model {path}: {first_line(err)}") from None
        graph = proto.graph
        unsupported = sorted({n.op_type for n in graph.node if n.op_type not in _OPS and n.op_type != "Constant"})
        if unsupported:
            raise InputError(f"ONNX model {path} uses operators the scanner cannot differentiate through: "
                             f"{', '.join(unsupported)}")
        self.path = Path(path)
        self.nodes = list(graph.node)
        self.constants: dict[str, torch.Tensor] = {}
        types: dict[str, int] = {}  # each constant's ONNX data type
        tensors = list(graph.initializer) + [_attrs(n)["value"] for n in self.nodes if n.op_type == "Constant"]
        names = [i.name for i in graph.initializer] + [n.output[0] for n in self.nodes if n.op_type == "Constant"]
        for name, tensor in zip(names, tensors):
            array = numpy_helper.to_array(tensor)
            if tensor.data_type in (21, 22):  # uint4 / int4: torch has no such dtype
                array = array.astype(np.uint8 if tensor.data_type == 21 else np.int8)
            self.constants[name] = torch.from_numpy(np.array(array))
            types[name] = tensor.data_type
        inputs = [i.name for i in graph.input if i.name not in self.constants]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise InputError(f"ONNX model {path} must have one image input and one logits output")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self.taps = list(taps or [])
        # Per node, its attributes plus the integer range of a quantized output; per quantized tensor, where
        # its scale and zero point are (to dequantize a tap).
        self.kwargs: list[dict] = []
        self.qparams: dict[str, tuple[str, str | None, int]] = {}
        for node in self.nodes:
            kwargs = _attrs(node)
            where = _OUTPUT_QPARAMS.get(node.op_type)
            if where is not None and len(node.input) > where[0] and node.input[where[0]]:
                zp = node.input[where[1]] if len(node.input) > where[1] and node.input[where[1]] else None
                if zp is not None and types.get(zp, 2) not in _QRANGE:
                    raise InputError(f"ONNX model {path}: {node.op_type} quantizes to ONNX type {types[zp]}; the "
                                     f"scanner runs 4, 8 and 16-bit integer quantizers only")
                kwargs["qrange"] = _QRANGE[types.get(zp, 2)]
                self.qparams[node.output[0]] = (node.input[where[0]], zp, kwargs.get("axis", 1))
            self.kwargs.append(kwargs)
        self.layers = weight_layers(proto)

    def _apply(self, fn, recurse=True):  # .to(device) moves the graph's constants, kept outside the buffers
        self.constants = {name: fn(value) for name, value in self.constants.items()}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, taps: bool = False):
        values = dict(self.constants)
        values[self.input_name] = x
        for node, kwargs in zip(self.nodes, self.kwargs):
            if node.op_type == "Constant":
                continue
            args = [values[name] if name else None for name in node.input]
            while args and args[-1] is None:
                args.pop()
            out = _OPS[node.op_type](*args, **kwargs)
            for name, value in zip(node.output, out if isinstance(out, tuple) else (out,)):
                values[name] = value
        logits = values[self.output_name]
        return (logits, {name: self._float_view(name, values) for name in self.taps}) if taps else logits

    def _float_view(self, name: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
        if name not in self.qparams:
            return values[name]
        scale, zero_point, axis = self.qparams[name]
        return _dequantize(values[name], values[scale], None if zero_point is None else values[zero_point],
                           axis=axis)

    def check_against_ort(self, images: torch.Tensor, ort_logits: np.ndarray) -> float:
        """The largest |replica - onnxruntime| logit difference on `images`, relative to the logits' spread."""
        with torch.no_grad():
            mine = self(images).numpy()
        return float(np.abs(mine - ort_logits).max() / (ort_logits.std() + 1e-12))


def check_agreement(replica: OnnxReplica, images: torch.Tensor, ort_logits: np.ndarray, minimum: float) -> float:
    """The replica's argmax agreement (%) with onnxruntime's logits on `images`; an InputError naming the likely
    cause and the remedy when it is below `minimum` (%)."""
    with torch.no_grad():
        agree = 100.0 * (replica(images).argmax(1) == torch.from_numpy(ort_logits).argmax(1)).float().mean().item()
    if agree >= minimum:
        return agree
    from export.provenance import describe_onnx, has_vnni

    graph = describe_onnx(replica.path)
    cause = "the file computes something the replica does not model"
    if graph.saturates_without_vnni and not has_vnni():
        cause = ("onnxruntime's 8-bit integer kernels (int8 weights in full range) saturate on this CPU, which "
                 "has no VNNI: they add pairs of products in int16 (../shared/docs/TOOLCHAIN.md); remedy: quantize "
                 "with reduce_range=True (7-bit weights), or scan on a CPU with AVX-VNNI / AVX512-VNNI")
    raise InputError(f"cannot scan {replica.path} ({graph.label}): the torch replica agrees with onnxruntime on "
                     f"only {agree:.1f} % of images (minimum {minimum:g} %); likely cause: {cause}; or lower "
                     f"--min-replica-agreement to scan anyway")


def _consumers(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def weight_layers(proto: onnx.ModelProto) -> list[LayerTap]:
    """The graph's layers with weights (Conv, Gemm, MatMul and their quantized forms), in graph order, each with
    its weight's shape and the tensor its output becomes after BN, activation and quantizer (while each feeds
    only the next). A float file and any quantization of it list the same layers with the same weight shapes,
    whatever the quantizer fused or removed (onnxruntime drops the ReLU behind a quantizer)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    shapes = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    shapes.update({n.output[0]: tuple(_attrs(n)["value"].dims) for n in proto.graph.node if n.op_type == "Constant"})
    consumers = _consumers(proto)
    layers = []
    for node in proto.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        name = node.input[index]
        while name not in shapes and name in producers and producers[name].op_type in _SHAPE_KEEPING:
            name = producers[name].input[0]
        if name not in shapes:  # a product of two activations, not a layer
            continue
        shape = shapes[name] if len(shapes[name]) != 2 else tuple(sorted(shapes[name]))  # Gemm/MatMul: any layout
        tensor = node.output[0]
        while len(consumers.get(tensor, [])) == 1 and consumers[tensor][0].op_type in _LAYER_TAIL:
            tensor = consumers[tensor][0].output[0]
        layers.append(LayerTap(node.op_type, shape, tensor))
    return layers
