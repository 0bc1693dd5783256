"""``ftops-inference``: run one inference replica."""

from __future__ import annotations

from ftops_inference.service import serve
from ftops_inference.settings import InferenceSettings
from ftops_inference.vllm_backend import VLLMNotInstalledError
from ftops_models import ModelDirError
from ftops_runtime.app import run_service


def main() -> None:
    try:
        run_service("inference", InferenceSettings, serve)
    # backend = vllm without vLLM (said with how to get it), or a base model directory that
    # is no model or is too large for this replica (said with the estimate).
    except (VLLMNotInstalledError, ModelDirError) as exc:
        raise SystemExit(f"ftops-inference: refusing to start: {exc}") from None


if __name__ == "__main__":
    main()
