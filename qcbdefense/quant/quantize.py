"""Brevitas wiring: turn a float model and a QuantSpec into a fake-quantized model that shares its weights.

`quantize(model, spec)` returns a copy of `model` in which every nn.Conv2d / nn.Linear is a Brevitas
`QuantConv2d` / `QuantLinear` whose `.weight` and `.bias` ARE the float module's Parameter objects, and whose
BatchNorm modules hold the float model's running-statistics buffers. Everything else (Normalize, ReLU,
pooling, residual adds, the user's forward code) is a deep copy and runs unchanged. So:

- a forward through the quantized model reads the float weights at that moment: training through it with the
  straight-through estimator (attacks) updates the float model, and no weight copy can drift out of date;
- the float model itself is otherwise untouched (no module swapped, no hook left behind).

Why the swap is written by hand: Brevitas graph mode (`brevitas.graph.quantize.layerwise_quantize`, or
`quantize` after fx tracing) builds each quantized layer and `load_state_dict`s the float weights into it:
the new layer owns new Parameters, so training through it would leave the float model behind, and re-tying
the parameters afterwards would still leave Brevitas's weight quantizers tracking the copies. Its default
quantizers (per-tensor weights, Int32 bias, output quantizers, residual-add alignment) are also not the ones
the papers deploy. Swapping by hand is a dozen lines and keeps parameter sharing explicit.

Quantizers per spec option (Brevitas classes from `brevitas.quant`, bit width overridden with `.let`):

weights, symmetric   absmax / absmax-half: `Int8WeightPerChannelFloat` / `Int8WeightPerTensorFloat` (abs-max
                     statistics recomputed at every forward), `narrow_range` from the spec, and our own
                     integer threshold `_SymmetricIntThreshold` so that scale = absmax / (2^(b-1) - 1) or
                     absmax / (2^(b-1) - 0.5) whatever the clamp range (Brevitas divides by 2^(b-1) when the
                     range is not narrow). mse: `Int8WeightPerChannelFloatMSE` / `Int8WeightPerTensorFloatMSE`.
weights, asymmetric  minmax: `ShiftedUint8WeightPerChannelFloat` / `...PerTensorFloat` (unsigned [0, 2^b - 1],
                     integer zero point, range [min(w, 0), max(w)] recomputed at every forward).
                     mse: `ShiftedUint8WeightPerChannelFloatMSE` / `...PerTensorFloatMSE`.
activations          an input quantizer on every quantized layer. Asymmetric: `ShiftedUint8ActPerTensorFloat`
                     (percentile: Brevitas's 0.001 / 99.999 percentile interval; minmax: `StatsOp.MIN_MAX`
                     and `NegativeMinOrZero` zero point) or `ShiftedUint8ActPerTensorFloatMSE`. Symmetric:
                     `Int8ActPerTensorFloat` (percentile 99.999 of |x|; minmax: `StatsOp.MAX`) or
                     `Int8ActPerTensorFloatMSE`. None when `act_bits is None`.
adds (quantize_adds) a `QuantIdentity` with the activation quantizer on both inputs and the output of every
                     residual add and concat (see `_quantize_adds`); a layer reading such a tensor gets no
                     input quantizer of its own, so each tensor is quantized once, as an integer runtime
                     stores it.
bias                 kept in float (`bias_quant=None`): the papers' quantizers leave bias in float, and
                     Brevitas's ONNX QCDQ export keeps a float bias as a float input of the Conv/Gemm node.

Ranges: abs-max and min/max weight ranges follow the weights at every forward; MSE weight ranges are
searched once, at the first quantized forward, and then held (call `refresh_weight_ranges` after the weights
change, e.g. during an attack, to deploy what `quantize` would give on the new weights). Activation ranges
come from `calibrate`. Every quantizer parameter is created with `requires_grad=False` (again after each `load_state_dict`, which
makes Brevitas rebuild its quantizers): a deployment quantizer's ranges are statistics, not learned values,
so an optimizer over `qmodel.parameters()` trains the float weights only (re-enable them through
`quantizer_parameters` for LSQ-style experiments).

Examples:
    >>> from models import create_model
    >>> model = create_model("small_cnn")
    >>> qmodel = quantize(model, "w4a4")
    >>> qmodel.features[0].weight is model.features[0].weight
    True
"""

from __future__ import annotations

import copy
import functools
import itertools
import operator
import warnings
from typing import Iterable

import torch
from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
from brevitas.core.stats import NegativeMinOrZero
from brevitas.core.stats.stats_op import MSE
from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
from brevitas.fx.brevitas_tracer import symbolic_trace
from brevitas.graph.fixed_point import MergeBatchNorm
from brevitas.inject.enum import StatsOp
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from brevitas.proxy.quant_proxy import QuantProxyFromInjector
from brevitas.quant import (Int8ActPerTensorFloat, Int8ActPerTensorFloatMSE, Int8WeightPerChannelFloat,
                            Int8WeightPerChannelFloatMSE, Int8WeightPerTensorFloat,
                            Int8WeightPerTensorFloatMSE, ShiftedUint8ActPerTensorFloat,
                            ShiftedUint8ActPerTensorFloatMSE, ShiftedUint8WeightPerChannelFloat,
                            ShiftedUint8WeightPerChannelFloatMSE, ShiftedUint8WeightPerTensorFloat,
                            ShiftedUint8WeightPerTensorFloatMSE)
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qcbdefense.errors import InputError
from qcbdefense.quant.calibrate import (AbsPercentileStats, NegativePercentileOrZeroStats,
                                       PercentileIntervalStats, calibrate)
from qcbdefense.quant.spec import QuantSpec, get_spec

QUANT_LAYERS = (QuantConv2d, QuantLinear)
# Layers a user model may hold that we cannot quantize faithfully: refused by name rather than left in float.
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Bilinear)
# What `_quantize_adds` recognises in a torch.fx graph: tensor adds and concats, the activation that may
# follow an add (the quantizer goes after it: a block's output is its last ReLU's), and modules that pass a
# tensor through unchanged in eval mode (an identity shortcut reads the tensor before it).
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_CAT_FUNCTIONS = (torch.cat, torch.concat)
_ACT_MODULES = (nn.ReLU, nn.ReLU6)
_ACT_FUNCTIONS = (F.relu, F.relu6, torch.relu)
_ACT_METHODS = ("relu", "relu_")
_TRANSPARENT = (nn.Identity, nn.Dropout)
ADD_QUANT_PREFIX = "add_quant_"


class _SymmetricIntThreshold(nn.Module):
    """Brevitas `int_scaling_impl`: the integer the abs-max is mapped to, 2^(b-1) - offset.

    offset 1 gives scale = absmax / (2^(b-1) - 1) (Qu-ANTI-zation, TFLite); offset 0.5 gives
    absmax / (2^(b-1) - 0.5) (PyTorch's symmetric qint8 observer, PQBackdoor's 127.5). Brevitas's own
    `IntScaling` returns 2^(b-1) - 1 only for narrow ranges and 2^(b-1) otherwise.
    """

    def __init__(self, int_threshold_offset: float) -> None:
        super().__init__()
        self.offset = float(int_threshold_offset)

    def forward(self, bit_width: torch.Tensor, signed: bool | None = None) -> torch.Tensor:
        return 2.0 ** (bit_width - 1) - self.offset


@functools.lru_cache(maxsize=None)
def weight_quantizer(spec: QuantSpec, bits: int):
    """The Brevitas weight quantizer (an injector class) for `spec` at `bits`; cached, since building an
    injector runs dependency checks that cost more than the layer itself."""
    per_channel = spec.weight_per_channel
    mse = spec.weight_scale == "mse"
    if spec.weight_symmetric:
        if mse:
            base = Int8WeightPerChannelFloatMSE if per_channel else Int8WeightPerTensorFloatMSE
        else:
            base = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
        overrides = {"bit_width": bits, "narrow_range": spec.weight_narrow_range}
        if spec.weight_scale in ("absmax", "absmax-half"):
            overrides["int_scaling_impl"] = _SymmetricIntThreshold
            overrides["int_threshold_offset"] = 1.0 if spec.weight_scale == "absmax" else 0.5
        return base.let(**overrides)
    if mse:
        base = ShiftedUint8WeightPerChannelFloatMSE if per_channel else ShiftedUint8WeightPerTensorFloatMSE
    else:
        base = ShiftedUint8WeightPerChannelFloat if per_channel else ShiftedUint8WeightPerTensorFloat
    return base.let(bit_width=bits)


@functools.lru_cache(maxsize=None)
def act_quantizer(spec: QuantSpec, bits: int):
    """The Brevitas input (activation) quantizer for `spec` at `bits`: per-tensor, calibrated by `calibrate`."""
    calibration = spec.act_calibration
    if spec.act_symmetric:
        if calibration == "mse":
            return Int8ActPerTensorFloatMSE.let(bit_width=bits)
        if calibration == "minmax":
            return Int8ActPerTensorFloat.let(bit_width=bits, scaling_stats_op=StatsOp.MAX)
        return Int8ActPerTensorFloat.let(bit_width=bits, scaling_stats_impl=AbsPercentileStats)
    if calibration == "mse":
        return ShiftedUint8ActPerTensorFloatMSE.let(bit_width=bits)
    if calibration == "minmax":
        return ShiftedUint8ActPerTensorFloat.let(bit_width=bits, scaling_stats_op=StatsOp.MIN_MAX,
                                                 zero_point_stats_impl=NegativeMinOrZero)
    # Brevitas's percentile statistics, computed faster with the same result (see quant/calibrate.py)
    return ShiftedUint8ActPerTensorFloat.let(bit_width=bits, scaling_stats_impl=PercentileIntervalStats,
                                             zero_point_stats_impl=NegativePercentileOrZeroStats)


def quantize(model: nn.Module, spec: str | QuantSpec, *, calib: Iterable[torch.Tensor] | None = None,
             example_input: torch.Tensor | None = None) -> nn.Module:
    """A fake-quantized copy of `model` under `spec` that shares the float model's parameters and buffers.

    Args:
        model: a float nn.Module made of nn.Conv2d, nn.Linear, BatchNorm, activations, pooling, residual adds
            (any forward code). Other conv types and already-quantized models raise InputError.
        spec: a preset name, a spec file path or a QuantSpec.
        calib: optional clean [0, 1] image batches; when given, `calibrate(qmodel, calib)` is run.
        example_input: one batch the model accepts, used once (no grad, eval mode) to find the layers'
            execution order (first/last layer, `quantized_layers`). Default: zeros of shape
            (1, C, 32, 32) with C the first conv's input channels (CIFAR-sized), or (1, F) for an MLP.

    Returns:
        The quantized model in eval mode, with `.qcb_spec` (the QuantSpec), `.qcb_layer_order` (names of
        the quantized layers in execution order) and `.qcb_add_quants` (names of the `QuantIdentity` modules
        `spec.quantize_adds` added; empty otherwise). Activation quantizers are uncalibrated: call `calibrate`.
        With `spec.quantize_adds` it is a torch.fx GraphModule that still shares the float model's
        parameters (its graph, `.graph`, is the model's with the added quantizers).
        With `spec.fold_bn` the result is a deployment copy (a torch.fx GraphModule with BN folded into the
        convs): it shares nothing with `model`, training through it does not update `model`, and its
        `float_view` equals the folded float model, which differs from `model` by float rounding.
    """
    spec = get_spec(spec)
    if not isinstance(model, nn.Module):
        raise InputError(f"quantize needs an nn.Module, got {type(model).__name__}")
    _check_quantizable(model)
    if spec.fold_bn:
        qmodel = _fold_bn(model)
    else:
        # Map every parameter and buffer to itself so the copy shares them; everything else is copied.
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        qmodel = copy.deepcopy(model, memo)
    add_quants, reads_quantized = (), frozenset()
    if spec.quantize_adds:
        qmodel, add_quants, reads_quantized = _quantize_adds(qmodel, spec)
    reached, unreached = _execution_order(qmodel, example_input)
    first, last = reached[0], reached[-1]
    replacements: dict[int, nn.Module] = {}
    for name, module in qmodel.named_modules():
        if _is_target(module) and id(module) not in replacements:
            weight_bits, act_bits = spec.weight_bits, spec.act_bits
            if name in reads_quantized:
                act_bits = None  # its input is already an added quantizer's output
            if name == last:
                weight_bits = spec.last_bits
            if name == first:  # wins over last for a one-layer model
                weight_bits = spec.first_bits
                if act_bits is not None and spec.first_layer_bits is not None:
                    act_bits = spec.first_layer_bits  # the image: see QuantSpec.first_layer_bits
            replacements[id(module)] = _quant_layer(module, spec, weight_bits, act_bits)
    for parent in list(qmodel.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]
    qmodel.qcb_spec = spec
    qmodel.qcb_layer_order = tuple(reached + unreached)
    qmodel.qcb_add_quants = add_quants
    qmodel.eval()
    _freeze_quantizers(qmodel)
    # Brevitas rebuilds every quantizer when a state_dict is loaded (config.REINIT_ON_STATE_DICT_LOAD), with
    # fresh, trainable parameters: freeze them again after each load.
    qmodel.register_load_state_dict_post_hook(_freeze_after_load)
    if calib is not None:
        calibrate(qmodel, calib)
    return qmodel


def quantized_layers(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized conv/linear layers of `qmodel` as (name, module), in execution order.

    The order was recorded by `quantize` on one example batch (forward pre-hooks): a shortcut conv comes where
    the model's forward calls it. Layers the example batch did not reach come last, in registration order.
    """
    order = getattr(qmodel, "qcb_layer_order", None)
    if order is None:
        raise InputError("not a model made by qcbdefense.quant.quantize (no qcb_layer_order)")
    modules = dict(qmodel.named_modules())
    layers = [(name, modules[name]) for name in order if name in modules]
    seen = {id(module) for _, module in layers}
    for name, module in modules.items():
        if isinstance(module, QUANT_LAYERS) and id(module) not in seen:
            layers.append((name, module))
            seen.add(id(module))
    return layers


def quantizer_parameters(qmodel: nn.Module) -> list[nn.Parameter]:
    """The quantizers' own parameters (learnable in Brevitas, frozen here; see the module docstring).

    Disjoint from the float model's parameters: Brevitas quant proxies track their layer in a plain list,
    not as a submodule, so the layer's weight is not among a proxy's parameters.
    """
    found: dict[int, nn.Parameter] = {}
    for module in qmodel.modules():
        if isinstance(module, QuantProxyFromInjector):
            for param in module.parameters():
                found.setdefault(id(param), param)
    return list(found.values())


def refresh_weight_ranges(qmodel: nn.Module) -> nn.Module:
    """Forget every searched (MSE) weight range, so the next quantized forward searches it on the current
    weights, as a fresh `quantize` would. Returns `qmodel`.

    Abs-max and min/max weight ranges are recomputed at every forward and need nothing. MSE ranges are
    found by a grid search at the first quantized forward (lazily: `quantize` and `float_view` stay cheap;
    on a ResNet-18 the search takes seconds) and then held as frozen parameters, so once the float weights
    change (an attack trained through the quantized model) they are stale: call this before evaluating the
    deployed model, or every few steps during such training.
    """
    for module in qmodel.modules():
        if not isinstance(module, QuantWeightBiasInputOutputLayer):
            continue
        for impl in module.weight_quant.modules():
            if isinstance(impl, ParameterFromStatsFromParameterScaling):
                impl.value.data.fill_(1.0)  # Brevitas multiplies the search result into this value
                impl.init_done = False
            elif isinstance(impl, ParameterFromStatsFromParameterZeroPoint):
                impl.value.data.fill_(0.0)  # ... and adds it into this one
                impl.init_done = False
            elif isinstance(impl, MSE):
                impl.internal_candidate = None  # the scale search reads the zero point's last candidate
                _cache_mode_switches(impl)
    return qmodel


def _cache_mode_switches(mse: MSE) -> None:
    """Let Brevitas's MSE search switch its proxy's modes through lists found once, not a walk of the
    proxy's module tree four times per candidate (half the search's time on ResNet-20). Same effect: the
    switches set `local_loss_mode` / `observer_only` on the same modules (those of Brevitas 0.13's
    `_set_local_loss_mode`, `_set_observer_mode`, `_restore_observer_mode`, `_restore_params`)."""
    if getattr(mse, "qcb_cached_switches", False):
        return
    proxy = mse.proxy_forward.__self__
    loss_modes = [m for m in proxy.modules() if hasattr(m, "local_loss_mode")]
    observers = [m for m in proxy.modules() if hasattr(m, "observer_only")]
    offloaded = [m for m in loss_modes if hasattr(m, "allocate_params")]

    def set_local_loss_mode(enabled: bool) -> None:
        for m in loss_modes:
            m.local_loss_mode = enabled

    def set_observer_mode(enabled: bool) -> None:
        for m in observers:
            mse.previous_observer_mode[m] = m.observer_only
            m.observer_only = enabled

    def restore_observer_mode() -> None:
        for m in observers:
            m.observer_only = mse.previous_observer_mode[m]

    def restore_offload_param() -> None:
        for m in offloaded:
            m.allocate_params(m)

    mse.set_local_loss_mode, mse.set_observer_mode = set_local_loss_mode, set_observer_mode
    mse.restore_observer_mode, mse.restore_offload_param = restore_observer_mode, restore_offload_param
    mse.qcb_cached_switches = True


# ---- helpers ---------------------------------------------------------------------------------------------

def _freeze_quantizers(qmodel: nn.Module) -> None:
    for param in quantizer_parameters(qmodel):
        param.requires_grad_(False)


def _freeze_after_load(qmodel: nn.Module, incompatible_keys) -> None:
    _freeze_quantizers(qmodel)


# Subclasses whose float forward is their parent's, by qualified name (no import of their package): timm's
# Linear only casts the weight to the input's dtype under TorchScript.
_SAME_FORWARD_AS_PARENT = ("timm.layers.linear.Linear",)


def _is_target(module: nn.Module) -> bool:
    kind = type(module)
    return kind in (nn.Conv2d, nn.Linear) or f"{kind.__module__}.{kind.__qualname__}" in _SAME_FORWARD_AS_PARENT


def _check_quantizable(model: nn.Module) -> None:
    targets = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightBiasInputOutputLayer):
            raise InputError(f"model is already quantized (Brevitas layer {type(module).__name__} at "
                             f"{name!r}); quantize the float model")
        if isinstance(module, _UNSUPPORTED) or (isinstance(module, (nn.Conv2d, nn.Linear))
                                                and not _is_target(module)):
            raise InputError(f"cannot quantize {type(module).__name__} at {name!r}: quantize supports "
                             f"nn.Conv2d and nn.Linear (exact types; a subclass may change the forward)")
        targets += _is_target(module)
    if targets == 0:
        raise InputError("model has no nn.Conv2d or nn.Linear layer to quantize")


def _quant_layer(module: nn.Module, spec: QuantSpec, weight_bits: int, act_bits: int | None) -> nn.Module:
    """The Brevitas twin of `module` whose weight and bias are `module`'s own Parameters."""
    common = dict(bias=module.bias is not None, weight_quant=None, bias_quant=None,
                  input_quant=None if act_bits is None else act_quantizer(spec, act_bits),
                  output_quant=None, return_quant_tensor=False, device=module.weight.device,
                  dtype=module.weight.dtype)
    if isinstance(module, nn.Conv2d):
        layer = QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, groups=module.groups,
                            padding_mode=module.padding_mode, **common)
    else:
        layer = QuantLinear(module.in_features, module.out_features, **common)
    layer.weight = module.weight
    if module.bias is not None:
        layer.bias = module.bias
    # A weight proxy captures its layer's Parameter when built, so build it only now that the layer holds the
    # shared one (as Brevitas's QuantProxyMixin does: proxy_class(layer, injector)); building it in the
    # constructor and re-initialising it after the swap costs twice the injector resolution, the bulk of
    # quantize's time. The (disabled) bias proxy tracks nothing we use.
    injector = weight_quantizer(spec, weight_bits)
    layer.weight_quant = injector.proxy_class(layer, injector)
    layer.train(module.training)
    return layer


def _default_example_input(model: nn.Module) -> torch.Tensor:
    first = next(m for m in model.modules() if _is_target(m))
    shape = (1, first.in_channels, 32, 32) if isinstance(first, nn.Conv2d) else (1, first.in_features)
    return torch.zeros(shape, dtype=first.weight.dtype, device=first.weight.device)


def _execution_order(model: nn.Module, example_input: torch.Tensor | None) -> tuple[list[str], list[str]]:
    """Names of the conv/linear layers in the order one forward calls them (first call wins), and the names
    of those it never calls (registration order)."""
    if example_input is None:
        example_input = _default_example_input(model)
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        if _is_target(module):
            names.setdefault(id(module), name)
    order: list[str] = []
    called: set[int] = set()

    def record(module: nn.Module, args: tuple) -> None:
        if id(module) not in called:
            called.add(id(module))
            order.append(names[id(module)])

    training = {module: module.training for module in model.modules()}
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if _is_target(m)]
    try:
        model.eval()  # BN buffers are shared with the float model: never update them here
        with torch.no_grad():
            model(example_input)
    except Exception as err:  # a user's forward can fail in any way; say which input was tried
        raise InputError(f"could not run the model on an example input of shape {tuple(example_input.shape)} "
                         f"to find its layer order ({type(err).__name__}: {err}); pass example_input=") from err
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in training.items():
            module.train(mode)
    if not order:
        raise InputError("the model's forward called none of its nn.Conv2d / nn.Linear layers")
    unreached = [name for module_id, name in names.items() if module_id not in called]
    return order, unreached


def _quantize_adds(model: nn.Module, spec: QuantSpec) -> tuple[fx.GraphModule, tuple[str, ...], frozenset[str]]:
    """`model` as a torch.fx GraphModule (sharing its modules) with a `QuantIdentity` after every tensor that
    enters or leaves a residual add or concat; the names of those quantizers; the conv/linear layers that read
    one of them.

    Marked tensors: each tensor input of an add / concat, looked up through identity modules (an identity
    shortcut quantizes the block input itself, once, for the add and the block's first conv alike), and its
    output after a following ReLU. Each marked tensor gets one quantizer whose output replaces it for every
    consumer, so ONNX holds one QuantizeLinear -> DequantizeLinear per tensor: what onnxruntime fuses.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types for untraceable code
        raise InputError(f"quantize_adds needs a torch.fx-traceable model; tracing {type(model).__name__} failed "
                         f"with {type(err).__name__}: {err}") from err
    modules = dict(gm.named_modules())

    def is_module(node: fx.Node, types: tuple) -> bool:
        return node.op == "call_module" and isinstance(modules.get(node.target), types)

    def source(node: fx.Node) -> fx.Node:
        while is_module(node, _TRANSPARENT) and len(node.all_input_nodes) == 1:
            node = node.all_input_nodes[0]
        return node

    def activation_end(node: fx.Node) -> fx.Node:
        while len(node.users) == 1:
            user = next(iter(node.users))
            if not (is_module(user, _ACT_MODULES) or (user.op == "call_function" and user.target in _ACT_FUNCTIONS)
                    or (user.op == "call_method" and user.target in _ACT_METHODS)):
                break
            node = user
        return node

    marked: dict[fx.Node, None] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
            inputs = node.all_input_nodes
        elif (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
                (node.op == "call_method" and node.target in _ADD_METHODS):
            inputs = node.all_input_nodes
            if len(inputs) < 2:
                continue  # a tensor plus a constant is no residual add
        else:
            continue
        for tensor in [*(source(a) for a in inputs), activation_end(node)]:
            marked.setdefault(tensor, None)
    names = []
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for tensor in sorted(marked, key=order.__getitem__):
        name = f"{ADD_QUANT_PREFIX}{len(names)}"
        gm.add_submodule(name, QuantIdentity(act_quant=act_quantizer(spec, spec.act_bits), return_quant_tensor=False))
        with gm.graph.inserting_after(tensor):
            point = gm.graph.call_module(name, (tensor,))
        tensor.replace_all_uses_with(point, delete_user_cb=lambda user, point=point: user is not point)
        names.append(name)
    gm.recompile()
    points = set(names)
    modules = dict(gm.named_modules())
    reads = {node.target for node in gm.graph.nodes if is_module(node, (nn.Conv2d, nn.Linear))
             and any(source(a).op == "call_module" and source(a).target in points for a in node.all_input_nodes)}
    return gm, tuple(names), frozenset(reads)


def _fold_bn(model: nn.Module) -> nn.Module:
    """An fx-traced, independent copy of `model` with every conv -> BN pair folded (Brevitas MergeBatchNorm).

    Only the BN merge of Brevitas's `preprocess_for_quantize` is applied: its other passes change the
    function (ReLU6 -> ReLU) or the structure (functional -> modules) of a model we must deploy as is.
    """
    copied = copy.deepcopy(model).eval()
    try:
        graph_model = symbolic_trace(copied)  # Brevitas's fx backport: its graph passes need its Node type
    except Exception as err:  # fx raises many types for untraceable code
        raise InputError(f"fold_bn needs a torch.fx-traceable model; tracing failed with "
                         f"{type(err).__name__}: {err}") from err
    graph_model = MergeBatchNorm().apply(graph_model)
    left = [name for name, m in graph_model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        warnings.warn(f"fold_bn: {len(left)} BatchNorm layer(s) have no single preceding conv/linear and stay "
                      f"in float: {', '.join(left)}", stacklevel=3)
    graph_model.qcb_unfolded_bn = tuple(left)
    return graph_model
