"""The app served on a free loopback port for the API and browser tests, and the browser they drive.

Fixtures built on these (``app_client``, ``studio``) live in ``tests/conftest.py``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from app.launch import free_port

CHROMIUM = "/usr/bin/chromium"  # Debian's (make browser); never a downloaded browser
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (make browser) to run the browser tests",
)
BROWSER_MARKS = [pytest.mark.browser, needs_chromium]


@contextlib.contextmanager
def served_app(engine: Any) -> Iterator[str]:
    """The whole app (``app.ui.build_demo``) on ``engine``, served until the block ends; yields its URL."""
    from app.ui import build_demo, launch_kwargs

    demo = build_demo(engine)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.heft_ask_service.close()
        demo.close()


@contextlib.contextmanager
def worker_thread(db: Path) -> Iterator[None]:
    """A real worker polling ``db`` every 0.2 s in a thread of this process, stopped when the block ends."""
    from app.worker import Worker

    worker = Worker(db, slots=[None], poll_seconds=0.2, heartbeat_seconds=1.0)
    thread = worker.start_in_thread()
    try:
        yield
    finally:
        worker.stop()
        thread.join(timeout=30)
