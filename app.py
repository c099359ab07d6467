"""HEFT Studio: `python app.py` starts the background worker and serves the web app on port 7860.

Environment: GRADIO_SERVER_NAME (default 127.0.0.1; the Space's Dockerfile sets 0.0.0.0),
GRADIO_SERVER_PORT (default 7860), HEFT_HOME (data home), HEFT_DEMO=0 (do not import the bundled demo study
into an empty registry), HEFT_AUTH="user:pass,user2:pass2"
(optional login, throttled: app.login), HEFT_RAY_ADDRESS (train on that Ray cluster, `auto` for the
one this machine is in; README: Ray cluster).

SIGTERM (docker stop, systemd, a Space restart) stops the app like Ctrl-C: the server closes, the
worker stops its training processes and marks their runs interrupted. A damaged or foreign database
is reported in one message (what to do) and the app exits with status 2.
"""
from __future__ import annotations

import logging
import os
import signal
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
    log = logging.getLogger("heft")
    # SIGTERM as Ctrl-C: Gradio's launch() ends on KeyboardInterrupt, then the worker is stopped below.
    # (As a container's PID 1 without a handler, SIGTERM would be ignored until the SIGKILL.)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from app.login import login_options
    from app.ui import build_demo, launch_kwargs, queue_kwargs
    from app.worker import start_background_worker
    from heft_common.errors import StoreError
    from storage.lifecycle import prepare_registry

    auth = parse_auth(os.environ.get("HEFT_AUTH"))
    worker = None
    try:
        registry = prepare_registry()  # re-index an empty database from the run directories; restore from HEFT_ARCHIVE
        worker = start_background_worker(registry=registry)
        if worker is None:
            log.info("this app runs no worker (the reason is logged above); it only queues runs")
        from app import service
        from app.study_import import import_bundled_demo

        engine = service.open_engine()
        import_bundled_demo(engine)  # a first start shows the demo's runs (HEFT_DEMO=0: not)
        demo = build_demo(engine, startup_notice=registry.notice)
        demo.queue(**queue_kwargs()).launch(
            server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
            server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
            show_error=False,
            **launch_kwargs(),
            **login_options(auth),
        )
    except StoreError as exc:  # a damaged or foreign database: one message that says what to do
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C before the server was up
        log.info("stopping")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough; let the shutdown finish
        if worker is not None:
            worker.stop()  # children are stopped; their runs are marked interrupted
            import threading

            for thread in threading.enumerate():
                if thread.name == "heft-worker":
                    thread.join(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
