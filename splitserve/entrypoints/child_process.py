"""How splitserve starts its own Python children, and what it keeps of their output.

Every child runs `python -P -m splitserve.entrypoints.cli ...` with `PYTHONSAFEPATH=1` in its
environment: neither it nor any Python process it starts puts the working folder on
`sys.path`. The repository's service folders (`kernels`, `scheduler`, `worker`, ...) sit at
its root, and started from there a plain `python -m` would let them shadow installed packages
of the same names (transformers imports Hugging Face's `kernels`).

A child's stdout and stderr go through one pipe: each chunk is copied to the launcher's
stderr as it comes and appended to that child's log file, so a child that dies during
start-up can be named with the exception it died of.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}
"""Set for every child: Python 3.11+ then never prepends the working folder to sys.path."""


def python_command(module: str, *argv: str) -> list[str]:
    """`python -P -m module argv...` with this interpreter."""
    return [sys.executable, "-P", "-m", module, *argv]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment for a child: safe sys.path, unbuffered output (it goes
    to a pipe, and a crash must not lose its last lines), plus `extra`."""
    return {**os.environ, **SAFE_PATH_ENV, "PYTHONUNBUFFERED": "1", **(extra or {})}


class LoggedChild:
    """One child process whose merged output is copied to our stderr and to `log_path`."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log_path: Path,
        env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.exited_at: float | None = None
        """time.monotonic() when the child exited (orders several deaths)."""
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=preexec_fn,
            # NOTE: own session: a terminal's Ctrl-C reaches only the launcher, which
            # stops the children in order (the gateway drains before the rest stop).
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._copy, name=f"log-{name}", daemon=True)
        self._pump.start()
        threading.Thread(target=self._reap, name=f"wait-{name}", daemon=True).start()

    def _reap(self) -> None:
        self.proc.wait()
        self.exited_at = time.monotonic()

    def _copy(self) -> None:
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self._log.write(chunk)
            self._log.flush()
            try:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            except (OSError, ValueError):  # the launcher's own stderr is gone: keep the log
                pass
        self._log.close()

    def exited(self) -> bool:
        return self.exited_at is not None

    def wait_output(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until everything the dead child wrote is in its log file."""
        self._pump.join(timeout)

    def failure_line(self) -> str:
        """The exception the child died of, as one line (see `last_error_line`)."""
        self.wait_output()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return last_error_line(text)


_LOG_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b")


def last_error_line(text: str) -> str:
    """The line that says why a Python process died, from its output.

    The last traceback's closing line (`ImportError: cannot import name ...`) when there is
    one; otherwise the last line logged at ERROR or CRITICAL; otherwise the last non-empty
    line. Indented lines and caret markers inside a traceback are never the answer, nor a
    traceback that an object's finalizer printed at exit ("Exception ignored in: ...").
    """
    lines = text.splitlines()
    start = None
    for i, line in enumerate(lines):
        # NOTE: "Exception ignored in: ..." tracebacks are noise from finalizers at exit.
        if line.startswith("Traceback (most recent call last):") and not (
            i and lines[i - 1].startswith("Exception ignored")
        ):
            start = i
    if start is not None:
        for line in lines[start + 1 :]:
            if line and not line[0].isspace():
                return line.strip()
    for line in reversed(lines):
        if _LOG_ERROR.search(line):
            return line.strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return ""
