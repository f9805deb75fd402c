"""Running an exported model in onnxruntime: load it safely, predict, score CA / ASR / agreement, time it.

A deployment gate has to measure the file that ships, in the runtime that runs it, so everything here goes
through `onnxruntime.InferenceSession` on the CPU (ORT's default graph optimisations on, i.e. with the QDQ
fusions that turn the int8 graph into QLinearConv / QGemm kernels).

`OrtModel(path)` refuses, with one InputError line, a missing, empty, truncated or corrupt file and a model
whose single input is not float pixels [N, C, H, W]. `evaluate_onnx` returns a `VerifyReport` (CA, ASR and
RA on non-target images, argmax agreement with a reference, what the graph is, timings); `export.verify.verify`
adds pass/fail checks.

Examples:
    >>> report = evaluate_onnx("model.onnx", load_dataset("builtin"), trigger=parse_trigger("patch"),
    ...                        reference=qmodel)                                       # doctest: +SKIP
    >>> print(report.table())                                                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from export.provenance import describe_onnx, metadata_conflicts
from qcbdefense.data import Dataset, batches
from qcbdefense.errors import InputError, check_number, first_line
from qcbdefense.fileio import sha256_file
from qcbdefense.report import Report
from qcbdefense.results import fmt, format_table
from qcbdefense.runinfo import environment
from qcbdefense.scoring import Score, agreement, predict
from qcbdefense.triggers import Trigger, non_target

DEFAULT_BATCH = 500


class OrtModel:
    """An ONNX image classifier in an onnxruntime CPU session.

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: onnxruntime's default, one per core). Inter-op is 1 (sequential).
        optimized_path: also write the graph as optimised by ORT here (`SessionOptions.optimized_model_filepath`),
            to see which kernels it runs (QLinearConv, QGemm, ...).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 optimized_path: str | Path | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"ONNX model {self.path} does not exist")
        if not self.path.is_file():
            raise InputError(f"ONNX model {self.path} is not a file")
        if self.path.stat().st_size == 0:
            raise InputError(f"ONNX model {self.path} is empty")
        check_number("threads", threads, integer=True, low=1, optional=True)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings are about its own graph rewrites
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        self.threads = threads
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own types (InvalidProtobuf, Fail, InvalidGraph, ...)
            raise InputError(f"ONNX model {self.path} cannot be loaded by onnxruntime (corrupt, truncated or "
                             f"not ONNX): {first_line(err)}") from None
        self.load_seconds = time.perf_counter() - start
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type != "tensor(float)":
            described = ", ".join(f"{i.name} {i.type} {list(i.shape)}" for i in inputs)
            raise InputError(f"ONNX model {self.path} must take one float input of shape [N, C, H, W] "
                             f"(pixels in [0, 1]); it takes: {described}")
        if len(outputs) < 1 or len(outputs[0].shape) != 2:
            described = ", ".join(f"{o.name} {list(o.shape)}" for o in outputs)
            raise InputError(f"ONNX model {self.path} must output logits [N, classes]; it outputs: {described}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        shape = inputs[0].shape
        self.batch = shape[0] if isinstance(shape[0], int) else None    # None: dynamic
        self.image_shape = tuple(d if isinstance(d, int) else None for d in shape[1:])
        classes = outputs[0].shape[1]
        self.num_classes = classes if isinstance(classes, int) else None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def check_images(self, shape: Sequence[int], *, what: str = "the data") -> None:
        """InputError unless images of `shape` (C, H, W) fit the model's input."""
        shape = tuple(int(d) for d in shape)
        if len(shape) != 3 or any(want is not None and want != got for want, got in zip(self.image_shape, shape)):
            wanted = "x".join("?" if d is None else str(d) for d in self.image_shape)
            raise InputError(f"ONNX model {self.path} takes [N, {wanted.replace('x', ', ')}] images but "
                             f"{what} has {list(shape)}")

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits for float pixels [N, C, H, W] in [0, 1] (run in the model's own batch size if it is fixed)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.check_images(x.shape[1:], what="the input")
        if self.batch is None:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        parts = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            pad = self.batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            parts.append(self.session.run([self.output_name], {self.input_name: chunk})[0][:len(chunk) - pad])
        return np.concatenate(parts)

    def predict(self, x: torch.Tensor, *, batch_size: int = DEFAULT_BATCH,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Arg-max predictions for uint8 images `x` [N, C, H, W], optionally transformed (triggered) first;
        the same contract as `qcbdefense.scoring.predict`."""
        dummy = torch.zeros(len(x), dtype=torch.long)
        preds = [torch.from_numpy(self.logits(xb).argmax(1))
                 for xb, _ in batches(x, dummy, batch_size=batch_size, transform=transform)]
        return torch.cat(preds).long() if preds else torch.zeros(0, dtype=torch.long)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixels in, logits out, as a torch module would."""
        return torch.from_numpy(self.logits(x))


@dataclass
class Check:
    """One deployment threshold: `value` must be <= `limit` (kind "max") or >= `limit` (kind "min")."""

    name: str
    value: float
    limit: float
    kind: str
    passed: bool

    @classmethod
    def of(cls, name: str, value: float, limit: float, kind: str) -> "Check":
        passed = value <= limit if kind == "max" else value >= limit
        return cls(name, value, limit, kind, bool(passed))


@dataclass(frozen=True)
class VerifyReport(Report):
    """What one ONNX file did on one dataset in onnxruntime; `checks` are filled by `export.verify.verify`.

    `score`: the file's CA, ASR and RA (robust accuracy: triggered non-target images still given their true
    class; both None without a trigger), its image counts and its argmax agreement with the reference on the
    clean test images (None without a reference); `reference_score` the reference's CA / ASR / RA, and
    `agreement_triggered` the agreement on the triggered non-target images. `graph` is what the file's graph
    computes (`export.provenance`), and `metadata_conflicts` what its metadata claims that the graph
    contradicts.
    """

    VERSION = 2  # 2: the file's and the reference's figures are Scores
    KIND = "verify report"

    model: str
    sha256: str
    metadata: dict
    dataset: dict
    trigger: dict | None
    target: int
    score: Score
    graph: dict = field(default_factory=dict)
    metadata_conflicts: list[str] = field(default_factory=list)
    reference: str | None = None
    reference_score: Score | None = None
    agreement_triggered: float | None = None
    seconds: dict = field(default_factory=dict)
    images_per_second: float | None = None
    threads: int | None = None
    checks: list[Check] = field(default_factory=list)
    crosscheck: list[dict] | None = None
    throughput: dict | None = None  # `export.throughput.compare_throughput`, when asked for
    environment: dict = field(default_factory=environment)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def table(self) -> str:
        """The ONNX file and its reference, by row."""
        score, ref = self.score, self.reference_score
        rows = [[f"ONNX {Path(self.model).name}", score.ca, score.asr, score.ra, score.agreement]]
        if ref is not None:
            rows.append([f"reference {self.reference}", ref.ca, ref.asr, ref.ra, 100.0])
        return format_table(["model", "CA %", "ASR %", "RA %", "agree w/ ref %"], rows)

    def summary(self) -> str:
        meta = self.metadata
        claims = "" if self.metadata_conflicts or "qcbdefense.kind" not in meta else (
            f"; metadata: defence {meta.get('qcbdefense.defense', 'none')}, "
            f"{meta.get('qcbdefense.spec_label', 'no spec')}")
        lines = [f"{self.model} (graph: {self.graph.get('label', '?')}{claims}) on {self.dataset.get('name')}: "
                 f"{self.score.n_clean} clean, {self.score.n_poisoned} triggered images",
                 *(f"WARNING: {conflict}: the metadata does not describe this file" for conflict in
                   self.metadata_conflicts),
                 self.table()]
        if self.images_per_second is not None:
            lines.append(f"onnxruntime: {self.images_per_second:.0f} images/s "
                         f"({self.threads or 'default'} threads, load {self.seconds.get('load', 0.0):.2f} s)")
        if self.crosscheck:
            lines.append("cross-check: the FP model quantized by onnxruntime's quantize_static (not gated)")
            lines.append(format_table(["model", "weights", "acts", "CA %", "ASR %", "agree w/ FP %"],
                                      [[r["name"], r["weight_type"] or "float", r["activation_type"] or "float",
                                        r["ca"], r["asr"], r["agreement"]] for r in self.crosscheck]))
            limit = next((c.limit for c in self.checks if c.name == "ASR %"), None)
            fired = [r["name"] for r in self.crosscheck if limit is not None and r["asr"] is not None
                     and r["asr"] > limit]
            if fired:
                lines.append(f"NOTE: the trigger fires under onnxruntime's own quantizer ({', '.join(fired)}): "
                             f"ship only this file, never an ORT-quantized copy of the FP model")
        for check in self.checks:
            sign = "<=" if check.kind == "max" else ">="
            lines.append(f"{'PASS' if check.passed else 'FAIL'}  {check.name} {fmt(check.value)} {sign} "
                         f"{fmt(check.limit)}")
        if self.checks:
            lines.append("deployment gate: " + ("PASSED" if self.passed else
                                                f"FAILED ({', '.join(c.name for c in self.failed)})"))
        return "\n".join(lines)


def evaluate_onnx(path: str | Path | OrtModel, data: Dataset, *, trigger: Trigger | None = None, target: int = 0,
                  reference: nn.Module | str | Path | OrtModel | None = None, threads: int | None = None,
                  batch_size: int = DEFAULT_BATCH) -> VerifyReport:
    """CA, ASR (non-target images, when a trigger is given) and argmax agreement with `reference` of the ONNX
    model at `path`, run in onnxruntime on the test split of `data`.

    Args:
        reference: a PyTorch model (pixels in, logits out; e.g. the Brevitas fake-quant model the file was
            exported from, or the FP model) or another ONNX file; its CA/ASR are reported beside. Where a
            fake-quant model and the file disagree, the model's answer is computed again in float64 (`_reference`).
        threads: onnxruntime intra-op threads (None: ORT's default).
    """
    model = path if isinstance(path, OrtModel) else OrtModel(path, threads=threads)
    model.check_images(data.test_x.shape[1:], what=f"the data {data.name!r}")
    if model.num_classes is not None and model.num_classes != data.num_classes:
        raise InputError(f"ONNX model {model.path} has {model.num_classes} outputs but the data {data.name!r} has "
                         f"{data.num_classes} classes")
    if trigger is not None and not 0 <= target < data.num_classes:
        raise InputError(f"target must be a class index in 0..{data.num_classes - 1}, got {target}")
    describe, ref_predict, ref_exact = _reference(reference)
    x, y = data.test_x, data.test_y
    xp, yp = non_target(x, y, target) if trigger is not None else (x[:0], y[:0])
    seconds = {"load": model.load_seconds}

    start = time.perf_counter()
    preds = model.predict(x, batch_size=batch_size)
    seconds["clean"] = time.perf_counter() - start
    poisoned = None
    if trigger is not None and len(xp):
        start = time.perf_counter()
        poisoned = model.predict(xp, batch_size=batch_size, transform=trigger.apply)
        seconds["triggered"] = time.perf_counter() - start
    ca = 100.0 * (preds == y).float().mean().item()
    asr, ra = (None, None) if trigger is None else _triggered(poisoned, yp, target)
    graph = describe_onnx(model.path)
    reference_score, agree, agree_triggered = None, None, None
    if ref_predict is not None:
        start = time.perf_counter()
        ref_preds = _settled(ref_predict, ref_exact, x, None, preds)
        agree = agreement(preds, ref_preds)
        ref_asr, ref_ra = (None, None) if trigger is None else (0.0, 0.0)
        if poisoned is not None:
            ref_poisoned = _settled(ref_predict, ref_exact, xp, trigger.apply, poisoned)
            ref_asr, ref_ra = _triggered(ref_poisoned, yp, target)
            agree_triggered = agreement(poisoned, ref_poisoned)
        reference_score = Score(ca=100.0 * (ref_preds == y).float().mean().item(), asr=ref_asr, ra=ref_ra)
        seconds["reference"] = time.perf_counter() - start
    onnx_images = len(y) + (len(xp) if poisoned is not None else 0)
    return VerifyReport(model=str(model.path), sha256=sha256_file(model.path), metadata=model.metadata,
                        dataset=data.describe(), trigger=None if trigger is None else trigger.to_dict(),
                        target=target, score=Score(ca=ca, asr=asr, ra=ra, agreement=agree, n_clean=len(y),
                                                   n_poisoned=len(xp)),
                        graph=graph.to_dict(), metadata_conflicts=metadata_conflicts(model.metadata, graph),
                        reference=describe if ref_predict is not None else None, reference_score=reference_score,
                        agreement_triggered=agree_triggered, threads=threads, seconds=seconds,
                        images_per_second=onnx_images / max(seconds["clean"] + seconds.get("triggered", 0.0), 1e-9))


def measure_throughput(models: Mapping[str, str | Path], *, batch_sizes: Sequence[int] = (1, 64),
                       threads: int = 2, rounds: int = 10, seconds: float = 0.5,
                       images: torch.Tensor | None = None) -> list[dict]:
    """Images per second of several ONNX files measured side by side, for a fair ratio on a busy machine.

    Each of `rounds` rounds runs every (batch size, model) pair for about `seconds` after one warm-up call,
    interleaved, so a load spike from another process hits all models alike. Returns one row per pair with
    the median and the best round (images/s); compare medians, and best rounds as a check on noise.
    `images`: float pixels to feed (default: seeded uniform noise; the kernels do not care).
    """
    sessions = {name: OrtModel(path, threads=threads) for name, path in models.items()}
    biggest = max(batch_sizes)
    if images is None:
        images = torch.rand(biggest, *next(iter(sessions.values())).image_shape,
                            generator=torch.Generator().manual_seed(0))
    feeds = {b: np.ascontiguousarray(images[:b].numpy(), dtype=np.float32) for b in batch_sizes}
    rates: dict[tuple[int, str], list[float]] = {(b, n): [] for b in batch_sizes for n in sessions}
    for _ in range(rounds):
        for b in batch_sizes:
            for name, model in sessions.items():
                model.logits(feeds[b])  # warm-up: first-call allocations stay out of the timing
                count, start = 0, time.perf_counter()
                while True:
                    model.logits(feeds[b])
                    count += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= seconds:
                        break
                rates[(b, name)].append(count * b / elapsed)
    return [{"model": name, "batch": b, "threads": threads, "median": statistics.median(r), "best": max(r),
             "rounds": rounds} for (b, name), r in rates.items()]


def throughput_table(rows: list[dict], *, baseline: str | None = None) -> str:
    """`measure_throughput` rows as a table, with the speed-up over `baseline` (a model name) per batch size."""
    base = {r["batch"]: r for r in rows if r["model"] == baseline}
    table = []
    for r in rows:
        ref = base.get(r["batch"])
        table.append([r["model"], r["batch"], r["median"], r["best"],
                      None if ref is None else r["median"] / ref["median"],
                      None if ref is None else r["best"] / ref["best"]])
    return format_table(["model", "batch", "img/s median", "img/s best", "x median", "x best"], table)


# ---- helpers ---------------------------------------------------------------------------------------------

def _triggered(preds: torch.Tensor | None, labels: torch.Tensor, target: int) -> tuple[float, float]:
    """ASR and RA (%) of predictions on triggered non-target images (0, 0 when there are none)."""
    if preds is None or len(preds) == 0:
        return 0.0, 0.0
    return 100.0 * (preds == target).float().mean().item(), 100.0 * (preds == labels).float().mean().item()


def _reference(reference) -> tuple[str | None, Callable | None, Callable | None]:
    """How to describe `reference`, predict with it, and (a fake-quant model) predict with it exactly: a float64
    copy. Its float32 sums round where onnxruntime's int32 accumulations do not, and a value within that rounding of
    a requantization tie rounds the other way, a flip that spreads through the layers: on an attacked ResNet-20's
    w8a8-deploy file, 42 % of 1,000 test images had bit-identical logits against the float32 model, 99.4 % against
    the float64 one (BENCHMARKS.md, deployment int8). The float64 model is 5x slower, so it settles only the images
    where the float32 model and the file disagree (`_settled`)."""
    if reference is None:
        return None, None, None
    if isinstance(reference, nn.Module):
        name = type(reference).__name__
        quantized = getattr(reference, "qcb_spec", None)

        def run(x: torch.Tensor, transform) -> torch.Tensor:
            return predict(reference, x, transform=transform)

        if quantized is None:
            return f"torch {name}", run, None

        @functools.cache
        def in_float64() -> nn.Module:  # copied only when the file and the model first disagree
            return copy.deepcopy(reference).double()

        return (f"torch {name} fake-quant {quantized.name} (disagreements settled in float64)", run,
                lambda x, transform: predict(in_float64(), x, transform=transform, dtype=torch.float64))
    model = reference if isinstance(reference, OrtModel) else OrtModel(reference)
    return f"onnx {model.path.name}", lambda x, transform: model.predict(x, transform=transform), None


def _settled(run: Callable, exact: Callable | None, x: torch.Tensor, transform, file_preds: torch.Tensor
             ) -> torch.Tensor:
    """The reference's predictions for images `x`; where they differ from the file's, `exact`'s (when given)."""
    preds = run(x, transform)
    differ = (preds != file_preds).nonzero().flatten()
    if exact is not None and len(differ):
        preds[differ] = exact(x[differ], transform)
    return preds
