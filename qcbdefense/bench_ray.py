"""`bench --ray`: the bench's steps as Ray tasks, side by side on a local Ray or across a cluster.

Every step of the sequential bench (`bench.plan`: the clean model, each attack, each defence cell, each scan)
becomes one Ray task that runs `bench.run_step`, the function the sequential bench runs, with its CPU and
GPU needs declared; a step waits for the step whose model it starts from, and nothing else. So the cache is
the sequential bench's (every step writes its own folder and `done.json` last; a rerun skips what is done and
resumes an interrupted training), and the results files come from the same `bench.finish`. Several cells share
one GPU when a task asks for a fraction of it (`gpus_per_task=0.25`: four at once).

On a cluster (`address`), `out` must be a folder every node sees (a shared filesystem); the data travels
through Ray's object store. Progress: Ray prefixes each task's output with its process and node, and the
driver logs each step as it finishes, with the node, process and GPUs it ran on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from qcbdefense.bench import BenchConfig, BenchRow, BenchStep, check_seeds, finish, plan, run_step
from qcbdefense.errors import InputError, QcbError
from qcbdefense.fileio import write_json


def run_bench_on_ray(config: BenchConfig, out: str | os.PathLike, *, device: str | torch.device = "cpu",
                     address: str | None = None, num_cpus: int | None = None, cpus_per_task: float = 1,
                     gpus_per_task: float | None = None, log: Callable[[str], None] = print,
                     seeds: int = 1) -> list[BenchRow]:
    """Run (or resume) the bench into `out` as Ray tasks; returns its rows and writes results.{md,csv,json}.

    `address`: a running cluster ("auto": the one RAY_ADDRESS or `ray start` names; "ray://HOST:10001", ...);
    None starts a local Ray of its own with `num_cpus` (default: all), whatever cluster is already running.
    Each task asks for `cpus_per_task` CPUs (its torch threads) and `gpus_per_task` GPUs (default 1 when
    `device` is CUDA, else 0). `seeds`: as in `run_bench`.
    """
    check_seeds(seeds)
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'qcbdefense[cluster]'") from None
    from qcbdefense.data import load_dataset

    device = str(device)
    if gpus_per_task is None:
        gpus_per_task = 1 if device.startswith("cuda") else 0
    if cpus_per_task <= 0 or gpus_per_task < 0:
        raise InputError(f"a task needs > 0 CPUs and >= 0 GPUs, got {cpus_per_task} and {gpus_per_task}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.to_dict())
    data = load_dataset(config.data)  # decoded once here (the cache filled before any task reads it)
    start = time.perf_counter()
    # Ray's own default (address None) joins RAY_ADDRESS's or `ray start`'s cluster, which refuses num_cpus
    ray.init(address="local" if address is None else address, num_cpus=num_cpus if address is None else None,
             include_dashboard=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task)(_run_task)
        data_ref = ray.put(data)
        threads = max(1, int(cpus_per_task))
        refs, what = {}, {}
        for step in plan(config, seeds):
            upstream = [refs[step.needs]] if step.needs is not None else []
            refs[step.key] = task.options(name=step.key).remote(config, step, str(out), data_ref, device, threads,
                                                                *upstream)
            what[refs[step.key]] = step
        log(f"[ray] {len(refs)} steps on {ray.cluster_resources().get('CPU', 0):g} CPUs, "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs; each task {cpus_per_task:g} CPU, "
            f"{gpus_per_task:g} GPU")
        pending = list(refs.values())
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            step = what[ready[0]]
            done = _result(ray, ready[0])
            for line in done["lines"]:
                log(line)
            log(f"[ray] {step.key} finished on {done['node']} (pid {done['pid']}"
                + (f", GPU {','.join(map(str, done['gpus']))}" if done["gpus"] else "")
                + f") in {done['seconds']:.1f} s; {len(pending)} to go")
    finally:
        ray.shutdown()
    return finish(config, out, time.perf_counter() - start, seeds)


def _run_task(config: BenchConfig, step: BenchStep, out: str, data, device: str, threads: int,
              *upstream: dict) -> dict:
    """A Ray task: one bench step in a worker; returns its log lines and where it ran."""
    import ray

    torch.set_num_threads(threads)
    lines: list[str] = []
    began = time.perf_counter()
    run_step(config, step, Path(out), data, device, lines.append)
    return {"lines": lines, "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()], "seconds": time.perf_counter() - began}


def _result(ray, ref) -> dict:
    """A finished task's result; a step's expected failure (bad input) is raised as itself, as the
    sequential bench raises it."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, QcbError):
            raise err.cause from None
        raise
