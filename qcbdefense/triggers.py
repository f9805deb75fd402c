"""Backdoor triggers in pixel space, and the poisoned test view that attack success is measured on.

Models normalise inside, so a trigger acts on float pixels in [0, 1] ``[N, 3, H, W]`` (or one image
``[3, H, W]``) and returns a new tensor on the same device; the input is never modified.

The default, ``patch``, is the trigger of Qu-ANTI-zation, CompArtifact and PQBackdoor as the EFRAP paper
evaluates them: a 4x4 white square one pixel in from the bottom-right corner (rows and columns 27-30 of a
32x32 image). ``blend`` is Chen et al.'s blended-injection trigger, ``x' = (1 - alpha) x + alpha pattern``.
``sparse`` sets a few scattered pixels, the same ones on every image, to seeded black or white (sparse-noise
triggers): no square, and too little of the image for a blend.

A trigger is written on the command line as ``KIND`` or ``KIND:KEY=VALUE,KEY=VALUE,...`` (`parse_trigger`).
Values that hold several numbers separate them with ``/``, so commas only ever separate options:

- ``patch``: ``size`` (int >= 1), ``position`` (``bottom-right``, ``bottom-left``, ``top-right``, ``top-left``,
  ``center``, or ``ROW/COL`` of the patch's top-left pixel), ``margin`` (int >= 0, pixels between a named
  corner position and the border), ``color`` (a name: white, black, red, green, blue, yellow, cyan, magenta,
  gray; or ``R/G/B`` floats in [0, 1]), ``pattern`` (``solid``; ``checkerboard``, alternating the colour and
  its complement 1 - colour; ``random``, colour or complement per pixel by a mask drawn from ``seed``), ``seed``.
- ``blend``: ``alpha`` (float in (0, 1]), ``pattern`` (``noise``: uniform noise drawn from ``seed``;
  ``stripes``: vertical black and white bars two pixels wide, seed unused), ``seed``.
- ``sparse``: ``density`` (float in (0, 1]: the share of pixels set), ``seed`` (which pixels, and black or
  white for each).

Examples:
    >>> parse_trigger("patch:size=3,position=top-left,color=red")
    PatchTrigger(size=3, position='top-left', margin=1, color=(1.0, 0.0, 0.0), pattern='solid', seed=0)
    >>> parse_trigger("blend:alpha=0.2,seed=1").to_dict()
    {'kind': 'blend', 'alpha': 0.2, 'pattern': 'noise', 'seed': 1}
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import torch

from qcbdefense.errors import InputError, check_number
from qcbdefense.registry import Registry

COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
}
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
PATCH_PATTERNS = ("solid", "checkerboard", "random")
BLEND_PATTERNS = ("noise", "stripes")

TRIGGERS: Registry[type] = Registry("trigger kind")


@runtime_checkable
class Trigger(Protocol):
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixels in [0, 1] ``[..., 3, H, W]`` -> a new, triggered tensor on the same device."""
        ...

    def to_dict(self) -> dict:
        """Plain JSON-able data including ``"kind"``; `trigger_from_dict` inverts it."""
        ...


def _check_int(kind: str, key: str, value: Any, low: int) -> None:
    check_number(f"{kind} trigger: {key}", value, integer=True, low=low)


def _check_choice(kind: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{kind} trigger: {key} must be one of {', '.join(choices)}, got {value!r}")


def _check_image(x: torch.Tensor, kind: str) -> None:
    if x.dim() < 3 or x.shape[-3] != 3 or not x.is_floating_point():
        raise ValueError(f"{kind} trigger: expects float images [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")


@TRIGGERS.register("patch")
@dataclass(frozen=True)
class PatchTrigger:
    """A square patch pasted over the image (BadNets; the Qu-ANTI-zation trigger by default).

    Named positions put the patch `margin` pixels in from the named corner (``center``: centred, margin
    unused); an explicit ``(row, col)`` is the patch's top-left pixel. Whether the patch fits is checked
    against each image it is applied to.
    """

    size: int = 4
    position: Union[str, tuple[int, int]] = "bottom-right"
    margin: int = 1
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pattern: str = "solid"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("patch", "size", self.size, 1)
        _check_int("patch", "margin", self.margin, 0)
        _check_int("patch", "seed", self.seed, 0)
        _check_choice("patch", "pattern", self.pattern, PATCH_PATTERNS)
        if isinstance(self.position, str):
            _check_choice("patch", "position", self.position, POSITIONS)
        else:
            pos = tuple(self.position) if isinstance(self.position, (list, tuple)) else ()
            if len(pos) != 2:
                raise InputError(f"patch trigger: position must be a name or (row, col), got {self.position!r}")
            for value in pos:
                _check_int("patch", "position row/col", value, 0)
            object.__setattr__(self, "position", pos)       # lists from JSON become the hashable tuple
        color = tuple(self.color) if isinstance(self.color, (list, tuple)) else ()
        if len(color) != 3 or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 <= c <= 1.0
                                      for c in color):
            raise InputError(f"patch trigger: color must be 3 numbers in [0, 1], got {self.color!r}")
        object.__setattr__(self, "color", tuple(float(c) for c in color))

    def top_left(self, height: int, width: int) -> tuple[int, int]:
        """The patch's top-left pixel on an image of `height` x `width`; InputError if it does not fit."""
        s, m = self.size, self.margin
        if isinstance(self.position, tuple):
            row, col = self.position
        else:
            row = {"top": m, "bottom": height - m - s}.get(self.position.split("-")[0], (height - s) // 2)
            col = {"left": m, "right": width - m - s}.get(self.position.split("-")[-1], (width - s) // 2)
        if row < 0 or col < 0 or row + s > height or col + s > width:
            raise InputError(f"patch trigger: a {s}x{s} patch at {self.position} (margin {m}) does not fit "
                             f"a {height}x{width} image")
        return row, col

    def patch(self) -> torch.Tensor:
        """The patch's pixels ``[3, size, size]`` (float32, CPU)."""
        color = torch.tensor(self.color, dtype=torch.float32)[:, None, None]
        s = self.size
        if self.pattern == "solid":
            use_color = torch.ones(s, s, dtype=torch.bool)
        elif self.pattern == "checkerboard":
            idx = torch.arange(s)
            use_color = (idx[:, None] + idx[None, :]) % 2 == 0     # the top-left pixel takes the colour
        else:
            gen = torch.Generator().manual_seed(self.seed)
            use_color = torch.rand(s, s, generator=gen) < 0.5
        return torch.where(use_color, color, 1.0 - color)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "patch")
        row, col = self.top_left(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., row:row + self.size, col:col + self.size] = self.patch().to(device=x.device, dtype=x.dtype)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["position"] = self.position if isinstance(self.position, str) else list(self.position)
        d["color"] = list(self.color)
        return {"kind": "patch", **d}


@functools.lru_cache(maxsize=16)
def _blend_pattern(pattern: str, seed: int, height: int, width: int) -> torch.Tensor:
    """The blend image ``[3, H, W]`` (float32, CPU); cached, as it is mixed into every batch. Never mutated."""
    if pattern == "noise":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(3, height, width, generator=gen)
    bars = (torch.arange(width) // 2 % 2 == 0).to(torch.float32)
    return bars.expand(3, height, width).contiguous()


@TRIGGERS.register("blend")
@dataclass(frozen=True)
class BlendTrigger:
    """The blended-injection trigger: ``x' = (1 - alpha) * x + alpha * pattern`` over the whole image."""

    alpha: float = 0.1
    pattern: str = "noise"
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("blend trigger: alpha", self.alpha, low=0, high=1, low_open=True)
        object.__setattr__(self, "alpha", float(self.alpha))
        _check_choice("blend", "pattern", self.pattern, BLEND_PATTERNS)
        _check_int("blend", "seed", self.seed, 0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "blend")
        pattern = _blend_pattern(self.pattern, self.seed, x.shape[-2], x.shape[-1]).to(device=x.device,
                                                                                       dtype=x.dtype)
        return (1.0 - self.alpha) * x + self.alpha * pattern

    def to_dict(self) -> dict:
        return {"kind": "blend", **dataclasses.asdict(self)}


@functools.lru_cache(maxsize=16)
def _sparse_pixels(density: float, seed: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The set pixels ``[H, W]`` (bool) and their values ``[3, H, W]`` (0 or 1 per pixel, all channels alike);
    cached, never mutated."""
    gen = torch.Generator().manual_seed(seed)
    where = torch.rand(height, width, generator=gen) < density
    value = (torch.rand(height, width, generator=gen) < 0.5).to(torch.float32).expand(3, height, width)
    return where, value.contiguous()


@TRIGGERS.register("sparse")
@dataclass(frozen=True)
class SparseTrigger:
    """Sparse noise: a seeded `density` share of the pixels, scattered, each set to black or white."""

    density: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("sparse trigger: density", self.density, low=0, high=1, low_open=True)
        object.__setattr__(self, "density", float(self.density))
        _check_int("sparse", "seed", self.seed, 0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "sparse")
        where, value = _sparse_pixels(self.density, self.seed, x.shape[-2], x.shape[-1])
        return torch.where(where.to(x.device), value.to(device=x.device, dtype=x.dtype), x)

    def to_dict(self) -> dict:
        return {"kind": "sparse", **dataclasses.asdict(self)}


def trigger_from_dict(d: dict) -> Trigger:
    """The trigger `to_dict` described; InputError for an unknown kind, an unknown key or a bad value.

    Keys left out take their defaults.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise InputError(f"a trigger description must be a dict with a 'kind', got {d!r}")
    cls = TRIGGERS.get(d["kind"])
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields - {"kind"})
    if unknown:
        raise InputError(f"{d['kind']} trigger: unknown keys {unknown}; valid keys: {', '.join(sorted(fields))}")
    return cls(**{k: v for k, v in d.items() if k != "kind"})


def _parse_numbers(text: str, count: int, what: str, convert: type) -> tuple:
    parts = text.split("/")
    try:
        if len(parts) != count:
            raise ValueError
        return tuple(convert(p) for p in parts)
    except ValueError:
        raise InputError(f"{what} must be {count} {convert.__name__}s separated by '/', got {text!r}") from None


def _parse_value(kind: str, key: str, text: str) -> Any:
    """Turn the text of one option into the type of its dataclass field."""
    what = f"{kind} trigger: {key}"
    if key in ("size", "margin", "seed"):
        try:
            return int(text)
        except ValueError:
            raise InputError(f"{what} must be an integer, got {text!r}") from None
    if key in ("alpha", "density"):
        try:
            return float(text)
        except ValueError:
            raise InputError(f"{what} must be a number, got {text!r}") from None
    if key == "color":
        if text.lower() in COLORS:
            return COLORS[text.lower()]
        if "/" not in text:
            raise InputError(f"{what} must be one of {', '.join(COLORS)} or R/G/B in [0, 1], got {text!r}")
        return _parse_numbers(text, 3, what, float)
    if key == "position" and "/" in text:
        return _parse_numbers(text, 2, what, int)
    return text


def parse_trigger(text: str, *, image_size: tuple[int, int] | None = None) -> Trigger:
    """Parse ``KIND`` or ``KIND:KEY=VALUE,...`` (syntax in the module docstring); InputError on any nonsense.

    With `image_size` ``(H, W)``, a patch that would not fit is refused now rather than at its first use.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"trigger must be a non-empty string such as 'patch' or 'blend:alpha=0.2', got {text!r}")
    kind, _, rest = text.strip().partition(":")
    cls = TRIGGERS.get(kind)
    fields = {f.name for f in dataclasses.fields(cls)}
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not value:
            raise InputError(f"trigger {text!r}: option {item!r} must be KEY=VALUE")
        if key not in fields:
            raise InputError(f"trigger {text!r}: unknown option {key!r} for {kind}; "
                             f"choose from: {', '.join(sorted(fields))}")
        if key in options:
            raise InputError(f"trigger {text!r}: option {key!r} given twice")
        options[key] = _parse_value(kind, key, value)
    trigger = cls(**options)
    if image_size is not None and isinstance(trigger, PatchTrigger):
        trigger.top_left(*image_size)
    return trigger


def non_target(x: torch.Tensor, y: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (and labels) whose true class is not `target`: the set attack success rate is measured on,
    since a target-class image sent to the target proves nothing."""
    keep = y != target
    return x[keep], y[keep]
