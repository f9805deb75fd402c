"""The one training loop every trainer shares: clean training and each attack differ only in their loss.

`fit` owns what they have in common: SGD/Adam with a per-step cosine schedule, seeded shuffling and
augmentation, a progress bar, a checkpoint after every epoch and exact resumption from it.

Training length is epochs or a budget of optimizer steps. A recipe tuned on one dataset means a number of
updates: five CIFAR-10 epochs at batch 128 are 5 x 391 = 1955 steps, but five epochs of a 13,000-image set
are 510, a quarter of the updates. With `steps`, the run takes exactly that many steps whatever the
dataset's size (the last epoch stops part-way), and the cosine schedule spans them.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from qcbdefense.checkpoints import read_torch_file, save_torch
from qcbdefense.data import Dataset, augment, batches, seeded_subset
from qcbdefense.errors import InputError, RunFailed, check_number, first_line

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by clean training and the attacks."""

    epochs: int = 10
    steps: int | None = None            # an optimizer-step budget; when set it, not `epochs`, is the length
    batch_size: int = 128
    optimizer: str = "sgd"              # "sgd" (nesterov momentum) or "adam"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0          # linear warm-up before the cosine decay
    augment: bool = True                # random crop (4-pixel padding) + horizontal flip
    train_subset: int | None = None     # train on a seeded random subset of this many images
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("epochs", self.epochs, integer=True, low=1)
        check_number("batch size", self.batch_size, integer=True, low=1)
        check_number("steps", self.steps, integer=True, low=1, optional=True)
        check_number("learning rate", self.lr, low=0, low_open=True)
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        check_number("train subset", self.train_subset, integer=True, low=1, kind="a number of images",
                     optional=True)

    def to_dict(self) -> dict:
        return asdict(self)

    def updated(self, **changes) -> "TrainConfig":
        """`dataclasses.replace`, where giving `epochs` without `steps` drops a step budget: a caller who
        asks for N epochs of a recipe expressed in steps means N epochs."""
        if "epochs" in changes and "steps" not in changes:
            changes["steps"] = None
        return replace(self, **changes)

    def schedule(self, n_images: int) -> tuple[int, int, int]:
        """(steps per epoch, epochs, total steps) of this config on `n_images` training images."""
        per_epoch = math.ceil(n_images / self.batch_size)
        if self.steps is None:
            return per_epoch, self.epochs, per_epoch * self.epochs
        return per_epoch, math.ceil(self.steps / per_epoch), self.steps


@dataclass
class Batch:
    """A training batch of un-augmented pixels; `augment` draws from the epoch's seeded generator.

    Losses that trigger images (the attacks) apply the trigger first and augment after, as the papers do.
    """

    x: torch.Tensor
    y: torch.Tensor
    augment: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    seconds: float
    metrics: dict = field(default_factory=dict)
    steps: int = 0  # optimizer steps taken in this epoch


LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module], dict]


def training_images(data: Dataset, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set, or the seeded subset of it the config asks for."""
    if config.train_subset is None or config.train_subset >= len(data.train_y):
        return data.train_x, data.train_y
    idx = seeded_subset(len(data.train_y), config.train_subset, config.seed)
    return data.train_x[idx], data.train_y[idx]


def _make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                           weight_decay=config.weight_decay)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def fit(model: nn.Module, data: Dataset, config: TrainConfig, *, loss_fn: LossFn, evaluate_fn: EvalFn,
        out_dir: str | Path | None = None, resume: bool = False, device: str | torch.device = "cpu",
        params: Iterable[nn.Parameter] | None = None, after_step: Callable[[], None] | None = None,
        train_module: nn.Module | None = None, desc: str = "train",
        before_epoch: Callable[[int], None] | None = None) -> list[EpochRecord]:
    """Train `model` in place for `config.steps` steps or `config.epochs` epochs; returns one record per epoch.

    `loss_fn(train_module, batch)` gives the loss (train_module defaults to `model`; the attacks pass a
    quantized view that shares its weights). `evaluate_fn(model)` returns the metrics logged each epoch.
    `after_step` runs after every optimizer step (PQBackdoor's projection); `before_epoch(epoch)` runs at the
    start of every epoch, after the modules are put in training mode and after a resumed checkpoint is
    loaded (the attacks recalibrate their quantizers there, or freeze BN). With `out_dir`, a checkpoint
    is written after every epoch; `resume=True` continues from it and requires the same config.
    """
    device = torch.device(device)
    model.to(device)
    train_module = model if train_module is None else train_module.to(device)
    optimizer = _make_optimizer(model.parameters() if params is None else params, config)
    x, y = training_images(data, config)
    steps_per_epoch, epochs, total_steps = config.schedule(len(y))
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    history: list[EpochRecord] = []
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None

    if resume:
        if state_path is None or not state_path.is_file():
            raise InputError(f"--resume: no checkpoint {state_path} to resume from")
        state = read_torch_file(state_path)
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict)
                and {"model", "optimizer", "history"} <= state.keys()):
            raise InputError(f"--resume: {state_path} is not a training state written by qcbdefense")
        saved = {"steps": None, **state["config"]}  # checkpoints from before step budgets have no "steps"
        if saved != config.to_dict():
            changed = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v)
            raise InputError(f"--resume: the checkpoint in {out_dir} was made with other settings ({', '.join(changed)})")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history = [EpochRecord(**r) for r in state["history"]]
        except (RuntimeError, ValueError, TypeError, KeyError) as err:
            raise InputError(f"--resume: {state_path} does not fit this model and optimiser "
                             f"({first_line(err)})") from None

    for epoch in range(len(history) + 1, epochs + 1):
        model.train()
        train_module.train()
        if before_epoch is not None:
            before_epoch(epoch)
        gen = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
        start, running, seen = time.perf_counter(), 0.0, 0
        first = (epoch - 1) * steps_per_epoch
        taken = min(steps_per_epoch, total_steps - first)
        epoch_batches = batches(x, y, batch_size=config.batch_size, shuffle=True, generator=gen, device=device)
        bar = tqdm(itertools.islice(epoch_batches, taken), total=taken, desc=f"{desc} {epoch}/{epochs}",
                   leave=False, dynamic_ncols=True)
        for i, (xb, yb) in enumerate(bar):
            lr = _lr_at(first + i, total_steps, warmup_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            aug = (lambda t: augment(t, generator=gen)) if config.augment else (lambda t: t)
            loss = loss_fn(train_module, Batch(xb, yb, aug))
            if not torch.isfinite(loss):
                bar.close()  # clears its line, so the error stands alone on the terminal
                raise RunFailed(f"training diverged: the loss became {loss.item()} at epoch {epoch}, step {i}; "
                                f"lower the learning rate (--lr {config.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            running += loss.item() * len(yb)
            seen += len(yb)
            bar.set_postfix(loss=f"{running / seen:.3f}", lr=f"{lr:.4f}")
        bar.close()
        model.eval()
        record = EpochRecord(epoch, running / max(seen, 1), time.perf_counter() - start, evaluate_fn(model),
                             taken)
        history.append(record)
        print(f"{desc} epoch {epoch}/{epochs} ({first + taken}/{total_steps} steps): loss {record.loss:.4f}, "
              + ", ".join(f"{k} {v:.2f}" for k, v in record.metrics.items() if isinstance(v, float))
              + f" ({record.seconds:.0f} s)", flush=True)
        if state_path is not None:
            save_torch({"config": config.to_dict(), "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "history": [asdict(r) for r in history]}, state_path)
    return history
