"""Train one run in this process, optionally SIGKILLing it at a chosen step (for tests/test_resume.py).

    python -m tests.resume_helper CONFIG_JSON OUT_DIR [--kill-at-step K] [--resume]

The kill is a real SIGKILL of this process from inside ``on_step`` of step K, after step K's
optimizer update and before anything else of that step (its checkpoint included) is written:
exactly what an out-of-memory kill or a power cut at that moment leaves behind. Each resume
event is printed as one ``RESUME {json}`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import asdict
from typing import Any

from heft_core.callbacks import TrainerCallback
from heft_core.config import RunConfig

RESUME_PREFIX = "RESUME "


class KillAtStep(TrainerCallback):
    def __init__(self, step: int | None):
        self.step = step

    def on_step(self, event: Any) -> None:
        if event.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_resume(self, event: Any) -> None:
        print(RESUME_PREFIX + json.dumps(asdict(event)), flush=True)

    def on_log(self, message: str) -> None:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    from heft_core.train import train  # heavy: after the arguments are checked

    with open(args.config) as handle:
        config = RunConfig.from_dict(json.load(handle))
    result = train(config, args.out, callbacks=[KillAtStep(args.kill_at_step)], resume=args.resume)
    print(json.dumps(result.summary()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
