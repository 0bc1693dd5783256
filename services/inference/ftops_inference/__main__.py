"""``ftops-inference``: run one inference replica."""

from __future__ import annotations

from ftops_inference.service import serve
from ftops_inference.settings import InferenceSettings
from ftops_inference.vllm_backend import VLLMNotInstalledError
from ftops_runtime.app import run_service


def main() -> None:
    try:
        run_service("inference", InferenceSettings, serve)
    except VLLMNotInstalledError as exc:  # backend = vllm without vLLM: say how to get it
        raise SystemExit(f"ftops-inference: refusing to start: {exc}") from None


if __name__ == "__main__":
    main()
