"""Which methods the serving backend can serve, checked when a job is submitted: a version
its replicas would refuse to load (``adapter.load_failed``) is never trained.

The trainer knows the backend from its own setting, ``serving_backend``
(``FTOPS_SERVING_BACKEND``), set to what the inference replicas run (their
``FTOPS_BACKEND``): a deployment chooses its backend once, and the check then holds even
when no replica is up yet. A fleet that mixes backends sets the most limited one.
"""

from __future__ import annotations

from ftops_trainer.params import TrainParams

SERVING_BACKENDS = ("hf", "vllm")
# What each backend's replicas load: the HF backend (transformers + PEFT) every method, vLLM
# plain LoRA adapters only (a qlora lineage's adapters are plain LoRA).
SERVED: dict[str, tuple[str, ...]] = {
    "hf": ("lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "partial"),
    "vllm": ("lora", "qlora"),
}
_NAMES = {"hf": "the HF backend (transformers + PEFT)", "vllm": "vLLM"}


def serving_problem(params: TrainParams, backend: str) -> str | None:
    """Why ``backend`` could not serve what ``params`` trains; None when it can."""
    served = SERVED.get(backend)
    if served is None:
        return None
    where = f"the configured serving backend {backend!r} ({_NAMES[backend]}, FTOPS_SERVING_BACKEND)"
    if params.method not in served:
        return (
            f"method {params.method!r} cannot be served by {where}: it serves "
            f"{', '.join(served)}; pick one of those"
        )
    if backend == "vllm" and params.use_dora:
        return f"use_dora: {where} does not serve DoRA adapters; train plain LoRA instead"
    return None
