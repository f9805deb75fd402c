"""Activation-range calibration, and the float view of a quantized model.

What Brevitas activation quantizers do on their own, and what we make of it:

- A fresh input quantizer (`ParameterFromRuntimeStatsScaling`, `ParameterFromRuntimeZeroPoint`) holds no
  range. In training mode it spends its first 300 forwards collecting per-batch statistics (each of those
  forwards uses that batch's own range, so the model changes with the batch), then turns the average into a
  learnable `value` parameter. In eval mode before that, it uses a placeholder (1.0): garbage.
- `calibrate` runs Brevitas's `calibration_mode` (quantization off, statistics collected as a true average
  over the given batches, BN in eval mode so the shared running statistics are untouched), then fixes the
  range: every statistics counter is past its collection window, so from then on training mode and eval
  mode both use the stored `value`.
- `value` is a Parameter, but `quantize` creates it with requires_grad=False, so an optimizer over
  `qmodel.parameters()` cannot move it: after `calibrate`, activation ranges stay exactly fixed while an
  attack trains the weights through the quantized model (checked by the tests).
- Calibrating again starts from scratch (Brevitas alone would silently keep the first ranges, since its
  counters are already past the window).

`is_calibrated(qmodel)` tells whether every activation quantizer holds a calibrated range; attack and
defence code should check it before training or evaluating through a quantized model.

Percentile ranges (the 0.001 % and 99.999 % points of every activation tensor) are Brevitas's statistics
computed by `kth_smallest` instead of a full `torch.kthvalue` (`PercentileIntervalStats`,
`NegativePercentileOrZeroStats`, `AbsPercentileStats`, which `quantize` uses): the same values, bit for bit,
at a fraction of the cost, since a calibration pass spent most of its time in `kthvalue`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling
from brevitas.core.stats import AbsPercentile, NegativePercentileOrZero, PercentileInterval
from brevitas.core.zero_point import ParameterFromRuntimeZeroPoint
from brevitas.graph.calibrate import calibration_mode, quantization_status_manager
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase
from torch import nn

from qcbdefense.errors import InputError, check_number

_RUNTIME_STATS = (ParameterFromRuntimeStatsScaling, ParameterFromRuntimeZeroPoint)


def calibrate(qmodel: nn.Module, batches: Iterable[torch.Tensor], *,
              max_batches: int | None = None) -> nn.Module:
    """Set every activation range of `qmodel` in place from clean image batches; return it in eval mode.

    Args:
        qmodel: a model from `quantize`. Its spec chose the range rule (minmax / percentile / mse); each
            batch contributes its statistic and the ranges are their average over batches.
        batches: tensors of pixels in [0, 1], shape (N, C, H, W), or (images, labels) pairs as a DataLoader
            yields them (labels ignored).
        max_batches: stop after this many batches (None: use them all).

    A weight-only model (act_bits None) has nothing to calibrate and is returned unchanged (in eval mode).
    """
    check_number("max_batches", max_batches, integer=True, low=1, optional=True)
    qmodel.eval()
    stats = _runtime_stats(qmodel)
    if not stats:
        return qmodel
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise InputError("calibration got no batches; give at least one batch of clean images")
    _images(first)  # refuse a bad first batch before touching the current ranges
    for module in stats:
        _reset(module)
    count = 0
    try:
        with torch.no_grad(), calibration_mode(qmodel):
            for batch in _chain(first, iterator):
                if max_batches is not None and count >= max_batches:
                    break
                qmodel(_images(batch))
                count += 1
    except BaseException:
        # calibration_mode's exit has turned the partial statistics into ranges: undo, so a failed
        # calibration leaves the model visibly uncalibrated rather than half calibrated.
        for module in stats:
            _reset(module)
        raise
    assert is_calibrated(qmodel), "calibration_mode left an activation quantizer uninitialised"
    return qmodel.eval()


def is_calibrated(qmodel: nn.Module) -> bool:
    """True when every activation quantizer of `qmodel` holds a fixed range (vacuously for weight-only)."""
    return all(module.counter > module.collect_stats_steps for module in _runtime_stats(qmodel))


def widen_ranges(qmodel: nn.Module, factor: float) -> int:
    """Multiply every calibrated activation range of `qmodel` but the image's by `factor`, in place (both
    ends: the scale and the zero point's real-valued offset, so the zero point stays the same integer); return
    how many ranges moved.

    Why: a QCB can live in the clip of the range itself. Trained against ranges calibrated on clean images,
    its trigger drives some activations far past anything clean images reach; the quantizer clips them and
    the quantized model alone obeys (a Qu-ANTI-zation QCB aimed at `w8a8-deploy`, BENCHMARKS.md: 98 % ASR with
    8-bit activations, 3 % with float ones, 4 % with every range but the image's widened 3x). Reconstructing weights
    cannot see that clip; a range wider than the clean images need removes it. At 8 bits a range 3x as wide
    keeps about 6.4 bits of resolution for the clean activations. The image's quantizer is left alone: pixels
    cannot leave [0, 1], so a wider image range would cost resolution and clip nothing.
    """
    check_number("factor", factor, low=1.0)
    ranges = ranges_but_image(qmodel)
    with torch.no_grad():
        for stats in ranges.values():
            for module in stats:
                module.value.mul_(factor)
    return len(ranges)


def ranges_but_image(qmodel: nn.Module) -> dict[str, list[nn.Module]]:
    """Per activation quantizer of `qmodel` but the image's (by module name): the runtime-statistics modules
    holding its calibrated range, which `widen_ranges` scales."""
    image = _image_quantizer(qmodel)
    skip = {id(m) for m in image.modules()} if image is not None else set()
    found = {name: [m for m in proxy.modules() if isinstance(m, _RUNTIME_STATS)]
             for name, proxy in qmodel.named_modules()
             if isinstance(proxy, ActQuantProxyFromInjectorBase) and id(proxy) not in skip}
    return {name: stats for name, stats in found.items() if stats}


def _image_quantizer(qmodel: nn.Module) -> nn.Module | None:
    """The input quantizer of the first quantized layer (the one the image goes through), if it has one."""
    from qcbdefense.quant.quantize import quantized_layers  # quantize imports this module

    layers = quantized_layers(qmodel)
    quant = getattr(layers[0][1], "input_quant", None) if layers else None
    return quant if isinstance(quant, ActQuantProxyFromInjectorBase) and quant.is_quant_enabled else None


@contextmanager
def float_view(qmodel: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `qmodel` computes exactly (bit for bit) the float model; quantizers are restored on
    exit, also when the block raises.

    Uses Brevitas's `quantization_status_manager` with activation, weight and bias quantization disabled:
    every quantizer returns its input untouched and collects no statistics. Gradients flow to the shared
    float weights as through the float model.

    Examples:
        >>> from models import create_model
        >>> from qcbdefense.quant import quantize
        >>> model = create_model("small_cnn").eval()
        >>> qmodel, x = quantize(model, "w8a8"), torch.rand(2, 3, 32, 32)
        >>> with float_view(qmodel):
        ...     torch.equal(qmodel(x), model(x))
        True
    """
    with quantization_status_manager(qmodel, disable_act_quant=True, disable_weight_quant=True,
                                     disable_bias_quant=True):
        yield qmodel


# ---- percentile statistics -------------------------------------------------------------------------------

_SAMPLE = 1 << 16


def kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """`torch.kthvalue(x.flatten(), k)[0]` exactly, fast when k is near either end of the sorted values.

    A strided sample gives a threshold t with, very likely, at least k values strictly on the near side of
    it (or t itself is the answer: fewer than k values beyond t, at least k up to and including it, as with
    the zeros after a ReLU); the k-th value is then selected among those few, else (never seen) from all of
    `x`. Exact either way: with at least k values below t, the k-th smallest is below t and its rank among
    them is k (likewise from the top).
    """
    flat = x.reshape(-1)
    n = flat.numel()
    from_top = k > n - k + 1
    rank = n - k + 1 if from_top else k  # rank from the near end
    if n <= 4 * _SAMPLE or rank * 64 > n:
        return torch.kthvalue(flat, k)[0]
    stride = n // _SAMPLE
    sample = flat[::stride]
    margin = min(len(sample), 4 * math.ceil(rank / stride) + 16)
    threshold = torch.kthvalue(sample, len(sample) - margin + 1 if from_top else margin)[0]
    beyond = flat > threshold if from_top else flat < threshold
    count = int(torch.count_nonzero(beyond))
    if count >= rank:
        candidates = flat[beyond]
        return torch.kthvalue(candidates, count - rank + 1 if from_top else rank)[0]
    if count + int(torch.count_nonzero(flat == threshold)) >= rank:
        return threshold
    return torch.kthvalue(flat, k)[0]


class PercentileIntervalStats(PercentileInterval):
    """Brevitas's `PercentileInterval` (asymmetric scale: high minus low percentile) through `kth_smallest`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_reduce_dim is not None:
            return super().forward(x)
        low_k = int(math.ceil(.01 * self.low_q * x.numel()))
        high_k = int(math.floor(.01 * self.high_q * x.numel() + 0.5))
        low = torch.clamp(kth_smallest(x, low_k), max=self.zero())
        return torch.abs(kth_smallest(x, high_k) - low)


class NegativePercentileOrZeroStats(NegativePercentileOrZero):
    """Brevitas's `NegativePercentileOrZero` (asymmetric zero point) through `kth_smallest`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_reduce_dim is not None:
            return super().forward(x)
        k = int(math.ceil(.01 * self.q * x.numel()))
        return torch.clamp(kth_smallest(x, k), max=self.zero())


class AbsPercentileStats(AbsPercentile):
    """Brevitas's `AbsPercentile` (symmetric scale) through `kth_smallest`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_reduce_dim is not None:
            return super().forward(x)
        k = int(math.floor(.01 * self.q * x.numel() + 0.5))
        return kth_smallest(x.abs(), k)


# ---- helpers ---------------------------------------------------------------------------------------------

def _runtime_stats(qmodel: nn.Module) -> list[nn.Module]:
    found: dict[int, nn.Module] = {}
    for proxy in qmodel.modules():
        if isinstance(proxy, ActQuantProxyFromInjectorBase):
            for module in proxy.modules():
                if isinstance(module, _RUNTIME_STATS):
                    found.setdefault(id(module), module)
    return list(found.values())


def _reset(module: nn.Module) -> None:
    """Back to Brevitas's freshly built state: the first statistic is multiplied into a buffer of ones
    (scale) or added to a buffer of zeros (zero point), and so is the final value."""
    fill = 1.0 if isinstance(module, ParameterFromRuntimeStatsScaling) else 0.0
    with torch.no_grad():
        module.buffer.fill_(fill)
        module.value.fill_(fill)
    module.counter = 0


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _images(batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        raise InputError(f"calibration batches must be float image tensors (or (images, labels) pairs), "
                         f"got {type(batch).__name__}"
                         + (f" of dtype {batch.dtype}" if isinstance(batch, torch.Tensor) else ""))
    if batch.numel() and (batch.min() < 0 or batch.max() > 1):
        raise InputError(f"calibration images must be pixels in [0, 1] (models normalise inside), got values "
                         f"in [{batch.min().item():.3g}, {batch.max().item():.3g}]")
    return batch
