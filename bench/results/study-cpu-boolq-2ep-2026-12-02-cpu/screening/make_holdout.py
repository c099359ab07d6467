"""Split the shared BoolQ *training* sample into 1,000 rows to train and 500 to score the screening
runs on, so that settings are never chosen on the 500 validation rows.

    python bench/results/study-cpu-boolq-2ep-2026-12-02-cpu/screening/make_holdout.py /tmp/screen/data
"""
import json
import random
import sys
from pathlib import Path

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rows = [json.loads(line) for line in open(Path(__file__).resolve().parents[4].parent / "shared/data/boolq/train.jsonl")]
random.Random(7).shuffle(rows)
for name, part in (("train", rows[:1000]), ("validation", rows[1000:])):
    with open(out / f"{name}.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in part)
