"""One training run in its own process: ``python -m app.child RUN_ID --db PATH``.

Started by the worker with stdout and stderr going to the run's log file. Reads the run's
config from the database, trains with heft_core, and streams metrics back in small batched
transactions (``app.recording``). Exit status: 0 finished (completed or cancelled, see
run.json), 3 bad input, 5 stopped by SIGTERM (the worker shutting down, a container or Space
restart) at an optimizer step after writing a checkpoint there, 1 any other error;
``error.txt`` in the run directory holds the one-line reason.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from app.launch import process_rank, supervised_by
from app.logs import ERROR_FILE
from app.recording import DatabaseCallback
from app.shared_stages import start_from_shared_stage1
from heft_common.errors import HeftError
from heft_core.callbacks import TrainerCallback
from storage import queries
from storage.db import open_db

logger = logging.getLogger("app.child")

EXIT_BAD_INPUT = 3
EXIT_STOPPED = 5  # SIGTERM: training ended at an optimizer step with a checkpoint; Resume loses nothing


class _StopOnSigterm(TrainerCallback):
    """SIGTERM ends training at the next optimizer step, where the trainer writes a checkpoint.

    Without this, SIGTERM would end the process at once and a resume would go back to the last
    periodic checkpoint (up to ``checkpoint_minutes`` of training lost). A second SIGTERM ends the
    process at once.
    """

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: object) -> None:
        if self.requested:  # a second SIGTERM (e.g. while the model still loads): end now, as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True

    def should_stop(self) -> bool:
        return self.requested


class _NotRecorded(TrainerCallback):
    """The other processes of a multi-process run: only the main one writes to the database."""

    def flush(self) -> None: ...


def _exit_with_parent(parent_pid: int, interval: float = 1.0) -> None:
    """A run whose worker died must not train on unobserved: end this process too."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if not supervised_by(parent_pid):  # its parent, or accelerate's launcher between them
                logger.error("worker %d is gone; stopping this run", parent_pid)
                os._exit(4)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def run(run_id: int, db_path: str) -> int:
    # The engine (torch, transformers) loads here, after the parent watch is running.
    from heft_core.config import RunConfig
    from heft_core.train import train

    engine = open_db(db_path)
    record = queries.get_run(engine, run_id)
    if record is None or not record.artifact_dir:
        logger.error("run %s not found or has no artifact directory", run_id)
        return 1
    out = Path(record.artifact_dir)
    callback = DatabaseCallback(engine, run_id) if process_rank() == 0 else _NotRecorded()
    stopper = _StopOnSigterm()
    try:
        config = RunConfig.from_dict(record.config)
        # A run put back in the queue by Resume continues from its checkpoint; a new one starts clean, unless it
        # is a study's HEFT run whose stage 1 an earlier LoRA run of the study already trained.
        resume = bool(record.resumes)
        if not resume and (shared := start_from_shared_stage1(engine, record, out)) is not None:
            callback.on_log(shared)
            resume = True
        result = train(config, out, callbacks=[callback, stopper], resume=resume)
        callback.flush()
        if stopper.requested and result.status == "cancelled":  # ended by SIGTERM, not by the user's cancel
            logger.info("stopped by SIGTERM; the checkpoint at the last step is where Resume continues")
            return EXIT_STOPPED
        return 0
    except HeftError as exc:  # bad option, data or model: the message says what
        callback.flush()
        (out / ERROR_FILE).write_text(str(exc))
        logger.error("%s", exc)
        return EXIT_BAD_INPUT
    except BaseException as exc:  # the worker reports it; keep the traceback in the log
        try:
            callback.flush()
        except Exception:
            pass
        traceback.print_exc()
        (out / ERROR_FILE).write_text(f"{type(exc).__name__}: {exc}".strip())
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one queued HEFT Studio run (started by the worker).")
    parser.add_argument("run_id", type=int)
    parser.add_argument("--db", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)
    return run(args.run_id, args.db)


if __name__ == "__main__":
    sys.exit(main())
