"""A model with each BatchNorm folded into the conv before it: what the scan's gradient steps run.

Why: a trigger search step runs a batch forward and backward through both models, and in eval mode a
BatchNorm after a conv is only a per-channel scale and shift, yet it costs a pass over the activations each way.
Folded into the conv's weight and bias it costs nothing (a ResNet-20 search step on 2 CPU cores: a fifth faster);
a held-range quantized conv (`quant.held_view`) has its integer weights computed once and the BN folded in after
them, so its input quantizer sees what it saw before. The folded copy is the same function up to float rounding
(a quantized activation sitting on a rounding tie may land on the other level), so only the search steps run it:
every figure the scan reports comes from the model itself (`tapped.TappedModel`).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from qcbdefense.quant.held_view import HeldQuantLayer

MIN_AGREEMENT = 0.99  # the folded copy's answers must match the model's on this share of the example images


class FoldedConv(nn.Module):
    """A conv with its BatchNorm folded in (weight and bias fixed), after the quantized conv's input quantizer
    when it had one."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
                 input_quant: nn.Module | None = None) -> None:
        super().__init__()
        self.geometry = [conv]  # stride, padding, dilation, groups (a list: not a submodule)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.input_quant = input_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return nn.Conv2d._conv_forward(self.geometry[0], x, self.weight, self.bias)


def conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names where, on a forward of `example`, the BatchNorm's input is the conv's
    output, each module called once. Plain `nn.Conv2d` / `nn.BatchNorm2d` only: a subclass may do more (timm's
    BatchNormAct2d also applies its activation)."""
    modules = dict(model.named_modules())
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors kept alive, so no id is reused
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def conv_hook(name: str):
        def hook(_module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            outputs[id(output)] = (name, output)
        return hook

    def bn_hook(name: str):
        def hook(_module, inputs, _output):
            calls[name] = calls.get(name, 0) + 1
            if id(inputs[0]) in outputs:
                pairs.append((outputs[id(inputs[0])][0], name))
        return hook

    handles = []
    for name, module in modules.items():
        if type(module) is nn.Conv2d or (isinstance(module, HeldQuantLayer) and module.conv is not None):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif type(module) is nn.BatchNorm2d and module.track_running_stats:
            handles.append(module.register_forward_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, bn) for conv, bn in pairs if calls[conv] == 1 and calls[bn] == 1]


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """A copy of eval-mode `model` (sharing its parameters) with every BatchNorm that follows a conv folded
    into it (`conv_batchnorm_pairs`), or None when none does or the copy's answers on `example` differ from the
    model's on more than 1 - `MIN_AGREEMENT` of the images (a conv output used elsewhere too, which hooks
    cannot see)."""
    pairs = conv_batchnorm_pairs(model, example[:2])  # which layers follow which: two images tell
    if not pairs:
        return None
    memo: dict[int, object] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    folded = copy.deepcopy(model, memo)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if isinstance(conv, HeldQuantLayer):
            weight, input_quant, geometry = conv.weight_quant(conv.weight), conv.input_quant, conv.conv[0]
        else:
            weight, input_quant, geometry = conv.weight, None, conv
        inv_std = 1 / torch.sqrt(bn.running_var + bn.eps)
        scale = inv_std if bn.weight is None else bn.weight * inv_std
        shift = (0 if bn.bias is None else bn.bias) - bn.running_mean * scale
        bias = shift if conv.bias is None else conv.bias * scale + shift
        _replace(folded, conv_name, FoldedConv(geometry, weight * scale[:, None, None, None], bias, input_quant))
        _replace(folded, bn_name, nn.Identity())
    folded.eval()
    agreement = (folded(example).argmax(1) == model(example).argmax(1)).float().mean().item()
    return folded if agreement >= MIN_AGREEMENT else None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
