"""Polling helpers shared by the tests that wait for a worker, a child process or a Ray cluster."""
from __future__ import annotations

import time
from typing import Any, Callable

# An upper bound, not a timing assertion: a loaded 2-core CI host can be many times slower than an idle one.
DEFAULT_TIMEOUT_S = 300.0


def wait_for(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
