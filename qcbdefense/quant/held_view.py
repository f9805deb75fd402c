"""Held-range views of a fake-quantized model: Brevitas's quantizers with their ranges read once and applied by
PyTorch's own kernels, for the attacks' training, the scanner's searches and every evaluation.

Why: while no range moves (between an attack's syncs; always, in a scan or an evaluation) a Brevitas layer still
re-derives its scale, zero point and bit width through a tower of small modules at every forward and quantizes
with a dozen elementwise passes (divide, add, round, clamp, subtract, multiply, each with its own backward).
With a gradient wanted, `torch.fake_quantize_per_tensor_affine`'s arithmetic does the same with the same
straight-through gradient (rounding passed through, zero outside the clamp range, as Brevitas's `RoundSte` and
`TensorClamp` give); it multiplies by 1/scale, so a value exactly on a rounding tie may round the other way,
which training does not notice. Without a gradient the view computes in Brevitas's order of operations and
gives its logits bit for bit.

`fast_view(qmodel)` returns a copy of a `quantize` model in which every quantized layer is a `HeldQuantConv2d`
/ `HeldQuantLinear` / `HeldQuantIdentity` sharing the layer's float weight and bias, or None when a weight
range is not held (abs-max and min/max ranges follow the weights at every forward, with a gradient through
the range: train through the Brevitas model then). Call `load_ranges(view, qmodel)` after every re-calibration.
Where the weights do not move at all (the scanner's searches differentiate through the input only),
`held_view(qmodel)` holds every range, whatever its weight scale, and loads it at once; evaluations and the
scanner run it where `fast_equivalent` finds it gives the Brevitas model's logits bit for bit.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from brevitas.function.ops import max_int, min_int
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
from torch import nn

from qcbdefense.quant.calibrate import is_calibrated


class HeldRange(nn.Module):
    """A quantizer's range, fixed until the next `load`: scale, integer zero point and integer bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()), persistent=False)
        self.register_buffer("zero_point", torch.zeros(()), persistent=False)
        self.qmin, self.qmax = 0, 255

    @torch.no_grad()
    def load(self, scale: torch.Tensor, zero_point: torch.Tensor, bit_width: torch.Tensor, signed: bool,
             narrow: bool) -> None:
        self.scale = scale.detach().float().clone()
        self.zero_point = zero_point.detach().float().expand_as(self.scale).clone()
        bits = torch.as_tensor(bit_width)
        self.qmin = int(min_int(signed, narrow, bits))
        self.qmax = int(max_int(signed, narrow, bits))


class StraightThroughFakeQuant(torch.autograd.Function):
    """`torch.fake_quantize_per_tensor_affine` bit for bit, forward (times 1/scale, round half to even, clamp)
    and backward (the gradient passed where the level was inside the clamp range, zero elsewhere), in a few
    passes: ATen's CPU kernel for it is about 3x slower than these on a ResNet-20 activation. The zero point is
    an integer, so clamping the rounded values to the range less the zero point is clamping them plus it to the
    range, exactly, and a level was inside where the clamp left it unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: float, qmin: int, qmax: int
                ) -> torch.Tensor:
        levels = torch.round(x * (1.0 / scale))
        clamped = levels.clamp(qmin - zero_point, qmax - zero_point)
        # a float mask (1 / 0): on CPU written and multiplied by 4x faster than a bool one
        ctx.save_for_backward(torch.eq(clamped, levels, out=torch.empty_like(levels)))
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inside, = ctx.saved_tensors
        return grad * inside, None, None, None, None


class HeldActQuant(HeldRange):
    """A per-tensor activation quantizer: PyTorch's fake quantization when a gradient is wanted (with its
    straight-through gradient), Brevitas's own arithmetic (bit for bit) when not."""

    def load(self, *args, **kwargs) -> None:
        super().load(*args, **kwargs)
        if self.scale.numel() != 1:
            raise ValueError(f"activation ranges are per tensor, got {self.scale.numel()} scales")
        self.int_zero_point = float(self.zero_point.round())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return StraightThroughFakeQuant.apply(x, self.scale.reshape(()), self.int_zero_point, self.qmin,
                                                  self.qmax)
        # No gradient wanted (evaluation): Brevitas's order of operations, so ties round as in Brevitas too.
        levels = (x / self.scale).add_(self.zero_point).round_().clamp_(self.qmin, self.qmax)
        return levels.sub_(self.zero_point).mul_(self.scale)  # in place: one tensor allocated, not six


class HeldWeightQuant(HeldRange):
    """A weight quantizer (per channel or per tensor) computed in Brevitas's order of operations, so the
    integers are Brevitas's bit for bit; weights are small, so the unfused arithmetic costs little."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            levels = torch.round(w / self.scale + self.zero_point)
            inside = (levels >= self.qmin) & (levels <= self.qmax)
            q = (levels.clamp(self.qmin, self.qmax) - self.zero_point) * self.scale
        # straight through the rounding, no gradient where the clamp bites (Brevitas's TensorClamp)
        return torch.where(inside, w + (q - w).detach(), q)


class HeldQuantLayer(nn.Module):
    """A quantized conv / linear layer with held ranges; its weight and bias are the Brevitas layer's own
    Parameters (so the float model's)."""

    def __init__(self, layer: QuantConv2d | QuantLinear) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.conv = [layer] if isinstance(layer, QuantConv2d) else None  # a list: not a submodule
        self.weight_quant = HeldWeightQuant()
        self.input_quant = HeldActQuant() if layer.input_quant.is_quant_enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = self.weight_quant(self.weight)
        if self.conv is not None:
            return nn.Conv2d._conv_forward(self.conv[0], x, w, self.bias)
        return F.linear(x, w, self.bias)


class HeldQuantIdentity(nn.Module):
    """A `QuantIdentity` (a quantized residual add's input or output) with its range held."""

    def __init__(self) -> None:
        super().__init__()
        self.act_quant = HeldActQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quant(x)


def fast_view(qmodel: nn.Module, *, weights_fixed: bool = False) -> nn.Module | None:
    """A copy of `qmodel` (sharing its parameters, buffers and float modules) whose quantized layers apply
    held ranges with fused kernels, or None when a weight range of `qmodel` follows the weights (see the
    module docstring) and `weights_fixed` does not say they will stay as they are. Ranges are placeholders
    until `load_ranges`."""
    spec = getattr(qmodel, "qcb_spec", None)
    if spec is None or (spec.weight_scale != "mse" and not weights_fixed):
        return None
    memo: dict[int, object] = {id(t): t for t in itertools.chain(qmodel.parameters(), qmodel.buffers())}
    for module in qmodel.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            memo[id(module)] = HeldQuantLayer(module)
        elif isinstance(module, QuantIdentity):
            memo[id(module)] = HeldQuantIdentity()
    view = copy.deepcopy(qmodel, memo)
    view.qcb_held_from = [qmodel]  # a list, so the Brevitas model is not a submodule of its view
    return view


def held_view(qmodel: nn.Module) -> nn.Module | None:
    """The `fast_view` of a calibrated `qmodel` whose weights will not change, its ranges loaded; None when
    `qmodel` is not a `quantize` model, not calibrated, or has a range a held quantizer cannot hold."""
    view = fast_view(qmodel, weights_fixed=True)
    if view is None or not is_calibrated(qmodel):
        return None
    try:
        load_ranges(view, qmodel)
    except ValueError:  # a per-channel activation range
        return None
    return view.train(qmodel.training)


@torch.no_grad()
def fast_equivalent(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """What to run instead of `model` while no weight moves: its `held_view` when that view gives `model`'s
    logits on the batch `x` bit for bit (no gradient: Brevitas's own arithmetic, 1.5x faster on a ResNet-20),
    else `model` itself (not a calibrated `quantize` model, or a quantizer the view does not reproduce)."""
    view = held_view(model)
    return view if view is not None and torch.equal(view(x), model(x)) else model


@torch.no_grad()
def load_ranges(view: nn.Module, qmodel: nn.Module) -> None:
    """Copy the current ranges of the (calibrated, searched) Brevitas `qmodel` into its `fast_view`."""
    if not is_calibrated(qmodel):
        raise ValueError("load_ranges needs a calibrated model")
    held = dict(view.named_modules())
    for name, module in qmodel.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            target = held[name]
            qw = module.quant_weight()
            target.weight_quant.load(qw.scale, qw.zero_point, qw.bit_width, bool(qw.signed),
                                     module.weight_quant.is_narrow_range)
            if target.input_quant is not None:
                _load_act(target.input_quant, module.input_quant)
        elif isinstance(module, QuantIdentity):
            _load_act(held[name].act_quant, module.act_quant)


def _load_act(target: HeldActQuant, proxy: nn.Module) -> None:
    target.load(proxy.scale(), proxy.zero_point(), proxy.bit_width(), bool(proxy.is_signed),
                bool(proxy.is_narrow_range))
