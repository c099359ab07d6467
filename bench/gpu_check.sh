#!/usr/bin/env bash
# GPU check of HEFT Studio at Llama-2-7B shape (random weights, nothing downloaded), ~8 minutes
# on one H200. Run from anywhere; the repository root becomes the working directory.
#
#   bash bench/gpu_check.sh                    # the full check (needs CUDA)
#   bash bench/gpu_check.sh --device cpu --tiny  # code-path test on any machine
#
# Needs torch with CUDA plus transformers, peft, pyreft, pyvene and accelerate importable (from
# site-packages or PYTHONPATH; no virtual environment is assumed). Writes the Markdown report to
# $OUT/gpu_check.md when OUT is set, else bench/results/gpu_check-<date>.md, and prints it.
# Every section runs in its own try/except; the report is rewritten after each one, so a
# timeout still leaves what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HEFT_HOME="${HEFT_HOME:-${TMPDIR:-/tmp}/heft-gpu-check}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

echo "== python: $PY"
"$PY" - <<'PYEOF'
import importlib, sys
print(sys.version.split()[0])
for name in ("torch", "transformers", "peft", "pyreft", "pyvene", "accelerate"):
    try:
        module = importlib.import_module(name)
        print(f"{name:13s} {getattr(module, '__version__', '?')}  {getattr(module, '__file__', '')}")
    except Exception as exc:
        print(f"{name:13s} MISSING ({exc!r})")
try:
    import torch
    print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception:
    pass
PYEOF

# SIGINT before the tool's limit: Python unwinds, the report keeps every finished section.
timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-500}" "$PY" -m bench.gpu_check "$@"
status=$?
echo "== bench.gpu_check exit status $status"
exit $status
