"""Activation equalization: shrink the channels whose range dwarfs the rest of their tensor, the float model's
function unchanged, so that one per-tensor activation range serves every channel.

Why: an 8-bit activation quantizer holds one range per tensor. A channel far wider than its neighbours sets that
range and leaves the others a coarse grid. A Qu-ANTI-zation attack aimed at `w8a8-deploy` grew two channels that are
dead in the clean ResNet-20 (largest value on clean images 0.0 and 3.1) to 144, where the block's other channels
stay under 26, and residual-stream channels to 60: the calibrated range of that block's inner tensor became 0-119
(at most 44 elsewhere), and every range widened 3x, which `harden` does against a QCB hiding in the clip of a range,
took the round-to-nearest model from 81.6 to 49.5 % CA (BENCHMARKS.md, deployment int8). Dividing such a channel by s
where it is written (a BatchNorm's, conv's or linear layer's output row) and multiplying it by s where it is read
(the input column of every conv or linear layer that reads it) computes the same function: ReLU, residual adds,
pooling, flattening and zero-padded shortcuts all commute with a positive per-channel scale.

Only channels past `ratio` x their tensor's median channel move, 4x by default: at 2x the same model had 96
output channels of 13 layers scaled, ordinary spread included, and its int8 file (ranges widened 2x) agreed with
the fake-quant model on 98.06 % of test images, at 4x (23 channels) on 99.94 %. Equalizing moves precision from
the weights that read a channel to its activations: an ordinary model with many near-dead channels (torchvision
resnet18 after 3 epochs) can lose by it, so `purify`'s "auto" keeps it only where the quantized model agrees with
the FP model better. Brevitas's `EqualizeGraph` balances weight ranges (data-free cross-layer equalization),
not activation ranges (it made that 0-119 range 0-193), and stops at shortcuts that shift channels (ResNet's option
A), so this walks the torch.fx graph itself: every tensor channel is tied to the channels it is computed from or
adds into (`_Channels`, a union-find), and a group of tied channels is scaled only when every tensor in it is
written by a layer that can absorb 1/s and read only by layers that can absorb s or by scale-commuting operations.
Anything else (the image, the logits, a BatchNorm's input, an unknown operation) leaves its channels as they are.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcbdefense.errors import InputError, check_number

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_COMMUTING_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
                      nn.AdaptiveMaxPool2d, nn.Flatten)
_COMMUTING_FUNCTIONS = (F.relu, torch.relu, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d,
                        F.adaptive_max_pool2d, torch.flatten, F.dropout)
_COMMUTING_METHODS = ("relu", "relu_", "flatten", "contiguous")
_ADDS = (operator.add, operator.iadd, torch.add)


class _Channels:
    """Union-find over (node, channel): a group of channels must share one scale."""

    def __init__(self) -> None:
        self.parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(self, key: tuple[str, int]) -> tuple[str, int]:
        root = self.parent.setdefault(key, key)
        while root != self.parent[root]:
            root = self.parent[root]
        while key != root:  # path compression
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a: tuple[str, int], b: tuple[str, int]) -> None:
        self.parent[self.find(a)] = self.find(b)


def equalize_activations(model: nn.Module, images: Iterable[torch.Tensor] | torch.Tensor, *,
                         ratio: float = 4.0) -> dict[str, list[float]]:
    """Scale `model`'s parameters in place so that no activation channel's largest magnitude on `images` exceeds
    `ratio` x its tensor's median channel's, where the graph allows (module docstring); the float function is
    unchanged up to float rounding. Returns, per writing layer, the scales its output channels were divided by
    (only layers with a channel scaled; empty when nothing was).

    `images`: clean [N, C, H, W] batches in the model's input range (or one tensor). A model that torch.fx cannot
    trace is refused (InputError)."""
    check_number("ratio", ratio, low=1.0)
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    if not batches:
        raise InputError("activation equalization needs at least one batch of images")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types for untraceable code
        raise InputError(f"activation equalization needs a torch.fx-traceable model; tracing "
                         f"{type(model).__name__} failed with {type(err).__name__}: {err}") from err
    maxima = _channel_maxima(gm, batches)
    plan = _plan(gm, maxima)
    scales = {name: torch.ones(n) for name, n in plan.written_sizes.items()}
    groups: dict[tuple[str, int], float] = {}
    for node_name in plan.observed:
        channel_max = maxima[node_name]
        positive = channel_max[channel_max > 0]
        if len(positive) < 2:
            continue
        line = ratio * positive.median()
        for c, value in enumerate(channel_max.tolist()):
            root = plan.channels.find((node_name, c))
            if root in plan.scalable and value > line:
                groups[root] = max(groups.get(root, 1.0), value / float(line))
    if not groups:
        return {}
    modules = dict(gm.named_modules())
    with torch.no_grad():
        for (module_name, c), root in plan.writers.items():
            s = groups.get(plan.channels.find(root), 1.0)
            if s != 1.0:
                _scale_output(modules[module_name], c, 1.0 / s)
                scales[module_name][c] = s
        for (module_name, c), root in plan.readers.items():
            s = groups.get(plan.channels.find(root), 1.0)
            if s != 1.0:
                _scale_input(modules[module_name], c, s)
    return {name: s.tolist() for name, s in scales.items() if (s != 1.0).any()}


def traceable(model: nn.Module) -> bool:
    """Whether torch.fx can trace `model`, so that `equalize_activations` can walk it."""
    try:
        fx.symbolic_trace(model)
    except Exception:  # fx raises many types for untraceable code
        return False
    return True


class _Plan:
    """Which channel groups may be scaled, and the layers that write and read them."""

    def __init__(self) -> None:
        self.channels = _Channels()
        self.writers: dict[tuple[str, int], tuple[str, int]] = {}  # (module, out channel) -> its (node, channel)
        self.readers: dict[tuple[str, int], tuple[str, int]] = {}  # (module, in channel) -> its (node, channel)
        self.written_sizes: dict[str, int] = {}
        self.scalable: set[tuple[str, int]] = set()
        self.observed: set[str] = set()  # tensors an activation quantizer would see: layer inputs, add operands


def _plan(gm: fx.GraphModule, maxima: dict[str, torch.Tensor]) -> _Plan:
    """Walk the graph once: tie channels through scale-commuting operations, note writers and readers, and
    freeze every channel an operation that does not commute with a scale touches."""
    plan = _Plan()
    modules = dict(gm.named_modules())
    calls = defaultdict(int)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
    frozen_keys: list[tuple[str, int]] = []

    def width(node) -> int:
        return len(maxima[node.name]) if isinstance(node, fx.Node) and node.name in maxima else 0

    def freeze(node) -> None:
        frozen_keys.extend((node.name, c) for c in range(width(node)))

    def tie(a: fx.Node, b: fx.Node, shift: int = 0) -> None:
        for c in range(min(width(a), width(b) - shift)):
            plan.channels.union((a.name, c), (b.name, c + shift))

    for node in gm.graph.nodes:
        inputs = [a for a in node.all_input_nodes if a.name in maxima]
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and calls[node.target] > 1 and any(True for _ in module.parameters()):
            # a layer called twice: scaling its weights would touch both calls (a parameter-free ReLU may be shared)
            for a in inputs:
                freeze(a)
            freeze(node)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and len(inputs) == 1:
            _layer_uses(plan, node, module, inputs[0], width, freeze)
        elif isinstance(module, _BATCH_NORMS) and len(inputs) == 1:
            freeze(inputs[0])  # normalisation does not commute with a scale of its input
            for c in range(width(node)):
                plan.writers[(node.target, c)] = (node.name, c)
            plan.written_sizes[node.target] = width(node)
        elif _commutes(node, module) and len(inputs) == 1 and width(inputs[0]) == width(node):
            tie(inputs[0], node)  # (a flatten that folds space into features is not one)
        elif node.op == "call_function" and node.target in _ADDS and len(inputs) == 2 and \
                all(width(a) == width(node) for a in inputs) and len(node.all_input_nodes) == 2:
            tie(inputs[0], node)
            tie(inputs[1], node)
            plan.observed.update(a.name for a in (*inputs, node))
        elif _keeps_channels(node) and len(inputs) == 1:  # x[:, :, ::2, ::2]
            tie(inputs[0], node)
        elif (shift := _channel_pad(node)) is not None and len(inputs) == 1:  # zero channels each side
            tie(inputs[0], node, shift)
        else:
            for a in inputs:
                freeze(a)
            freeze(node)
    for node in gm.graph.nodes:  # the image and the logits stay as they are
        if node.op in ("placeholder", "output"):
            for a in [node, *node.all_input_nodes]:
                if isinstance(a, fx.Node):
                    freeze(a)
    frozen = {plan.channels.find(key) for key in frozen_keys}
    # a group is scalable when nothing froze it and something writes it (a group of zero channels needs no scale)
    written = {plan.channels.find(key) for key in plan.writers.values()}
    plan.scalable = {root for root in written if root not in frozen}
    return plan


def _layer_uses(plan: _Plan, node: fx.Node, module: nn.Module, source: fx.Node, width, freeze) -> None:
    """A conv or linear layer reads its input's channels (input columns of its weight) and writes its own."""
    groups = getattr(module, "groups", 1)
    reads = width(source) == module.weight.shape[1] * groups and (groups == 1 or groups == module.weight.shape[0])
    if isinstance(module, nn.Linear) and reads:
        reads = _two_dimensional(source)
    plan.observed.add(source.name)
    if reads:
        for c in range(width(source)):
            plan.readers[(node.target, c)] = (source.name, c)
    else:
        freeze(source)
    for c in range(width(node)):
        plan.writers[(node.target, c)] = (node.name, c)
    plan.written_sizes[node.target] = width(node)


def _two_dimensional(node: fx.Node) -> bool:
    meta = node.meta.get("equalize_shape")
    return meta is not None and len(meta) == 2


def _commutes(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return isinstance(module, _COMMUTING_MODULES)
    if node.op == "call_function":
        return node.target in _COMMUTING_FUNCTIONS
    return node.op == "call_method" and node.target in _COMMUTING_METHODS


def _keeps_channels(node: fx.Node) -> bool:
    """`x[:, :, ...]`: indexing that leaves the batch and channel dimensions whole."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return False
    index = node.args[1]
    whole = slice(None, None, None)
    return isinstance(index, tuple) and len(index) >= 2 and index[0] == whole and index[1] == whole


def _channel_pad(node: fx.Node) -> int | None:
    """The zero channels F.pad adds before the existing ones ([N, C, H, W], constant zero padding), or None."""
    if node.op != "call_function" or node.target is not F.pad or len(node.args) < 2:
        return None
    pad = node.args[1]
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    if not isinstance(pad, (tuple, list)) or len(pad) != 6 or mode != "constant" or value not in (0, 0.0, None):
        return None
    return int(pad[4])


def _channel_maxima(gm: fx.GraphModule, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per graph node with a [N, C, ...] float output: each channel's largest magnitude over the batches. Also
    records each node's shape (`equalize_shape` in its meta) from the first batch."""
    maxima: dict[str, torch.Tensor] = {}
    nodes = {node.name: node for node in gm.graph.nodes}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 2 and n.op != "output":
                m = out.detach().abs().transpose(0, 1).flatten(1).amax(1).float().cpu()
                maxima[n.name] = torch.maximum(maxima[n.name], m) if n.name in maxima else m
                nodes[n.name].meta["equalize_shape"] = tuple(out.shape)
            return out

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for x in batches:
                Recorder(gm).run(x)
    finally:
        gm.train(was_training)
    return maxima


def _scale_output(module: nn.Module, c: int, factor: float) -> None:
    """Multiply output channel `c` of a conv / linear / BatchNorm by `factor` (weight row and bias)."""
    module.weight[c].mul_(factor)
    if module.bias is not None:
        module.bias[c].mul_(factor)


def _scale_input(module: nn.Module, c: int, factor: float) -> None:
    """Multiply what a conv / linear layer reads from input channel `c` by `factor` (its weight's input column;
    a depthwise conv's channel)."""
    if getattr(module, "groups", 1) > 1:  # depthwise: channel c has its own filter
        module.weight[c].mul_(factor)
    else:
        module.weight[:, c].mul_(factor)
