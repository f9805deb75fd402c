"""What an ONNX file is, read from its graph: float, QDQ, QOperator or dynamic; weight and activation bits.

A deployer is handed files, and a file's `metadata_props` can say anything: onnxruntime's `quantize_static`
copies the FP file's metadata into the int8 file, so an int8 file made from our FP export says it is float
(../shared/docs/TOOLCHAIN.md). `describe_onnx` reads the graph instead; `metadata_conflicts` lists what the
metadata claims and the graph contradicts.

Examples:
    >>> graph = describe_onnx("model-int8.onnx")                                       # doctest: +SKIP
    >>> graph.label                                                                    # doctest: +SKIP
    'QDQ, int8 weights per-channel, uint8 activations'
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from export.onnx import META, metadata_spec
from export.replica import WEIGHT_INPUT
from qcbdefense.errors import InputError, first_line

# (bits, signed) of a quantized tensor, from its zero point's ONNX data type.
_INT_TYPES = {2: (8, False), 3: (8, True), 4: (16, False), 5: (16, True), 21: (4, False), 22: (4, True)}
_DYNAMIC = {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}
# Where each quantized layer holds its integer weight, the weight's scale and zero point, and the input's zp.
_QOPERATOR_WEIGHT = {"QLinearConv": (3, 4, 5, 2), "QGemm": (3, 4, 5, 2), "QLinearMatMul": (3, 4, 5, 2),
                     "ConvInteger": (1, None, 3, 2), "MatMulInteger": (1, None, 3, 2)}


@dataclass(frozen=True)
class GraphProvenance:
    """What the graph computes. Bits are the widest among layers (first/last layers may differ); None: float."""

    format: str  # "float", "QDQ", "QOperator" or "dynamic"
    weight_bits: int | None
    weight_signed: bool | None
    weight_per_channel: bool | None
    reduce_range: bool | None  # 8-bit signed weights that all fit 7 bits (quantize_static's reduce_range)
    activation_bits: int | None
    activation_signed: bool | None
    layer_weight_bits: list[int]  # per weight layer, in graph order

    @property
    def label(self) -> str:
        if self.format == "float":
            return "float"
        parts = [self.format]
        if self.weight_bits is not None:
            parts.append(f"{_type_name(self.weight_bits, self.weight_signed)} weights "
                         f"{'per-channel' if self.weight_per_channel else 'per-tensor'}"
                         + (" (reduce_range: 7 bits)" if self.reduce_range else ""))
        if self.activation_bits is not None:
            parts.append(f"{_type_name(self.activation_bits, self.activation_signed)} activations"
                         + (" (computed per batch)" if self.format == "dynamic" else ""))
        return ", ".join(parts)

    @property
    def saturates_without_vnni(self) -> bool:
        """8-bit activations times int8 weights in full 8-bit range: onnxruntime's x86 kernels without VNNI add
        pairs of products in int16 (VPMADDUBSW; s8s8 too, shifted to u8s8), which can saturate."""
        return (self.activation_bits == 8 and self.weight_bits == 8 and bool(self.weight_signed)
                and not self.reduce_range)

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def describe_onnx(model: str | os.PathLike | onnx.ModelProto) -> GraphProvenance:
    """Read what the graph of an ONNX file (or proto) computes; InputError for an unreadable file."""
    proto = model if isinstance(model, onnx.ModelProto) else _load(Path(model))
    ops = {node.op_type for node in proto.graph.node}
    if ops & _DYNAMIC:
        fmt = "dynamic"
    elif any(op.startswith("QLinear") or op == "QGemm" for op in ops):
        fmt = "QOperator"
    elif ops & {"QuantizeLinear", "DequantizeLinear"}:
        fmt = "QDQ"
    else:
        return GraphProvenance("float", None, None, None, None, None, None, [])
    graph = _Graph(proto)
    weights = [w for w in (graph.weight(node) for node in proto.graph.node) if w is not None]
    activations = Counter(graph.activation_type(node) for node in proto.graph.node)
    activations.pop(None, None)
    if fmt == "dynamic":
        activations[(8, False)] += 1  # DynamicQuantizeLinear: always uint8
    act = activations.most_common(1)[0][0] if activations else (None, None)
    widest = max(weights, key=lambda w: w[0], default=None)
    signed8 = [w for w in weights if w[0] == 8 and w[1]]
    return GraphProvenance(
        format=fmt, weight_bits=None if widest is None else widest[0],
        weight_signed=None if widest is None else widest[1],
        weight_per_channel=None if not weights else any(w[2] for w in weights),
        reduce_range=bool(signed8) and all(w[3] <= 64 for w in signed8) if widest is not None else None,
        activation_bits=act[0], activation_signed=act[1], layer_weight_bits=[w[0] for w in weights])


def metadata_conflicts(metadata: dict[str, str], graph: GraphProvenance) -> list[str]:
    """What the file's qcbdefense metadata claims that its graph contradicts (empty: none, or no such metadata)."""
    conflicts = []
    kind = metadata.get(META + "kind")
    if kind == "float" and graph.format != "float":
        conflicts.append(f"metadata says float, the graph is {graph.label}")
    if kind == "quantized" and graph.format == "float":
        conflicts.append("metadata says quantized, the graph is float")
    try:
        spec = metadata_spec(metadata)
    except Exception:  # noqa: BLE001 - metadata is untrusted text; unreadable is a conflict to report
        return conflicts + ["metadata carries a quantizer spec that cannot be read"]
    if spec is not None and graph.format != "float":
        if spec.weight_bits not in graph.layer_weight_bits:
            conflicts.append(f"metadata says {spec.weight_bits}-bit weights, the graph has "
                             f"{sorted(set(graph.layer_weight_bits))}-bit")
        if spec.act_bits is not None and graph.activation_bits is not None and spec.act_bits > graph.activation_bits:
            conflicts.append(f"metadata says {spec.act_bits}-bit activations, the graph has {graph.activation_bits}")
    return conflicts


@functools.lru_cache(maxsize=1)
def has_vnni() -> bool | None:
    """Whether this CPU has AVX-VNNI / AVX512-VNNI (None: cannot tell, not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _type_name(bits: int | None, signed: bool | None) -> str:
    return f"{'int' if signed else 'uint'}{bits}"


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise InputError(f"ONNX model {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as err:  # the file is untrusted input
        raise InputError(f"ONNX model {path} cannot be parsed: {first_line(err)}") from None


class _Graph:
    """Look-ups over one graph: constants with their ONNX types, each tensor's producer."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.constants = {init.name: init for init in proto.graph.initializer}
        for node in proto.graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = onnx.helper.get_attribute_value(node.attribute[0])
        self.producers = {out: node for node in proto.graph.node for out in node.output}
        self.clips = {node.input[0]: node.output[0] for node in proto.graph.node if node.op_type == "Clip"}

    def array(self, name: str | None) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor).astype(np.float64)

    def bits(self, zp_name: str | None, clipped_from: str | None = None) -> tuple[int, bool]:
        """(bits, signed) of a quantized tensor: its zero point's type, narrowed by a Clip (Brevitas, < 8 bits)."""
        tensor = self.constants.get(zp_name)
        bits, signed = _INT_TYPES.get(tensor.data_type, (8, False)) if tensor is not None else (8, False)
        clip = self.producers.get(clipped_from) if clipped_from else None
        if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3:
            low, high = self.array(clip.input[1]), self.array(clip.input[2])
            if low is not None and high is not None:
                bits, signed = int(np.ceil(np.log2(float(high) - float(low) + 1))), bool(low < 0)
        return bits, signed

    def weight(self, node: onnx.NodeProto) -> tuple[int, bool, bool, float] | None:
        """(bits, signed, per-channel, largest |integer - zero point|) of a layer's integer weight, or None."""
        if node.op_type in _QOPERATOR_WEIGHT:
            w, scale, zp, _ = _QOPERATOR_WEIGHT[node.op_type]
            w_name = node.input[w]
            zp_name = node.input[zp] if len(node.input) > zp and node.input[zp] else None
            scale_name = node.input[scale] if scale is not None else zp_name
            clipped = None
        elif node.op_type in WEIGHT_INPUT and len(node.input) > 1:
            dq = self.producers.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                return None
            w_name, scale_name = dq.input[0], dq.input[1]
            zp_name = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
            clipped = w_name
            while w_name not in self.constants and w_name in self.producers and \
                    self.producers[w_name].op_type in ("Clip", "QuantizeLinear", "Identity"):
                w_name = self.producers[w_name].input[0]
        else:
            return None
        integers = self.array(w_name)
        if integers is None or self.constants[w_name].data_type == 1:  # float weights quantized at run time
            return None
        zero = self.array(zp_name)
        scale = self.array(scale_name)
        bits, signed = self.bits(zp_name, clipped) if zp_name else (
            _INT_TYPES.get(self.constants[w_name].data_type, (8, True)))
        # reduce_range is a symmetric quantizer's: with zero points it does not apply
        spread = float(np.abs(integers).max()) if zero is None or not zero.any() else float("inf")
        return bits, signed, scale is not None and scale.size > 1, spread

    def activation_type(self, node: onnx.NodeProto) -> tuple[int, bool] | None:
        """(bits, signed) of an activation quantizer (QuantizeLinear of a run-time tensor, a QOperator input)."""
        if node.op_type == "QuantizeLinear" and node.input[0] not in self.constants:
            zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
            return self.bits(zp, self.clips.get(node.output[0]))  # Brevitas narrows below 8 bits by a Clip
        if node.op_type in ("QLinearConv", "QGemm", "QLinearMatMul"):
            return self.bits(node.input[2] or None)
        return None
