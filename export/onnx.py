"""ONNX export of a quantized model (Brevitas QCDQ) and of its FP reference, with provenance in the file.

The user deploys the ONNX file, so the file is what must be clean: `export_onnx` writes exactly the integers
of the given quantized model (nearest or purified), and `export.ort` / `export.verify` measure the file itself.

What `export_onnx` writes (Brevitas `export_onnx_qcdq`, TorchScript path, opset 13 by default):

- input `pixels`: float32 [N, 3, H, W] in [0, 1] (the model normalises inside), N dynamic; output `logits`.
- per quantized layer: the input activation as QuantizeLinear -> DequantizeLinear (with a Clip between them
  below 8 bits), the weight as an int8/uint8 initializer holding the layer's integers -> DequantizeLinear
  (a Clip first below 8 bits), then Conv / Gemm. Everything else (Normalize, ReLU, pooling, residual adds)
  stays float, exactly as the fake-quant model computes it.
- three rewrites of that graph, on when the activations are 8-bit (the first two can be turned off:
  `fold_bn`, `int_bias`), which make the int8 graph integer-only where the model allows it (see "Integer
  kernels" below):
  1. BN folding into the weight *scales*: each Conv -> BatchNormalization pair whose weight is
     DequantizeLinear(W_int, s, z) becomes DequantizeLinear(W_int, s * k, z) -> Conv(bias b') with
     k = gamma / sqrt(var + eps) per output channel and b' = (b - mean) * k + beta. Convolution is linear
     per output channel, so this is the same function (up to float rounding), and W_int and z are the very
     same initializer: the integers the purifier chose are kept bit for bit. A per-tensor weight scale
     becomes per-channel (s * k differs per channel); a negative gamma gives a negative scale, which ONNX
     allows and onnxruntime's QLinearConv computes correctly (checked against a reference in the tests).
     This is not `QuantSpec.fold_bn`: that folds BN into the float weights *before* quantizing, which gives
     other integers (another deployment); this folds after, which keeps them.
  2. int32 bias: a float bias b of a Conv / Gemm whose input and weight both come from DequantizeLinear
     becomes DequantizeLinear(round(b / (s_x * s_w)), s_x * s_w), the bias format of integer kernels. It
     moves each bias by at most half an accumulator step, s_x * s_w / 2 (typically 1e-5 of a logit).
  3. a per-tensor QuantizeLinear right after a Flatten / Reshape moves above it (exact: it acts on each
     element alone), so that the classifier's input quantizer directly follows the global average pool.
  And always: a float bias left on a Conv with a dequantized input (below 8 bits, or a model with conv
  biases when rewrite 2 is off) becomes an Add after the Conv, so that onnxruntime cannot round it to int32
  behind the fake-quant model's back (`conv_biases_as_adds`).
- `metadata_props`: `qcbdefense.kind` (quantized / float), `qcbdefense.spec` (the QuantSpec as JSON),
  `qcbdefense.model` (the model reference of `models.reference`, "unknown" for a model built elsewhere),
  `qcbdefense.defense`, `qcbdefense.source_sha256` (the FP checkpoint the model came from), `qcbdefense.version`,
  and what the rewrites did. `read_metadata(path)` returns them.

Integer kernels (what onnxruntime 1.32's QDQ fusion needs, found by trying each format on small_cnn and
ResNet-20; tests/export/test_onnx.py keeps the first three facts checked):
    - a Conv fuses into QLinearConv only when every input comes from DequantizeLinear (bias included: a
      float bias blocks it, hence rewrite 2) and its output goes straight into QuantizeLinear, optionally
      through a ReLU that ORT drops (a Q with zero point 0 already clips at 0) and through MaxPool (ORT
      moves the Q above it). A BatchNormalization between Conv and Q blocks it (hence rewrite 1). A Gemm
      whose inputs are all dequantized becomes QGemm even with a float output (the logits).
    - per-channel uint8 weights with a different zero point per channel (the asymmetric presets, w8a8
      among them) and negative scales are accepted by QLinearConv and give exact results.
    - a conv whose output is NOT quantized by the spec cannot become QLinearConv: in a ResNet these are
      the stem and the last conv of each block (10 of ResNet-20's 19 convs), whose output enters the float
      residual add that the deployment quantizer (LAC's and EFRAP's) leaves in float, and in small_cnn
      the conv before the global average pool. ORT runs them as float Conv on weights it dequantizes at
      every run. Making them integer needs an output quantizer the fake-quant model does not have, i.e.
      another model. Rewriting them exactly as ConvInteger on the same integers (plus a one-channel
      ConvInteger correcting for per-channel zero points, which ORT's ConvInteger does not take) works
      but ran slower than the float Conv here, so it is not done.
    - below 8 bits the Q -> Clip -> DQ activations do not fuse; int4 graphs run on float kernels.
    - under a spec with `quantize_adds` (the `*-deploy` presets) every conv output, residual add and block
      output is quantized by the model itself, so every conv becomes QLinearConv, every add QLinearAdd and
      the classifier QGemm (tests/export/test_onnx.py counts them on ResNet-20 and torchvision's ResNet-18).
    - DequantizeLinear -> GlobalAveragePool -> QuantizeLinear becomes QLinearGlobalAveragePool (ORT's
      unary QDQ rule), but not with the model's Flatten between the pool and the Q: hence rewrite 3.
    The upshot on a ResNet under the LAC/EFRAP quantizer: half the convs run as QLinearConv (uint8 x
    uint8, since the weights are asymmetric), half in float with Q/DQ and layout transposes between
    them, and the int8 file is not faster than the FP32 one on a CPU. ORT's own fully quantized model
    (quantized residual adds, symmetric int8 weights: `export.crosscheck`) is about 2x faster, but it is
    a different quantizer, under which a QCB may or may not fire.

Examples:
    >>> qmodel = post_training_quantize(model, "w8a8", data)                           # doctest: +SKIP
    >>> export_onnx(qmodel, "model.onnx", spec="w8a8", defense="nearest",
    ...             source_sha256=sha256_file("fp.pt"))                                # doctest: +SKIP
    >>> read_metadata("model.onnx")["qcbdefense.defense"]                              # doctest: +SKIP
    'nearest'
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

import qcbdefense
from models.reference import model_reference
from qcbdefense.errors import InputError, check_number, first_line
from qcbdefense.fileio import atomic_path
from qcbdefense.quant.calibrate import is_calibrated
from qcbdefense.quant.spec import QuantSpec, get_spec

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
META = "qcbdefense."
MIN_OPSET = 13          # per-channel DequantizeLinear (axis) needs 13
INT32_MAX = 2 ** 31 - 1


def keep_bn_rewrites(keep_bn: bool) -> dict:
    """`export_onnx`'s rewrite switches for `--keep-bn`: both off, so BN stays a node and biases stay float,
    computed in the fake-quant model's order (agreement over speed: onnxruntime then runs no integer kernels)."""
    return {"fold_bn": False, "int_bias": False} if keep_bn else {}


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, *, spec: str | QuantSpec | None = None,
                defense: str = "nearest", source_sha256: str | None = None, opset: int = MIN_OPSET,
                input_size: tuple[int, int] = (32, 32), fold_bn: bool | None = None,
                int_bias: bool | None = None) -> Path:
    """Write the quantized model `qmodel` as a QCDQ ONNX file at `path` (atomically); return the path.

    Args:
        qmodel: a calibrated model from `qcbdefense.quant.quantize` / `post_training_quantize` / `purify`.
            Exported in place (a deep copy of a Brevitas model with MSE ranges recurses forever at its first
            forward); its outputs are unchanged afterwards. A model on a GPU is moved to the CPU for the
            export and moved back.
        spec: the QuantSpec it was quantized with; None takes `qmodel.qcb_spec`. A spec that differs from the
            model's raises InputError (the metadata must describe the file).
        defense: the purifier that chose the integers ("nearest" for plain PTQ), written to the metadata.
        source_sha256: sha256 of the FP checkpoint the model came from (None: unknown), written to the metadata.
        opset: ONNX opset, 13 or more (TorchScript export; 13 is what onnxruntime's QDQ fusion is tested on).
        input_size: (H, W) of the example input used for tracing; the batch dimension is dynamic.
        fold_bn, int_bias: the two graph rewrites of the module docstring. None (the default): on when the
            activations are 8-bit, where they let onnxruntime run integer kernels; off below 8 bits, where
            nothing fuses anyway and the rewrites' float rounding would only flip a few 4-bit activations.
    """
    model_spec = getattr(qmodel, "qcb_spec", None)
    if not isinstance(qmodel, nn.Module) or model_spec is None:
        raise InputError("export_onnx needs a quantized model made by qcbdefense (quantize / "
                         "post_training_quantize / purify); this one has no qcb_spec")
    spec = model_spec if spec is None else get_spec(spec)
    if spec != model_spec:
        raise InputError(f"spec {spec.name} ({spec.label}) is not the spec the model was quantized with: "
                         f"{model_spec.name} ({model_spec.label})")
    if not is_calibrated(qmodel):
        raise InputError("the quantized model has uncalibrated activation quantizers; calibrate it first")
    _check_common(path, defense, source_sha256, opset)
    proto = _qcdq_proto(qmodel, input_size, opset)
    integer_kernels = spec.act_bits == 8
    inline_constant_identities(proto)
    folded = fold_batchnorm(proto) if (integer_kernels if fold_bn is None else fold_bn) else 0
    biases = quantize_biases(proto) if (integer_kernels if int_bias is None else int_bias) else 0
    moved = quantize_before_reshapes(proto) if integer_kernels else 0
    bias_adds = conv_biases_as_adds(proto)  # what is left in float stays float in onnxruntime too
    remove_unused_initializers(proto)
    meta = {"kind": "quantized", "format": "qcdq", "spec": json.dumps(spec.to_dict(), sort_keys=True),
            "spec_label": spec.label, "defense": defense, "bn_folded_into_scales": str(folded),
            "int32_biases": str(biases), "quantize_before_reshape": str(moved),
            "float_biases_as_adds": str(bias_adds),
            "model": model_reference(qmodel) or "unknown"}
    return _save(proto, path, meta, source_sha256)


def _qcdq_proto(qmodel: nn.Module, input_size: tuple[int, int], opset: int) -> onnx.ModelProto:
    """Brevitas's QCDQ export of `qmodel`, before any rewrite (the model is left as it was)."""
    from brevitas.export import export_onnx_qcdq

    example = _example_input(qmodel, input_size)
    device, training = _device_of(qmodel), qmodel.training
    # Brevitas's QCDQ manager returns None when asked for the model in memory: go through a scratch file.
    with tempfile.TemporaryDirectory(prefix="qcb-export-") as scratch:
        raw = Path(scratch) / "qcdq.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and Brevitas tracer chatter
                export_onnx_qcdq(qmodel.cpu().eval(), args=example, export_path=str(raw), opset_version=opset,
                                 dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                 dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                                 keep_initializers_as_inputs=False)
        finally:
            qmodel.to(device).train(training)
        return onnx.load(str(raw))


@torch.no_grad()
def snap_biases_to_int32(qmodel: nn.Module, *, input_size: tuple[int, int] = (32, 32),
                         opset: int = MIN_OPSET) -> int:
    """Move `qmodel`'s biases (BN's, where BN folds into a conv) by what the int32 rounding of `export_onnx`
    (rewrite 2) will move them, in place, so that the PyTorch model computes the biases its integer file
    computes; return how many biases moved. Why: each moves by at most half an accumulator step (s_x * s_w / 2
    of its channel), yet on a ResNet-20 at w8a8-deploy that rounding alone cost 0.59 points of argmax agreement
    (BENCHMARKS.md); moving the model instead changed 0.8 % of its answers and its CA by +0.04 points."""
    proto = _qcdq_proto(qmodel, input_size, opset)
    inline_constant_identities(proto)
    fold_batchnorm(proto)
    shifts: dict[str, np.ndarray] = {}
    quantize_biases(proto, shifts)
    params = dict(qmodel.named_parameters())
    moved = 0
    for name, shift in shifts.items():
        target = params.get(name.removesuffix(".folded"))  # BN's bias (folded) or the layer's own
        if target is not None and target.numel() == shift.size:
            target.add_(torch.from_numpy(shift.reshape(target.shape)).to(target.dtype).to(target.device))
            moved += 1
    return moved


def export_float_onnx(model: nn.Module, path: str | os.PathLike, *, source_sha256: str | None = None,
                      opset: int = MIN_OPSET, input_size: tuple[int, int] = (32, 32)) -> Path:
    """Write the FP model as ONNX (same input/output names, dynamic batch, BN left for onnxruntime to fuse).

    The reference for agreement checks and the input of ORT's own quantizer (`export.crosscheck`).
    A quantized model raises InputError: export its FP source instead.
    """
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    if not isinstance(model, nn.Module):
        raise InputError(f"export_float_onnx needs an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantWeightBiasInputOutputLayer) for m in model.modules()):
        raise InputError("export_float_onnx got a quantized model; export it with export_onnx, or export "
                         "the FP model it came from")
    _check_common(path, "none", source_sha256, opset)
    example = _example_input(model, input_size)
    exported = copy.deepcopy(model).cpu().eval()  # a plain torch model copies fine
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(exported, (example,), buffer, opset_version=opset, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                          keep_initializers_as_inputs=False, do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    return _save(proto, path, {"kind": "float", "format": "float", "defense": "none",
                               "model": model_reference(model) or "unknown"}, source_sha256)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `metadata_props` of an ONNX file (weights not loaded); InputError for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX model {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, onnx its own types
        raise InputError(f"ONNX model {path} cannot be parsed: {first_line(err)}") from None
    return {p.key: p.value for p in proto.metadata_props}


def metadata_spec(metadata: dict[str, str]) -> QuantSpec | None:
    """The QuantSpec stored by `export_onnx` (None for a float or foreign file)."""
    text = metadata.get(META + "spec")
    return None if text is None else QuantSpec.from_json(text)


# ---- graph rewrites ------------------------------------------------------------------------------------

class _Graph:
    """Indexes of one GraphProto for the rewrites: initializers, producers, consumers, fresh names."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {name: node for node in graph.node for name in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self._names = set(self.inits) | set(self.producer) | {i.name for i in graph.input}

    def array(self, name: str) -> np.ndarray | None:
        """An initializer as numpy, None when `name` is computed (or empty: an omitted optional input)."""
        tensor = self.inits.get(name) if name else None
        return None if tensor is None else numpy_helper.to_array(tensor)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def add_init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _weight_dq(g: _Graph, layer: onnx.NodeProto) -> onnx.NodeProto | None:
    """The DequantizeLinear that produces `layer`'s weight from constant integers (maybe through a Clip),
    with constant scale and zero point, per output channel (axis 0) or per tensor; else None."""
    dq = g.producer.get(layer.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or g.only_consumer(dq.output[0]) is not layer:
        return None
    source = g.producer.get(dq.input[0])
    if source is not None and not (source.op_type == "Clip" and source.input[0] in g.inits):
        return None
    if source is None and dq.input[0] not in g.inits:
        return None
    scale = g.array(dq.input[1])
    if scale is None or (len(dq.input) > 2 and dq.input[2] and g.array(dq.input[2]) is None):
        return None
    if scale.size > 1 and _attr(dq, "axis", 1) != 0:
        return None
    return dq


def fold_batchnorm(proto: onnx.ModelProto) -> int:
    """Fold each Conv -> BatchNormalization whose weight is a constant DequantizeLinear into the weight scales
    and the Conv bias (rewrite 1 of the module docstring), in place; return how many were folded.

    The integer weight initializer and the zero point values are untouched. A BN with a zero gamma (a dead
    channel: its scale would become 0 and no integer bias could express its output) is left in place.
    """
    g = _Graph(proto.graph)
    dropped: list[onnx.NodeProto] = []
    for bn in [n for n in proto.graph.node if n.op_type == "BatchNormalization"]:
        conv = g.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or g.only_consumer(conv.output[0]) is not bn:
            continue
        if len(bn.output) != 1 or _attr(bn, "training_mode", 0):
            continue
        dq = _weight_dq(g, conv)
        params = [g.array(name) for name in bn.input[1:5]]
        if dq is None or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        k = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        channels = k.size
        scale = np.broadcast_to(g.array(dq.input[1]).astype(np.float64).reshape(-1), (channels,)) * k
        if not np.all(np.isfinite(scale)) or np.any(scale.astype(np.float32) == 0):
            continue
        bias = g.array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(channels)
        if bias is None:
            continue
        new_bias = (bias.astype(np.float64) - mean) * k + beta
        inputs = [dq.input[0], g.add_init(f"{conv.name or 'conv'}.bn_scale", scale.astype(np.float32))]
        if len(dq.input) > 2 and dq.input[2]:
            zero = g.array(dq.input[2])
            inputs.append(g.add_init(f"{conv.name or 'conv'}.bn_zero_point",
                                     np.broadcast_to(zero.reshape(-1), (channels,)).astype(zero.dtype).copy()))
        del dq.input[:]
        dq.input.extend(inputs)
        _set_attr(dq, "axis", 0)
        conv_inputs = [conv.input[0], conv.input[1],  # named after BN's bias, which `snap_biases_to_int32` moves
                       g.add_init(f"{bn.input[2]}.folded", new_bias.astype(np.float32))]
        del conv.input[:]
        conv.input.extend(conv_inputs)
        conv.output[0] = bn.output[0]
        dropped.append(bn)
    for bn in dropped:
        proto.graph.node.remove(bn)
    return len(dropped)


def quantize_biases(proto: onnx.ModelProto, shifts: dict[str, np.ndarray] | None = None) -> int:
    """Turn the float bias of each Conv / Gemm with a DequantizeLinear input and weight into int32 integers
    with scale input_scale * weight_scale (rewrite 2 of the module docstring), in place; return how many.
    `shifts`, when given, receives per bias initializer how far the rounding moved each of its values.

    Skipped (bias left in float): a computed bias, a non-constant or per-channel input scale, a Gemm that
    is not y = x W^T + b (alpha, beta 1, transB 1, per-channel axis on W's rows), or integers that would not
    fit int32.
    """
    g = _Graph(proto.graph)
    new_nodes: dict[int, onnx.NodeProto] = {}
    for layer in proto.graph.node:
        if layer.op_type not in ("Conv", "Gemm") or len(layer.input) < 3 or not layer.input[2]:
            continue
        bias = g.array(layer.input[2])
        x_dq = g.producer.get(layer.input[0])
        w_dq = _weight_dq(g, layer)
        if bias is None or x_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq is None:
            continue
        x_scale = g.array(x_dq.input[1])
        if x_scale is None or x_scale.size != 1:
            continue
        if layer.op_type == "Gemm" and (_attr(layer, "transB", 0) != 1 or _attr(layer, "transA", 0) != 0
                                        or _attr(layer, "alpha", 1.0) != 1.0 or _attr(layer, "beta", 1.0) != 1.0):
            continue
        w_scale = g.array(w_dq.input[1]).astype(np.float32).reshape(-1)
        scale = (np.float32(x_scale.reshape(())) * w_scale).astype(np.float32)  # what an int kernel computes
        with np.errstate(divide="ignore", invalid="ignore"):
            integers = np.round(bias.astype(np.float64) / scale.astype(np.float64))
        if not np.all(np.isfinite(integers)) or np.abs(integers).max(initial=0) > INT32_MAX:
            continue
        base = layer.input[2]
        if shifts is not None:
            shifts[base] = integers * scale.astype(np.float64) - bias.astype(np.float64)
        q_name = g.add_init(f"{base}.int32", integers.astype(np.int32))
        s_name = g.add_init(f"{base}.scale", scale if scale.size > 1 else scale.reshape(()))
        out = g.fresh(f"{base}.dequantized")
        dq = helper.make_node("DequantizeLinear", [q_name, s_name], [out], name=g.fresh(f"{base}.DequantizeLinear"),
                              **({"axis": 0} if scale.size > 1 else {}))
        layer.input[2] = out
        new_nodes[id(layer)] = dq
    if new_nodes:
        nodes = []
        for node in proto.graph.node:
            if id(node) in new_nodes:
                nodes.append(new_nodes[id(node)])  # right before its consumer: topological order holds
            nodes.append(node)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return len(new_nodes)


def conv_biases_as_adds(proto: onnx.ModelProto) -> int:
    """Move the constant float bias of each Conv whose input is dequantized into an Add right after it (the
    same function), in place; return how many.

    onnxruntime's default graph optimisation (its WeightBiasQuantization pass) rounds such a bias to int32 at
    scale s_x * s_w, which the fake-quant model (float bias) does not do. The shift is below one accumulator
    step, but below 8 bits it moves activations across rounding boundaries and the flips grow with depth:
    the W4A4 file of torchvision's resnet18 imported from its FP ONNX (BN folded into conv biases) agreed
    with its own fake-quant model on 35.5 % of 200 images, on 99.5 % with the biases as Adds (the
    torchvision-built model, whose convs have no bias: 99.5 %). Biases already in int32 (rewrite 2) are
    not float, so untouched.
    """
    g = _Graph(proto.graph)
    moved: dict[int, onnx.NodeProto] = {}
    for conv in proto.graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 3 or not conv.input[2]:
            continue
        bias, source = g.array(conv.input[2]), g.producer.get(conv.input[0])
        if bias is None or source is None or source.op_type != "DequantizeLinear":
            continue
        addend = g.add_init(f"{conv.input[2]}.as_add", bias.astype(np.float32).reshape(1, -1, 1, 1))
        out = conv.output[0]
        conv.output[0] = g.fresh(f"{out}.without_bias")
        del conv.input[2]
        moved[id(conv)] = helper.make_node("Add", [conv.output[0], addend], [out], name=g.fresh(f"{conv.name}.bias"))
    if moved:
        nodes = []
        for node in proto.graph.node:
            nodes.append(node)
            if id(node) in moved:
                nodes.append(moved[id(node)])  # right after its producer: topological order holds
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return len(moved)


def quantize_before_reshapes(proto: onnx.ModelProto) -> int:
    """Swap each Flatten / Reshape -> per-tensor QuantizeLinear pair into QuantizeLinear -> Flatten / Reshape
    (rewrite 3 of the module docstring), in place; return how many. Exact: a per-tensor quantizer acts on
    each element alone, so it commutes with any reshaping."""
    g = _Graph(proto.graph)
    position = {id(node): i for i, node in enumerate(proto.graph.node)}
    swaps = []
    for q in proto.graph.node:
        reshape = g.producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if reshape is None or reshape.op_type not in ("Flatten", "Reshape") or g.only_consumer(q.input[0]) is not q:
            continue
        scale = g.array(q.input[1])
        if scale is None or scale.size != 1:
            continue
        # x -> Reshape -> t -> Q -> y  becomes  x -> Q -> t -> Reshape -> y (t now holds integers)
        data, between, quantized = reshape.input[0], q.input[0], q.output[0]
        q.input[0], q.output[0] = data, between
        reshape.input[0], reshape.output[0] = between, quantized
        swaps.append((position[id(reshape)], position[id(q)]))
    nodes = list(proto.graph.node)
    for reshape_at, q_at in swaps:  # each Q takes its reshape's place: topological order holds
        nodes[reshape_at], nodes[q_at] = nodes[q_at], nodes[reshape_at]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return len(swaps)


def inline_constant_identities(proto: onnx.ModelProto) -> int:
    """Replace each Identity of an initializer by a copy of that initializer under the Identity's output name,
    in place; return how many. The TorchScript exporter shares equal tensors (the BN parameters of an
    untrained model, all ones and zeros) through Identity nodes, which hide them from the rewrites."""
    g = _Graph(proto.graph)
    inlined = [node for node in proto.graph.node
               if node.op_type == "Identity" and node.input[0] in g.inits and node.output[0] not in g.outputs]
    for node in inlined:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(g.inits[node.input[0]])
        tensor.name = node.output[0]
        proto.graph.initializer.append(tensor)
        proto.graph.node.remove(node)
    return len(inlined)


def remove_unused_initializers(proto: onnx.ModelProto) -> None:
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


# ---- helpers ---------------------------------------------------------------------------------------------

def _check_common(path: str | os.PathLike, defense: str, source_sha256: str | None, opset: int) -> None:
    """Refuse bad arguments before the (seconds-long) export runs."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise InputError(f"ONNX output {path} must end in .onnx")
    if path.exists() and not path.is_file():
        raise InputError(f"ONNX output {path} exists and is not a file")
    if not isinstance(defense, str) or not defense.strip():
        raise InputError(f"defense must be a non-empty name such as 'nearest' or 'lac-pda', got {defense!r}")
    if source_sha256 is not None and (not isinstance(source_sha256, str) or len(source_sha256) != 64
                                      or any(c not in "0123456789abcdef" for c in source_sha256)):
        raise InputError(f"source_sha256 must be 64 lowercase hex digits or None, got {source_sha256!r}")
    check_number("opset", opset, integer=True, low=MIN_OPSET, kind="an integer (per-channel DequantizeLinear)")


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _example_input(model: nn.Module, input_size: tuple[int, int]) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise InputError("ONNX export expects an image model (pixels [N, C, H, W] in): this one has no Conv2d")
    height, width = input_size
    return torch.rand(1, first.in_channels, height, width, generator=torch.Generator().manual_seed(0))


def _save(proto: onnx.ModelProto, path: str | os.PathLike, meta: dict[str, str],
          source_sha256: str | None) -> Path:
    path = Path(path)
    meta = {**meta, "source_sha256": source_sha256 or "unknown", "version": qcbdefense.__version__,
            "input": f"{INPUT_NAME}: float32 [N, C, H, W] pixels in [0, 1]"}
    helper.set_model_props(proto, {META + key: value for key, value in meta.items()})
    proto.producer_name, proto.producer_version = "qcbdefense", qcbdefense.__version__
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path
