"""Accuracy, share of "yes", ROC AUC of P(yes) and log loss per run of a study directory, with its
training loss and speed (the screening table in ../NOTES.md):

    python score.py STUDY_DIR
"""
import glob
import json
import math
import os
import sys

from scipy.stats import mannwhitneyu


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def roc_auc(p_yes, labels):
    # AUC = Mann-Whitney U of the positives' scores over n_pos * n_neg (ties count half).
    pos = [p for p, y in zip(p_yes, labels) if y]
    neg = [p for p, y in zip(p_yes, labels) if not y]
    return mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))


for run_dir in sorted(glob.glob(os.path.join(sys.argv[1], "runs", "*"))):
    name = os.path.basename(run_dir)
    if not os.path.exists(os.path.join(run_dir, "predictions.jsonl")):
        print(name, "no predictions")
        continue
    rows = read_jsonl(os.path.join(run_dir, "predictions.jsonl"))
    p_yes, labels = [r["p_yes"] for r in rows], [r["label"] for r in rows]
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    yes_share = sum(r["predicted"] for r in rows) / len(rows)
    log_loss = -sum(math.log(max(1e-9, p if y else 1 - p)) for p, y in zip(p_yes, labels)) / len(rows)
    steps = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    losses = [s["loss"] for s in steps if s.get("loss") is not None]
    quarter = max(1, len(losses) // 4)
    tail_loss = sum(losses[-quarter:]) / quarter if losses else float("nan")
    seconds = steps[-1]["elapsed_seconds"] if steps else 0
    tokens_per_second = sum(s["tokens_per_second"] for s in steps) / max(1, len(steps))
    print(
        f"{name:40s} acc {accuracy:.3f} yes {yes_share:.2f} auc {roc_auc(p_yes, labels):.3f} logloss {log_loss:.3f}"
        f" | steps {len(losses)} last-quarter loss {tail_loss:.3f} train {seconds:.0f}s ~{tokens_per_second:.0f} tok/s"
    )
