"""``ftops-inference``: run one inference replica."""

from __future__ import annotations

from ftops_inference.service import serve
from ftops_inference.settings import InferenceSettings
from ftops_runtime.app import run_service


def main() -> None:
    run_service("inference", InferenceSettings, serve)


if __name__ == "__main__":
    main()
