"""Hang guards: generous safety nets against a process that never finishes, never speed limits.

A test must not pass or fail on how fast a shared machine is (speed is measured in ``bench/``),
but a hung subprocess must not block a test run forever either. Every wait in the tests uses
``HANG_S`` (30 minutes, far beyond any test's run time even on a loaded 2-core machine) and a
hang is reported as ``hang: ...``, never as an ordinary assertion failure.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any, Callable, NoReturn

import pytest

HANG_S = 1800.0


def hang(what: str, seconds: float = HANG_S) -> NoReturn:
    pytest.fail(f"hang: {what} did not finish within {seconds:g} s (a safety net against a hang, "
                "not a speed limit)", pytrace=False)


def run(cmd: list, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **kwargs)`` guarded against a hang."""
    try:
        return subprocess.run(cmd, timeout=HANG_S, **kwargs)
    except subprocess.TimeoutExpired:
        hang(" ".join(map(str, cmd))[:300])


def communicate(proc: subprocess.Popen, what: str) -> tuple[Any, Any]:
    """``proc.communicate()`` guarded against a hang (the process is killed if it hangs)."""
    try:
        return proc.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        hang(what)


def wait_for(ready: Callable[[], bool], what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``ready()`` until it holds; fails at once if ``proc`` exits first, and as a hang after ``HANG_S``."""
    deadline = time.monotonic() + HANG_S
    while not ready():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process exited ({proc.returncode}) before {what}: {str(err)[-2000:]}")
        if time.monotonic() > deadline:
            hang(f"waiting for {what}")
        time.sleep(0.05)
