"""The engine's periodic stats line, as vLLM logs it unless --disable-log-stats.

Every VLLM_LOG_STATS_INTERVAL seconds (default 10) one line: prompt and generation
throughput over the interval, running and waiting requests, KV-cache usage and the
prefix-cache hit rate. It reads counters the scheduler keeps anyway, from the event loop
(plain int and list-length reads, safe against the engine thread), so the step loop pays
nothing for it. An idle interval logs at debug level only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import SchedulerConfig
from .scheduler import Scheduler

logger = logging.getLogger("splitserve.scheduler.stats")

INTERVAL_ENV = "VLLM_LOG_STATS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def stats_interval_s() -> float:
    """The interval from VLLM_LOG_STATS_INTERVAL; a bad value is an error naming it."""
    text = os.environ.get(INTERVAL_ENV)
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{INTERVAL_ENV} must be a positive number of seconds, got {text!r}")
    return value


@dataclass(slots=True)
class _Counters:
    time_s: float
    prompt_tokens: int
    generation_tokens: int
    prefix_queries: int
    prefix_hits: int


class StatsLogger:
    """Turns two readings of the scheduler's counters into vLLM's stats line."""

    def __init__(self, scheduler: Scheduler, clock: Callable[[], float] = time.monotonic):
        self.scheduler = scheduler
        self.clock = clock
        self._last = self._read()

    def _read(self) -> _Counters:
        s = self.scheduler
        return _Counters(
            self.clock(),
            s.num_prompt_tokens,
            s.num_generation_tokens,
            s.kv.prefix_queries,
            s.kv.prefix_hits,
        )

    def line(self) -> tuple[str, bool]:
        """The line for the interval since the previous call, and whether it saw activity."""
        now, last = self._read(), self._last
        self._last = now
        elapsed = max(now.time_s - last.time_s, 1e-9)
        prompt = now.prompt_tokens - last.prompt_tokens
        generated = now.generation_tokens - last.generation_tokens
        queries = now.prefix_queries - last.prefix_queries
        hits = now.prefix_hits - last.prefix_hits
        s = self.scheduler
        running, waiting = len(s.running), len(s.waiting)
        total = s.kv.pool.num_blocks
        usage = 1.0 - s.kv.num_free_blocks / total if total else 0.0
        hit_rate = hits / queries if queries else 0.0
        message = (
            f"Avg prompt throughput: {prompt / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {generated / elapsed:.1f} tokens/s, "
            f"Running: {running} reqs, Waiting: {waiting} reqs, "
            f"KV cache usage: {usage * 100:.1f}%, "
            f"Prefix cache hit rate: {hit_rate * 100:.1f}%"
        )
        return message, bool(prompt or generated or running or waiting)

    def log(self) -> None:
        message, active = self.line()
        logger.log(logging.INFO if active else logging.DEBUG, "%s", message)


def start_stats_logging(
    config: SchedulerConfig, scheduler: Scheduler, interval_s: float | None = None
) -> asyncio.Task | None:
    """The task logging the stats line every interval; None with --disable-log-stats."""
    if config.disable_log_stats:
        return None
    interval = stats_interval_s() if interval_s is None else interval_s
    stats = StatsLogger(scheduler)

    async def run() -> None:
        while True:
            await asyncio.sleep(interval)
            stats.log()

    return asyncio.ensure_future(run())
