"""Where a CPU worker's OpenMP threads run: one thread pinned to each core it is given.

torch's CPU kernels run on OpenMP threads. Left free, the OS moves them between cores, and a
step's parallel region waits for its slowest thread; pinned, each thread keeps its core and its
caches (vLLM's VLLM_CPU_OMP_THREADS_BIND does the same). The binding is passed to OpenMP
through its standard variables (OMP_PLACES, OMP_PROC_BIND, OMP_NUM_THREADS), which OpenMP reads
once, when torch loads: `apply` must run before `import torch`, so the `worker` command calls
it first. No torch import here.

Values of `--cpu-omp-threads-bind`:
- `auto`: on a machine with at least `AUTO_MIN_CORES` usable cores (the process's affinity
  mask), all of them but one, left to the other services of the stack (vLLM's CPU build
  reserves one the same way), split evenly between the worker processes (pipeline x
  tensor-parallel ranks; global rank r takes the r-th slice). Nothing is bound on a CUDA worker, on a smaller machine, or when the slice would be
  empty. NOTE: on the 2-core machine measured (bench/RESULTS.md, 2026-12-06 "vs vLLM"), one
  pinned thread with a core left over gave 0.82-0.97x the tokens/s of two free threads, so
  small machines are left unbound; the threshold of 4 is a judgment, not a measurement.
- `nobind`: leave the threads to the OS.
- a CPU list such as `0-3` or `0,2,4-7`: exactly those cores.

NOTE: the other services (scheduler, gateway, tokenizer) are not pinned; they share the cores
with the worker, whose threads sleep between steps (OMP_WAIT_POLICY=PASSIVE, `cli`).
NOTE: variables the user has set are kept: OMP_PLACES or OMP_PROC_BIND in the environment
means the user chose a placement, and nothing is changed.
"""

from __future__ import annotations

import glob
import os

OMP_VARS = ("OMP_PLACES", "OMP_PROC_BIND")
RESERVED_CORES = 1
"""Cores `auto` leaves to the rest of the stack."""
AUTO_MIN_CORES = 4
"""Usable cores below which `auto` binds nothing."""


def parse_cpu_list(spec: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]; raises ValueError naming the bad part."""
    cpus: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {spec!r}: {part!r} is not N or N-M") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU list {spec!r}: {part!r} is not an increasing range")
        cpus.extend(range(first, last + 1))
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"bad CPU list {spec!r}: a CPU is named twice")
    return cpus


def check_bind(spec: str) -> None:
    """Raise ValueError unless `spec` is auto, nobind or a CPU list."""
    if spec not in ("auto", "nobind"):
        parse_cpu_list(spec)


def _cuda_visible() -> bool:
    # NOTE: torch is not loaded yet, so ask the device files; CUDA_VISIBLE_DEVICES="" or -1
    # hides every GPU.
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def cores_for(
    spec: str,
    device: str,
    rank: int = 0,
    world: int = 1,
    available: set[int] | None = None,
) -> list[int]:
    """The cores the worker's threads are pinned to, one thread each; [] binds nothing."""
    if spec == "nobind":
        return []
    if spec != "auto":
        return parse_cpu_list(spec)
    if device == "cuda" or (device == "auto" and _cuda_visible()):
        return []
    cpus = sorted(available if available is not None else os.sched_getaffinity(0))
    # NOTE: the scheduler, gateway and tokenizer work on every step too; with a core of their
    # own they do not preempt a worker thread in the middle of a parallel region.
    if len(cpus) < AUTO_MIN_CORES:
        return []
    cpus = cpus[:-RESERVED_CORES]
    per_rank = len(cpus) // world
    return cpus[rank * per_rank : (rank + 1) * per_rank]


def omp_environment(cores: list[int]) -> dict[str, str]:
    """The OpenMP variables that pin one thread to each of `cores`, in order."""
    if not cores:
        return {}
    return {
        "OMP_PLACES": ",".join(f"{{{c}}}" for c in cores),
        "OMP_PROC_BIND": "close",
        "OMP_NUM_THREADS": str(len(cores)),
    }


def apply(
    spec: str, device: str, rank: int = 0, world: int = 1, environ: dict | None = None
) -> list[int]:
    """Set the binding in `environ` (default os.environ) unless the user placed the threads
    already; returns the cores bound ([] when none). Call before torch is imported."""
    env = os.environ if environ is None else environ
    if any(v in env for v in OMP_VARS):
        return []
    cores = cores_for(spec, device, rank, world)
    for key, value in omp_environment(cores).items():
        if key == "OMP_NUM_THREADS" and key in env:
            continue  # the user's thread count wins; the places still pin the first ones
        env[key] = value
    return cores
