"""The inference service on vLLM in the local stack (``ftops-dev up --backend vllm``, the vLLM
tests): vLLM's CPU build lives in an environment of its own (``make install-vllm`` →
``.venv-vllm``), since it pins an older transformers than the project; the inference
process runs from there, every other service from the main environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# The checkout this package is installed from (editable): libs/ftops_devstack/ → root.
ROOT = Path(__file__).resolve().parents[2]
INSTALL_COMMAND = "make install-vllm"
# Sized for the tiny model on a CPU: small batches of small adapters, a 1 GiB KV cache.
# max_cpu_loras = max_loras, so a ninth adapter evicts the least recently used one.
TINY_MODEL_SETTINGS = {
    "FTOPS_BACKEND": "vllm",
    "FTOPS_VLLM_MAX_LORAS": "8",
    "FTOPS_VLLM_MAX_CPU_LORAS": "8",
    "FTOPS_VLLM_MAX_LORA_RANK": "16",
    "FTOPS_VLLM_DTYPE": "float32",
    "FTOPS_VLLM_CPU_KVCACHE_SPACE_GIB": "1",
}


class VLLMUnavailableError(RuntimeError):
    pass


def vllm_python() -> Path:
    """The interpreter of the vLLM environment (``FTOPS_VLLM_PYTHON``, else the checkout's
    .venv-vllm), once it is known to import vLLM; otherwise the command that installs it."""
    configured = os.environ.get("FTOPS_VLLM_PYTHON", "")
    python = Path(configured) if configured else ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        raise VLLMUnavailableError(
            f"--backend vllm needs vLLM's environment, and {python} does not exist: "
            f"run `{INSTALL_COMMAND}` in {ROOT} first (or set FTOPS_VLLM_PYTHON)"
        )
    # A package with code, not a directory named vllm that happens to be on sys.path.
    probe = "import importlib.util as u; s = u.find_spec('vllm'); exit(not s or not s.origin)"
    found = subprocess.run(
        [str(python), "-c", probe],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if found.returncode != 0:
        raise VLLMUnavailableError(
            f"--backend vllm: {python} cannot import vllm: run `{INSTALL_COMMAND}` in {ROOT}"
        )
    return python


def main_python() -> Path:
    """The main environment's interpreter (``FTOPS_MAIN_PYTHON``, else the checkout's .venv),
    for the services that do not run on vLLM when the stack is started from .venv-vllm."""
    configured = os.environ.get("FTOPS_MAIN_PYTHON", "")
    python = Path(configured) if configured else ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        raise VLLMUnavailableError(f"{python} does not exist: run `make install` in {ROOT}")
    return python
