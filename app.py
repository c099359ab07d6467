"""HEFT Studio: `python app.py` starts the background worker and serves the web app on port 7860.

Environment: GRADIO_SERVER_NAME (default 127.0.0.1; the Space's Dockerfile sets 0.0.0.0),
GRADIO_SERVER_PORT (default 7860), HEFT_HOME (data home), HEFT_AUTH="user:pass,user2:pass2"
(optional login).
"""
from __future__ import annotations

import logging
import os
import sys


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """HEFT_AUTH="user:pass,user2:pass2" -> [("user", "pass"), ("user2", "pass2")]; None if unset."""
    if not value or not value.strip():
        return None
    pairs = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"HEFT_AUTH: {item.strip()!r} is not user:password (separate several logins with commas)")
        pairs.append((user, password))
    return pairs


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.ui import build_demo, launch_kwargs
    from app.worker import start_background_worker

    auth = parse_auth(os.environ.get("HEFT_AUTH"))
    worker = start_background_worker()
    if worker is None:
        logging.getLogger("heft").info("another worker serves this data home; this app only queues runs")
    demo = build_demo()
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
            server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
            auth=auth,
            auth_message="HEFT Studio: log in with a HEFT_AUTH user" if auth else None,
            show_error=False,
            **launch_kwargs(),
        )
    finally:
        if worker is not None:
            worker.stop()  # children stop at their next step; their runs are marked interrupted
            import threading

            for thread in threading.enumerate():
                if thread.name == "heft-worker":
                    thread.join(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
