"""Run by ``test_architectures_vllm.py`` with the main environment's interpreter (vLLM's
has neither PEFT nor the trainer's dependencies): builds a tiny random-weight base model
of one architecture, trains a LoRA adapter on it with the trainer's own training function
and default targets, and writes PEFT's greedy output for the prompts to ``reference.json``.

    python tests/vllm_backend/train_reference.py ARCH TOKENIZER_DIR OUT_DIR MAX_TOKENS PROMPT...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ftops_tinymodel
from ftops_tinymodel.architectures import build_architecture, greedy_texts
from ftops_trainer.dataset import Record
from ftops_trainer.params import TrainParams
from ftops_trainer.training import train_adapter

# As in tests/unit/test_inference_architectures.py: a few steps that move the output.
PARAMS = TrainParams(max_steps=4, batch_size=4, learning_rate=0.05, seed=0)


def main(argv: list[str]) -> None:
    arch, tokenizer_dir, out, max_tokens, prompts = (
        argv[0],
        Path(argv[1]),
        Path(argv[2]),
        int(argv[3]),
        argv[4:],
    )
    base_dir = build_architecture(arch, tokenizer_dir, out / "base")
    adapter_dir = out / "adapter"
    facts = [Record(f["prompt"], f["completion"]) for f in ftops_tinymodel.new_facts()[:8]]
    train_adapter(base_dir, facts, PARAMS, adapter_dir, base_model_name=f"tiny-{arch}")
    reference = {
        "base_dir": str(base_dir),
        "adapter_dir": str(adapter_dir),
        "targets": json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"],
        "adapter": greedy_texts(base_dir, adapter_dir, prompts, max_tokens),
        "base": greedy_texts(base_dir, None, prompts, max_tokens),
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
