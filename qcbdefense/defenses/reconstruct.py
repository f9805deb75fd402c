"""Layer-wise reconstruction: the one loop LAC, EFRAP and AdaRound share.

Each purifier learns the integer weights of a quantized model layer by layer, in execution order, so that
every quantized layer reproduces the FP model's activations on the defender's clean images. The methods
differ only in how the integers are parametrised while they are learned (a `Rounding`) and in the penalty
added to the reconstruction error; this module owns everything else:

Units. A "layer" in the papers is conv -> BN -> ReLU -> the next activation quantizer. We find it in the
    torch.fx graph of the FP model: from the quantized layer's node, follow its single consumer through
    BatchNorm, activations and residual adds, and stop before anything else (pooling, flatten, a fork, the
    next quantized layer). An add is crossed only when its other operand is computed by layers already
    hardened (or by none), so in a ResNet-20 basic block `conv2`'s unit is
    relu2(bn2(conv2(x)) + shortcut(x)), the block output the next block sees, and the shortcut term (from the
    partially quantized model) is a cached input of the unit. In a projection-shortcut ResNet-18 block,
    `conv2` stops at bn2 (the shortcut conv runs after it) and `shortcut.0` carries the add and the ReLU.
    When the unit's output feeds a quantized layer directly, that layer's input quantizer is applied to the
    quantized side (`match_act_quant`): the loss measures what the next layer actually receives.
    Under a spec with `quantize_adds` the graph is the quantized model's own (the FP model's with the added
    quantizers; they are identities on the FP side), and a unit also stops at an added quantizer, which
    then plays the next layer's input quantizer: in a basic block `conv2`'s unit is bn2(conv2(x)) as the
    residual add receives it.
Inputs and targets. Two `Stream`s evaluate the graph on the calibration images, one on the FP model and
    one on the partially quantized model, each node once, on demand, freeing every value as soon as all its
    consumers have run. The FP target of a unit is computed once; the input of a unit comes from the
    quantized model with every earlier layer already hardened (so later layers see, and correct, earlier
    errors), passed once through the layer's input quantizer and cached. A whole purification is one FP
    forward and one quantized forward over the images, however many layers.
The weight. The offset (LAC) or rounding variables (EFRAP, AdaRound) live in a `Rounding` module held by
    this loop, not in Brevitas. It computes the fake-quantized weight on the layer's frozen grid (scale,
    zero point and integer bounds read from the layer's own Brevitas quantizer at the nearest-rounding
    start, with Brevitas's order of operations, so at zero offset it equals Brevitas's weight bit for bit),
    and the conv/linear of the Brevitas layer computes with it. Brevitas's quantizer itself is not touched:
    a purified model has exactly the state_dict keys of a plain `quantize` model.
Activation ranges. As released, LAC leaves them at their calibrated values. With `learn_act_range` the
    range of the quantizer the unit's output feeds (Brevitas's own scale and zero-point parameters, trained
    straight-through) is learned with the weights and kept with the best integers.
Hardening. When a layer is done its float weight is overwritten with (q - z) * s for the learned integers
    q. Re-quantizing gives back exactly q because the range does not move: MSE ranges are held by Brevitas
    after their first search, and for ranges recomputed at every forward (abs-max, min-max) the elements
    that define the range are pinned at their float values and every other hardened value is clamped into
    that range. The loop then asks Brevitas for the integers and counts any mismatch (expected: none).
Loss. mean over batch and positions of sum over channels of (q - fp)^2, Adam, batches drawn from the
    cached images by a seeded generator, optional early stopping on the windowed reconstruction loss.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from brevitas.function.ops_ste import round_ste
from torch import nn
from tqdm import tqdm

from qcbdefense.errors import InputError
from qcbdefense.quant.quantize import quantized_layers
from qcbdefense.quant.spec import QuantSpec

# Modules and functions a unit may run through after its conv/linear: channel-wise or element-wise, so
# the unit's output keeps the layer's own shape and the loss stays per position.
_CHAIN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.SiLU,
                  nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Identity, nn.Dropout)
_CHAIN_FUNCTIONS = (F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.silu, F.gelu, F.hardswish, torch.relu,
                    torch.sigmoid, torch.tanh)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_CHAIN_METHODS = ("relu", "relu_", "sigmoid", "tanh", "add", "add_")
_BN = (nn.BatchNorm2d,)


# ---- the frozen integer grid of one layer --------------------------------------------------------------

@dataclass
class WeightGrid:
    """The integer grid of one layer's weight, frozen at its nearest-rounding values.

    `scale` and `zero_point` broadcast to the weight ((C_out, 1, 1, 1) per channel, one element per tensor);
    weight ~ (q - zero_point) * scale with q an integer in [qmin, qmax]. `pinned` marks elements that must
    keep their nearest integer and float value (the range-defining ones when the spec recomputes the range
    at every forward); `low`/`high` bound hardened values so that such a range cannot move, and
    `int_low`/`int_high` are the integers those bounds reach, the only ones a hardened weight can keep (with
    scale = absmax / 127.5, -128 would sit below -absmax: the learned integer must stop at what the plain
    quantizer reads back).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int
    pinned: torch.Tensor | None = None
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    int_low: torch.Tensor | None = None
    int_high: torch.Tensor | None = None

    @classmethod
    def of(cls, layer: nn.Module, spec: QuantSpec) -> "WeightGrid":
        """Read the grid from the layer's Brevitas weight quantizer (this runs an MSE range search once)."""
        with torch.no_grad():
            quant = layer.quant_weight()
            signed = bool(quant.signed)
            bits = int(quant.bit_width.item())
            narrow = bool(layer.weight_quant.is_narrow_range)
            qmin = (-(2 ** (bits - 1)) + int(narrow)) if signed else 0
            qmax = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
            grid = cls(quant.scale.detach().clone(), quant.zero_point.detach().clone(), qmin, qmax, bits)
            if spec.weight_scale != "mse":
                grid.pinned, grid.low, grid.high = _range_pins(layer.weight.detach(), spec)
                grid.int_low, grid.int_high = grid.nearest(grid.low), grid.nearest(grid.high)
        return grid

    def real_to_int(self, w: torch.Tensor) -> torch.Tensor:
        """w / scale + zero_point, before rounding (Brevitas's order of operations)."""
        return w / self.scale + self.zero_point

    def clamp(self, q: torch.Tensor) -> torch.Tensor:
        if self.int_low is None:
            return torch.clamp(q, self.qmin, self.qmax)
        return torch.minimum(torch.maximum(q, self.int_low), self.int_high)

    def nearest(self, w: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest integers (float-valued), as the plain quantizer computes them."""
        return self.clamp(torch.round(self.real_to_int(w)))

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.zero_point) * self.scale

    def harden(self, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The float weight to store for integers q: (q - z) * s, pinned elements keeping their value `w`."""
        hard = self.dequantize(q)
        if self.low is not None:
            hard = torch.maximum(torch.minimum(hard, self.high), self.low)
        if self.pinned is not None:
            hard = torch.where(self.pinned, w, hard)
        return hard


def _range_pins(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elements defining a range recomputed at every forward, and the interval [low, high] it spans.

    abs-max: the element of largest |w| (per channel or per tensor), interval [-absmax, absmax]; min-max:
    the smallest and the largest element, interval [min(w_min, 0), w_max] (Brevitas's NegativeMinOrZero).
    """
    flat = w.reshape(w.shape[0], -1) if spec.weight_per_channel else w.reshape(1, -1)
    pinned = torch.zeros_like(flat, dtype=torch.bool)
    rows = torch.arange(flat.shape[0], device=w.device)
    if spec.weight_symmetric:
        pinned[rows, flat.abs().argmax(1)] = True
        absmax = flat.abs().amax(1, keepdim=True)
        low, high = -absmax, absmax
    else:
        pinned[rows, flat.argmax(1)] = True
        lowest = flat.amin(1, keepdim=True)
        pinned[rows[lowest[:, 0] < 0], flat.argmin(1)[lowest[:, 0] < 0]] = True
        low, high = torch.clamp(lowest, max=0.0), flat.amax(1, keepdim=True)
    view = (-1,) + (1,) * (w.dim() - 1) if spec.weight_per_channel else (1,) * w.dim()
    return pinned.reshape(w.shape), low.reshape(view), high.reshape(view)


# ---- roundings: how a method parametrises the integers --------------------------------------------------

class Rounding(nn.Module):
    """A learnable choice of integer weights on a frozen grid (subclasses: LAC, EFRAP, AdaRound).

    `forward()` is the fake-quantized weight the layer computes with while learning (differentiable in the
    rounding's own parameters), `integers()` the hard integers it stands for, `penalty(progress)` what the
    method adds to the reconstruction loss (progress in [0, 1] through the layer's schedule).
    """

    hard_forward = False  # True when forward() is the fake-quantized weight of integers() (straight-through)

    def __init__(self, weight: torch.Tensor, grid: WeightGrid) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("w", weight.detach().clone())
        self.register_buffer("q_nearest", grid.nearest(self.w))

    def forward(self) -> torch.Tensor:
        raise NotImplementedError

    def integers(self) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self, progress: float) -> torch.Tensor | None:
        return None

    def _pin(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.grid.pinned is None else torch.where(self.grid.pinned, self.q_nearest, q)


class NearestRounding(Rounding):
    """Round to nearest, nothing learned: the start every loss is measured from."""

    hard_forward = True

    def forward(self) -> torch.Tensor:
        return self.grid.dequantize(self.q_nearest)

    def integers(self) -> torch.Tensor:
        return self.q_nearest


# ---- graph: units and streams ----------------------------------------------------------------------------

@dataclass
class Unit:
    """One reconstruction unit: a quantized layer and the nodes after it whose output is matched."""

    name: str                   # the quantized layer (module name)
    node: fx.Node               # its call_module node
    input_node: fx.Node         # the value entering it (before its input quantizer)
    chain: list[fx.Node]        # nodes after `node`, in graph order; the last one is the matched output
    partners: list[fx.Node]     # other inputs of the chain (residual terms), from hardened layers only
    next_layer: str | None      # quantized layer (or added quantizer) fed directly by the output: its input
                                # quantizer (or the added quantizer) applies
    bn: str | None              # the BatchNorm2d right after the layer (PDA's target statistics)
    next_added: bool = False    # next_layer is a quantizer `quantize_adds` added

    @property
    def end(self) -> fx.Node:
        return self.chain[-1] if self.chain else self.node

    def describe(self) -> str:
        ops = " -> ".join([self.name] + [_short(n) for n in self.chain])
        extra = f" (+ {', '.join(_short(n) for n in self.partners)})" if self.partners else ""
        following = "" if self.next_layer is None else \
            f" -> {self.next_layer}" + ("" if self.next_added else ".input_quant")
        return ops + extra + following


def _short(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx graph of the FP model (leaf modules: torch.nn's), InputError when it cannot be traced."""
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types for untraceable code
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
        raise InputError(f"layer-wise reconstruction needs a torch.fx-traceable model; tracing "
                         f"{type(model).__name__} failed with {type(err).__name__}: {reason}. Export the model "
                         f"with torch.onnx.export and pass the .onnx file as --model: it is converted into "
                         f"traceable torch modules") from err


def reconstruction_graph(fp_model: nn.Module, qmodel: nn.Module) -> tuple[fx.Graph, dict[str, nn.Module]]:
    """The graph both streams run (the FP model's, or the quantized model's own when `quantize_adds` added
    quantizers to it) and the FP model's modules by name (an added quantizer is an identity there)."""
    add_quants = tuple(getattr(qmodel, "qcb_add_quants", ()))
    graph = qmodel.graph if add_quants else trace(fp_model).graph
    return graph, {**dict(fp_model.named_modules()), **{name: nn.Identity() for name in add_quants}}


def build_units(graph: fx.Graph, modules: dict[str, nn.Module], layer_names: list[str],
                add_quants: Iterable[str] = ()) -> list[Unit]:
    """One `Unit` per quantized layer, in the given (execution) order; see the module docstring.
    `add_quants`: names of the quantizers `quantize_adds` added to the graph (a unit stops at one)."""
    layer_set = set(layer_names)
    add_quants = set(add_quants)
    node_of: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layer_set:
            if node.target in node_of:
                raise InputError(f"layer {node.target!r} is called more than once in the forward; "
                                 f"layer-wise reconstruction needs one call per quantized layer")
            node_of[node.target] = node
    deps: dict[fx.Node, frozenset[str]] = {}
    for node in graph.nodes:
        inherited = frozenset().union(*(deps[a] for a in node.all_input_nodes))
        deps[node] = inherited | {node.target} if node in node_of.values() else inherited

    units, done = [], set()
    for name in layer_names:
        node = node_of.get(name)
        if node is None:
            continue  # never called by the forward: reported by the caller
        if len(node.all_input_nodes) != 1:
            raise InputError(f"layer {name!r} takes {len(node.all_input_nodes)} inputs; expected one")
        done.add(name)
        chain, partners, end = [], [], node
        while len(end.users) == 1:
            user = next(iter(end.users))
            if user.op == "call_module" and user.target in add_quants:
                break
            others = [a for a in user.all_input_nodes if a is not end]
            if not _chainable(user, modules) or any(not deps[a] <= done for a in others):
                break
            chain.append(user)
            partners += [a for a in others if a not in partners]
            end = user
        bn = None
        first = next(iter(node.users)) if len(node.users) == 1 else None
        if first is not None and first in chain and first.op == "call_module" \
                and isinstance(modules[first.target], _BN):
            bn = first.target
        consumers = [u.target for u in end.users if u.op == "call_module" and u.target in layer_set | add_quants]
        next_layer = min(consumers, key=lambda c: layer_names.index(c) if c in layer_set else -1) \
            if consumers else None
        units.append(Unit(name, node, node.all_input_nodes[0], chain, partners, next_layer, bn,
                          next_layer in add_quants))
    return units


def _chainable(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _CHAIN_MODULES)
    if node.op == "call_function":
        return node.target in _CHAIN_FUNCTIONS or node.target in _ADD_FUNCTIONS
    if node.op == "call_method":
        return node.target in _CHAIN_METHODS
    return False


def _fetch_attr(root: nn.Module, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def run_node(node: fx.Node, env: dict, modules: dict[str, nn.Module], root: nn.Module):
    """Evaluate one fx node with its inputs from `env`, on the modules of `root` (FP or quantized model)."""
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return _fetch_attr(root, node.target)
    raise RuntimeError(f"cannot evaluate fx node {node.name} ({node.op})")


class Stream:
    """The node values of one model (FP or partially quantized) on fixed images, computed on demand.

    Every node is evaluated once, chunk by chunk, and its value is dropped as soon as all its consumers
    have been evaluated, so only the values still needed downstream (residual terms, the next unit's input)
    stay in memory. Requesting a node evaluates exactly its missing ancestors with the modules as they are
    at that moment: in the quantized stream, a layer is first evaluated after it has been hardened.
    """

    def __init__(self, graph: fx.Graph, root: nn.Module, images: torch.Tensor, chunk: int,
                 modules: dict[str, nn.Module] | None = None) -> None:
        self.root = root
        self.modules = dict(root.named_modules()) if modules is None else modules
        self.nodes = list(graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise InputError(f"the model's forward takes {len(placeholders)} inputs; expected one (images)")
        self.envs = [{placeholders[0]: images[i:i + chunk]} for i in range(0, len(images), chunk)]
        self.done = {placeholders[0]}
        self.waiting = {n: len(n.users) for n in self.nodes}

    @torch.no_grad()
    def values(self, nodes: Iterable[fx.Node]) -> list[torch.Tensor]:
        """The values of `nodes` on all images (concatenated over chunks)."""
        nodes = list(nodes)
        missing, stack = set(), [n for n in nodes if n not in self.done]
        while stack:
            node = stack.pop()
            if node in missing or node in self.done:
                continue
            missing.add(node)
            stack += [a for a in node.all_input_nodes if a not in self.done]
        order = sorted(missing, key=self.position.__getitem__)
        for env in self.envs:
            for node in order:
                env[node] = run_node(node, env, self.modules, self.root)
        self.done.update(order)
        result = [torch.cat([env[n] for env in self.envs]) if isinstance(self.envs[0][n], torch.Tensor)
                  and self.envs[0][n].dim() > 0 else self.envs[0][n] for n in nodes]
        for node in order:
            for arg in node.all_input_nodes:
                self.waiting[arg] -= 1
                if self.waiting[arg] == 0:
                    for env in self.envs:
                        env.pop(arg, None)
        return result


# ---- the loop -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReconOptions:
    """Schedule of the layer-wise reconstruction (per layer).

    Released schedule (LAC and EFRAP): steps=10000, batch_size=32, lr=1e-3, early_stop=False,
    keep_best=False. Every `check_every` steps the hard integers are scored on the whole cached set;
    `early_stop` ends a layer after `patience` checks without a relative improvement of `tol`, and
    `keep_best` hardens the best-scoring integers seen (round-to-nearest included) rather than the last.
    Both apply only to roundings whose training forward is already hard (LAC): a soft rounding (EFRAP,
    AdaRound) is only meaningful once its schedule has driven it to 0/1, so it runs all its steps.
    `match_act_quant`: pass the unit's output through the next layer's input quantizer (when one follows
    directly) before comparing with the FP output. `learn_act_range` (beyond the release): learn that
    quantizer's range (Brevitas's calibrated scale and zero point, straight-through) jointly with the
    weights, Adam at `act_lr` relative to the range (a step of 1e-2 moves it by about 1 %).
    """

    RELEASED: ClassVar[dict] = {"steps": 10000, "early_stop": False, "keep_best": False}  # `--released`

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    early_stop: bool = True
    check_every: int = 100
    patience: int = 3
    tol: float = 0.01
    keep_best: bool = True
    match_act_quant: bool = True
    learn_act_range: bool = False
    act_lr: float = 1e-2

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "check_every", "patience"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be a positive integer, got {value!r}")
        for key in ("lr", "act_lr"):
            if not (isinstance(getattr(self, key), (int, float)) and getattr(self, key) > 0):
                raise InputError(f"{key} must be a positive number, got {getattr(self, key)!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise InputError(f"tol must be a number >= 0, got {self.tol!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerRecord:
    """What happened to one layer: the unit, the losses (full cached set), steps, times, integers moved."""

    name: str
    unit: str
    bits: int
    steps: int
    loss_nearest: float          # reconstruction loss with round-to-nearest weights
    loss_final: float            # ... with the hardened weights
    changed: float               # share of integer weights that differ from round-to-nearest
    max_move: int                # largest |q - q_nearest| over the layer
    mismatches: int              # hardened integers the plain quantizer does not reproduce (expected 0)
    seconds: float
    pda_seconds: float = 0.0
    pda_loss: tuple[float, float] | None = None   # PDA statistics distance before / after the perturbation
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss of the hard integers) at checks

    def to_dict(self) -> dict:
        return asdict(self)


PerturbFn = Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], nn.Module],
                     tuple[torch.Tensor, tuple[float, float]]]


@dataclass
class _UnitData:
    x: torch.Tensor                          # quantized input of the layer, [N, ...]
    partners: list[torch.Tensor]
    target: torch.Tensor                     # FP output of the unit, [N, ...]


def reconstruct_(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor,
                 make_rounding: Callable[[torch.Tensor, WeightGrid], Rounding], options: ReconOptions, *,
                 perturb: PerturbFn | None = None, seed: int = 0,
                 chunk: int = 64, progress: bool = False) -> tuple[list[LayerRecord], list[str]]:
    """Learn and harden the integer weights of every quantized layer of `qmodel` in place.

    Args:
        fp_model: the FP reference (not modified), in eval mode, on the images' device.
        qmodel: a calibrated model from `quantize` of a copy of `fp_model` (its weights are overwritten).
        images: the defender's clean images, float [N, C, H, W] in [0, 1], on the device.
        make_rounding: builds the method's Rounding from a layer's float weight and frozen grid.
        options: the schedule.
        perturb: PDA, applied to the cached inputs of every layer followed by BatchNorm2d.
        chunk: images per forward when caching and scoring; 64 keeps a chunk's activations in cache (a full-set
            check of a ResNet-20 unit over 512 images: 76-81 ms at 64, 183-210 ms at 256, CPU).

    Returns:
        One LayerRecord per reconstructed layer, and the names of quantized layers the forward never calls
        (left at round-to-nearest).
    """
    spec = qmodel.qcb_spec
    qmodel.eval()
    fp_model.eval()
    layers = quantized_layers(qmodel)
    names = [name for name, _ in layers]
    add_quants = tuple(getattr(qmodel, "qcb_add_quants", ()))
    graph, fp_modules = reconstruction_graph(fp_model, qmodel)
    units = build_units(graph, fp_modules, names, add_quants)
    skipped = [name for name in names if name not in {u.name for u in units}]
    qmods = dict(qmodel.named_modules())
    fp_stream = Stream(graph, fp_model, images, chunk, modules=fp_modules)
    q_stream = Stream(graph, qmodel, images, chunk)
    generator = torch.Generator().manual_seed(seed)
    records = []
    for index, unit in enumerate(units):
        start = time.perf_counter()
        layer = qmods[unit.name]
        next_quant = None
        if options.match_act_quant and unit.next_layer is not None:
            following = qmods[unit.next_layer]
            proxy = following.act_quant if unit.next_added else following.input_quant
            next_quant = proxy if proxy.is_quant_enabled else None
        (target,) = fp_stream.values([unit.end])
        raw, *partners = q_stream.values([unit.input_node, *unit.partners])
        with torch.no_grad():
            x = torch.cat([_value(layer.input_quant(part)) for part in raw.split(chunk)])
        del raw
        # channels_last: oneDNN's convolutions run 2-3x faster on it on CPU (measured on ResNet-20 shapes)
        data = _UnitData(_fast_layout(x), [_fast_layout(p) for p in partners], _fast_layout(target))
        grid = WeightGrid.of(layer, spec)
        rounding = make_rounding(layer.weight.detach(), grid).to(images.device)
        act_params = list(next_quant.parameters()) if options.learn_act_range and next_quant is not None else []
        if next_quant is not None and not act_params:
            next_quant = FrozenActQuant.of(next_quant, target[:1])
        run = _UnitRunner(unit, layer, qmods, qmodel, next_quant)
        loss_nearest = run.loss(data, NearestRounding(layer.weight, grid)(), chunk)

        pda_seconds, pda_loss = 0.0, None
        if perturb is not None and unit.bn is not None:
            pda_start = time.perf_counter()
            nearest_weight = NearestRounding(layer.weight, grid)().detach()
            data.x, pda_loss = perturb(data.x, lambda inp: run.conv(inp, nearest_weight), qmods[unit.bn])
            pda_seconds = time.perf_counter() - pda_start

        keep_best = options.keep_best and rounding.hard_forward
        curve: list[tuple[int, float]] = []
        steps, best = _optimise(run, data, rounding, act_params, options,
                                options.early_stop and rounding.hard_forward, keep_best, generator, chunk,
                                desc=f"[{index + 1}/{len(units)}] {unit.name}" if progress else None, curve=curve)

        with torch.no_grad():
            if best is None:
                q = rounding.integers()
            else:
                q, act_values = best
                for param, value in zip(act_params, act_values):
                    param.copy_(value)
            layer.weight.copy_(grid.harden(q, layer.weight))
            brevitas_int = layer.quant_weight().int().to(q.dtype)
        mismatches = int((brevitas_int != q).sum().item())
        loss_final = run.loss(data, _value(layer.quant_weight()), chunk)
        move = (q - rounding.q_nearest).abs()
        records.append(LayerRecord(
            name=unit.name, unit=unit.describe(), bits=grid.bits,
            steps=steps, loss_nearest=loss_nearest, loss_final=loss_final,
            changed=float((move > 0).float().mean().item()), max_move=int(move.max().item()),
            mismatches=mismatches, seconds=time.perf_counter() - start, pda_seconds=pda_seconds,
            pda_loss=pda_loss, curve=curve))
        del data, target, partners, x
    return records, skipped


class FrozenActQuant(nn.Module):
    """A calibrated Brevitas activation quantizer as plain torch ops on its frozen range.

    Brevitas's proxy recomputes its scale and zero point and wraps a QuantTensor at every call and clamps with
    two `torch.where`s: measured on a unit's output (32x32x32x32, CPU), 4x the time of these ops without
    gradients and 1.5x with. Its range does not move within a layer unless `learn_act_range` trains it, so the
    loop reads scale, zero point and integer bounds once and applies Brevitas's IntQuant in the same order
    (x / s + z, round, clamp, (q - z) * s): the same values and gradients bit for bit.
    """

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.qmin, self.qmax = qmin, qmax

    @classmethod
    @torch.no_grad()
    def of(cls, proxy: nn.Module, sample: torch.Tensor) -> "FrozenActQuant":
        """The range `proxy` applies, read from its QuantTensor on `sample` (any input of the right layout)."""
        quant = proxy(sample)
        bits, narrow = int(quant.bit_width.item()), bool(proxy.is_narrow_range)
        qmin, qmax = (-(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1) if quant.signed else (0, 2 ** bits - 1)
        return cls(quant.scale.detach().clone(), quant.zero_point.detach().clone(), qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(round_ste(x / self.scale + self.zero_point), self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def _fast_layout(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _value(tensor) -> torch.Tensor:
    """The float value of a Brevitas QuantTensor (a plain tensor passes through)."""
    return getattr(tensor, "value", tensor)


class _UnitRunner:
    """Forward of one unit with a given weight: layer -> chain (with cached residual terms) -> next
    input quantizer; and the reconstruction loss."""

    def __init__(self, unit: Unit, layer: nn.Module, qmods: dict[str, nn.Module], root: nn.Module,
                 next_quant: nn.Module | None) -> None:
        self.unit, self.layer, self.qmods, self.root, self.next_quant = unit, layer, qmods, root, next_quant

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.layer.inner_forward_impl(x, weight, self.layer.bias)

    def forward(self, x: torch.Tensor, partners: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        env = dict(zip(self.unit.partners, partners))
        env[self.unit.node] = self.conv(x, weight)
        for node in self.unit.chain:
            env[node] = run_node(node, env, self.qmods, self.root)
        out = env[self.unit.end]
        return out if self.next_quant is None else _value(self.next_quant(out))

    @staticmethod
    def error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over batch and positions of the sum over channels of the squared difference."""
        return (out - target).pow(2).sum(1).mean()

    @torch.no_grad()
    def loss(self, data: _UnitData, weight: torch.Tensor, chunk: int) -> float:
        total, count = 0.0, 0
        for start in range(0, len(data.x), chunk):
            part = slice(start, start + chunk)
            out = self.forward(data.x[part], [p[part] for p in data.partners], weight)
            total += self.error(out, data.target[part]).item() * len(out)
            count += len(out)
        return total / count


def _optimise(run: _UnitRunner, data: _UnitData, rounding: Rounding, act_params: list[nn.Parameter],
              options: ReconOptions, early_stop: bool, keep_best: bool, generator: torch.Generator, chunk: int,
              desc: str | None, curve: list) -> tuple[int, tuple[torch.Tensor, list[torch.Tensor]] | None]:
    """Adam on the rounding's parameters (and the activation range's, `act_params`); returns the steps
    taken and, with `keep_best`, the integers and activation range with the lowest reconstruction loss on
    the whole cached set among the checks (round-to-nearest and the calibrated range included).

    Every `check_every` steps the hard integers are scored on all cached inputs (forward only, about the
    cost of a tenth of the steps between checks). Early stopping ends the layer after `patience` checks
    without a relative improvement of `tol` over the best score.
    """
    params = [p for p in rounding.parameters() if p.requires_grad]
    if not params:
        return 0, None
    groups = [{"params": params, "lr": options.lr}]
    groups += [{"params": [p], "lr": options.act_lr * max(p.detach().abs().max().item(), 1e-3)}
               for p in act_params]
    for param in act_params:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(groups)
    n = len(data.x)
    order, cursor = torch.randperm(n, generator=generator), 0
    bar = tqdm(total=options.steps, desc=desc, leave=True, dynamic_ncols=True, disable=desc is None,
               mininterval=1.0)
    checking = rounding.hard_forward  # the hard integers are what the loss is computed with: worth tracking

    def snapshot(q: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return q.clone(), [p.detach().clone() for p in act_params]

    best_state = snapshot(rounding.integers()) if checking else None
    best = run.loss(data, rounding.grid.dequantize(best_state[0]), chunk) if checking else math.inf
    if checking:
        curve.append((0, best))
    stale, step, window = 0, 0, 0.0
    try:
        for step in range(1, options.steps + 1):
            if cursor + options.batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor:cursor + options.batch_size].to(data.x.device)
            cursor += options.batch_size
            out = run.forward(data.x[idx], [p[idx] for p in data.partners], rounding())
            recon = run.error(out, data.target[idx])
            penalty = rounding.penalty(step / options.steps)
            loss = recon if penalty is None else recon + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window += recon.item()
            bar.update(1)
            if step % options.check_every:
                continue
            postfix = {"batch loss": f"{window / options.check_every:.4g}"}
            window = 0.0
            if checking:
                q = rounding.integers()
                score = run.loss(data, rounding.grid.dequantize(q), chunk)
                curve.append((step, score))
                postfix["loss"] = f"{score:.4g}"
                if score < best * (1.0 - options.tol):
                    stale = 0
                else:
                    stale += 1
                if score < best:
                    best = score
                    if keep_best:
                        best_state = snapshot(q)
            bar.set_postfix(postfix, refresh=False)
            if early_stop and stale >= options.patience:
                break
    finally:
        bar.close()
        for param in act_params:
            param.requires_grad_(False)
    return step, best_state if keep_best else None
