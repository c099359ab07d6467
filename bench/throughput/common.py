"""Constants every part of the throughput benchmark shares."""
from __future__ import annotations

import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


logger = logging.getLogger("bench.throughput")


IGNORE_INDEX = -100


MAX_GRAD_NORM = 1.0
