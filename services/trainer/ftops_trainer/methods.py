"""Parameter-efficient methods: building the trainable model for ``TrainParams.method``,
continuing a parent adapter, exporting the artifact, and cheap submit-time validation.

Every method but ``partial`` goes through PEFT and exports a PEFT adapter directory;
``partial`` exports the top layers' tensors (see ``partial.py``). A parent adapter's own
method and shape win over the parameters: a lineage cannot change method mid-way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftops_trainer import partial
from ftops_trainer.params import METHODS, TrainParams
from ftops_trainer.partial import load_partial
from ftops_trainer.targets import default_target_modules, meta_model

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_WEIGHTS",
    "METHODS",
    "MethodUnavailable",
    "PreparedModel",
    "apply_adapter",
    "load_partial",
    "parent_method",
    "prepare_model",
    "validate_method",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_TARGETED = ("lora", "adalora", "ia3", "qlora")  # methods that wrap named modules
_PROMPT = ("prompt_tuning", "prefix_tuning")
_PEFT_TYPES = {
    "LORA": "lora",
    "ADALORA": "adalora",
    "IA3": "ia3",
    "PROMPT_TUNING": "prompt_tuning",
    "PREFIX_TUNING": "prefix_tuning",
}


class MethodUnavailable(ValueError):
    """The method cannot run on this trainer (e.g. QLoRA without a CUDA GPU)."""


def qlora_problem() -> str | None:
    if not torch.cuda.is_available():
        return (
            "method 'qlora' needs a CUDA GPU (its 4-bit base runs on bitsandbytes) and this "
            "trainer has none; use method 'lora' instead (the same adapter, trained on the "
            "full-precision base)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        return "method 'qlora' needs the bitsandbytes package; install it or use method 'lora'"
    return None


def parent_method(parent_adapter_dir: Path) -> str:
    """The method a parent adapter was trained with (its config says)."""
    config = partial.read_config(parent_adapter_dir)
    if config.get("method") == partial.METHOD:
        return partial.METHOD
    peft_type = str(config.get("peft_type", ""))
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"{parent_adapter_dir}: unsupported parent adapter type {peft_type!r}")
    return _PEFT_TYPES[peft_type]


def apply_adapter(base_model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """The base with an artifact of any method applied, for inference or evaluation: a
    partial fine-tune is written into the base in place, a PEFT adapter wraps it."""
    if partial.is_partial(adapter_dir):
        return load_partial(base_model, adapter_dir)
    from peft import PeftModel

    model: torch.nn.Module = PeftModel.from_pretrained(base_model, str(adapter_dir))
    return model


# -- validation ---------------------------------------------------------------------------


def _base_config(base: Path | str | Any) -> Any:
    if isinstance(base, str | Path):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(base))
    return base


def _module_types(config: Any) -> dict[str, torch.nn.Module]:
    """Every module of the base model by name, built on the meta device: no weights are
    read or allocated, so this is cheap even for a large base."""
    return dict(meta_model(config).named_modules())


def _adaptable(method: str) -> tuple[type[torch.nn.Module], ...]:
    from transformers.pytorch_utils import Conv1D

    layers: tuple[type[torch.nn.Module], ...] = (
        torch.nn.Linear,
        torch.nn.Conv1d,
        torch.nn.Conv2d,
        torch.nn.Conv3d,
        Conv1D,
    )
    return layers if method == "ia3" else (*layers, torch.nn.Embedding)


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list of names: the full name or its dotted suffix.
    return name == target or name.endswith("." + target)


def _check_targets(
    method: str, targets: Iterable[str], modules: dict[str, torch.nn.Module]
) -> list[str]:
    problems = []
    kinds = _adaptable(method)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, kinds)})
    for target in targets:
        hits = [(n, m) for n, m in modules.items() if _matches(n, target)]
        if not hits:
            problems.append(
                f"target module {target!r} is not in the base model "
                f"(its adaptable modules: {', '.join(linear)})"
            )
        elif bad := [(n, m) for n, m in hits if not isinstance(m, kinds)]:
            name, module = bad[0]
            problems.append(
                f"target module {target!r} matches {name} ({type(module).__name__}), "
                f"which {method} cannot adapt"
            )
    return problems


def default_feedforward(params: TrainParams, model_type: str) -> tuple[str, ...]:
    if params.feedforward_modules:
        return params.feedforward_modules
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    known = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    return tuple(t for t in params.target_modules if t in known)


def validate_method(
    params: TrainParams, base: Path | str | Any, *, parent_adapter_dir: Path | None = None
) -> list[str]:
    """Problems with the method and its options against the base model, found without
    loading weights: ``base`` is the base model's directory or its ``PretrainedConfig``.

    With a parent adapter the parent's method and shape apply instead of ``params``'.
    """
    try:
        config = _base_config(base)
    except (OSError, ValueError) as exc:
        return [f"cannot read the base model's config: {exc}"]
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    problems: list[str] = []
    if params.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append("mixed_precision='fp16' needs CUDA; use 'bf16' or 'no' on CPU")
    if params.device == "cuda" and not torch.cuda.is_available():
        problems.append("device='cuda' but this trainer has no CUDA GPU")
    if params.method == "qlora" and (problem := qlora_problem()):
        problems.append(problem)

    if parent_adapter_dir is not None:
        try:
            method = parent_method(parent_adapter_dir)
            parent_config = partial.read_config(parent_adapter_dir)
        except (OSError, ValueError) as exc:
            return [*problems, f"cannot read the parent adapter: {exc}"]
        if method == partial.METHOD and parent_config.get("num_hidden_layers") != n_layers:
            problems.append(
                f"the parent partial fine-tune has {parent_config.get('num_hidden_layers')} "
                f"layers, the base model {n_layers}"
            )
        targets = parent_config.get("target_modules")
        if method in _TARGETED and isinstance(targets, list):
            problems += _check_targets(method, targets, _module_types(config))
        return problems

    method = params.method
    if method not in METHODS:
        return [*problems, f"method {method!r} is not supported (one of {', '.join(METHODS)})"]
    if params.use_dora and method not in ("lora", "qlora"):
        problems.append(f"use_dora applies to methods lora and qlora, not {method}")
    if params.use_rslora and method not in ("lora", "qlora", "adalora"):
        problems.append(f"use_rslora applies to LoRA methods, not {method}")
    if method in _TARGETED:
        model = meta_model(config)
        # None named: the architecture's default (targets.py).
        targets = params.target_modules or default_target_modules(method, model)
        params = dataclasses.replace(params, target_modules=targets)
        if not targets:
            problems.append(f"method {method} needs target_modules: the base has no linear layer")
        else:
            problems += _check_targets(method, targets, dict(model.named_modules()))
        if method != "ia3" and not 1 <= params.r <= 1024:
            problems.append(f"r={params.r} must be in [1, 1024]")
    if method == "adalora" and params.target_r > params.r:
        problems.append(
            f"adalora target_r={params.target_r} must not exceed its initial r={params.r}"
        )
    if method == "ia3":
        extra = set(params.feedforward_modules) - set(params.target_modules)
        if extra:
            problems.append(
                f"ia3 feedforward_modules {sorted(extra)} are not among the target_modules"
            )
    if method in _PROMPT:
        if params.num_virtual_tokens < 1:
            problems.append(f"{method} needs num_virtual_tokens >= 1")
        max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
        if method == "prompt_tuning" and max_pos and params.num_virtual_tokens >= max_pos:
            problems.append(
                f"num_virtual_tokens={params.num_virtual_tokens} leaves no room in the base "
                f"model's {max_pos} positions"
            )
    if method == partial.METHOD and not 1 <= params.num_layers <= n_layers:
        problems.append(f"partial num_layers={params.num_layers} must be in [1, {n_layers}]")
    return problems


# -- building the trainable model --------------------------------------------------------


@dataclass
class PreparedModel:
    """The model to train and what its method needs around the plain loop."""

    model: torch.nn.Module
    method: str
    partial_config: dict[str, Any] | None = None
    # Fresh AdaLoRA allocates its rank budget during this run; a parent's is final.
    adalora_allocates: bool = False
    adalora_orth_weight: float = 0.0

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def penalty(self) -> torch.Tensor | None:
        """AdaLoRA's orthogonality regulariser on P and Q, as PEFT adds it to the loss
        (here once per optimizer step, since the loop computes the loss itself)."""
        if self.method != "adalora" or not self.adalora_orth_weight:
            return None
        terms = []
        for name, p in self.trainable():
            if p.numel() == 0 or not ("lora_A" in name or "lora_B" in name):
                continue
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            terms.append(torch.norm(cov - eye, p="fro"))
        if not terms:
            return None
        return self.adalora_orth_weight * torch.stack(terms).mean()

    def after_step(self, step: int) -> None:
        """Called after each optimizer step, before zero_grad (grads still there)."""
        if self.adalora_allocates:
            self._tuner().update_and_allocate(step)

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """AdaLoRA's importance statistics and rank pattern, for checkpoints."""
        if not self.adalora_allocates:
            return {}, {}
        allocator = self._tuner().rankallocator
        tensors: dict[str, torch.Tensor] = {}
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            for name, value in getattr(allocator, kind).items():
                tensors[f"{kind}/{name}"] = value
        config = self._peft_config()
        return tensors, {"rank_pattern": config.rank_pattern}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if not self.adalora_allocates:
            return
        allocator = self._tuner().rankallocator
        allocator.reset_ipt()
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = value
        self._peft_config().rank_pattern = meta.get("rank_pattern")

    def _tuner(self) -> Any:
        tuner: Any = self.model.base_model  # PEFT's tuner (AdaLoraModel for AdaLoRA)
        return tuner

    def _peft_config(self) -> Any:
        model: Any = self.model
        return next(iter(model.peft_config.values()))

    def export(self, out_dir: Path, base_model_name: str) -> None:
        """Write the artifact: config + safetensors only (no README, nothing pickled).
        The config names the registered base model, not this host's path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.partial_config is not None:
            config = {**self.partial_config, "base_model_name_or_path": base_model_name}
            partial.save(self.model, config, out_dir)
            return
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
            for name in ADAPTER_FILES:
                shutil.move(str(Path(tmp) / name), out_dir / name)
        config_path = out_dir / ADAPTER_CONFIG
        peft_config = json.loads(config_path.read_text())
        peft_config["base_model_name_or_path"] = base_model_name
        config_path.write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")


def _peft_config(params: TrainParams, total_steps: int, model_type: str) -> Any:
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    method, targets = params.method, list(params.target_modules)
    if method in ("lora", "qlora"):
        return LoraConfig(
            r=params.r,
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            target_modules=targets,
            use_dora=params.use_dora,
            use_rslora=params.use_rslora,
            task_type="CAUSAL_LM",
        )
    if method == "adalora":
        # Rank budget: hold for the first 10% of steps, prune (cubic schedule) until the
        # last 20%, then train the final ranks. Allocation needs total_step up front.
        return AdaLoraConfig(
            init_r=params.r,
            target_r=params.target_r or max(1, params.r // 2),
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            target_modules=targets,
            use_rslora=params.use_rslora,
            total_step=total_steps,
            tinit=total_steps // 10,
            tfinal=total_steps // 5,
            task_type="CAUSAL_LM",
        )
    if method == "ia3":
        return IA3Config(
            target_modules=targets,
            feedforward_modules=list(default_feedforward(params, model_type)),
            task_type="CAUSAL_LM",
        )
    if method == "prompt_tuning":
        return PromptTuningConfig(
            num_virtual_tokens=params.num_virtual_tokens, task_type="CAUSAL_LM"
        )
    if method == "prefix_tuning":
        return PrefixTuningConfig(
            num_virtual_tokens=params.num_virtual_tokens, task_type="CAUSAL_LM"
        )
    raise ValueError(f"method {method!r} is not supported (one of {', '.join(METHODS)})")


def _load_base(base_dir: Path, quantize: bool, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    if not quantize:
        model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return model.to(device)
    if problem := qlora_problem():
        raise MethodUnavailable(problem)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quant, device_map={"": device.index or 0}
    )
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]


def _prepare_partial(
    base: Any, base_dir: Path, num_layers: int, parent_adapter_dir: Path | None
) -> PreparedModel:
    prefix, layers = partial.decoder_layers(base)
    if parent_adapter_dir is not None:
        load_partial(base, parent_adapter_dir)
        config = partial.read_config(parent_adapter_dir)
        prefix, indices = config["layers_module"], list(config["layers"])
    else:
        if not 1 <= num_layers <= len(layers):
            raise ValueError(f"partial num_layers={num_layers} must be in [1, {len(layers)}]")
        indices = partial.top_layers(len(layers), num_layers)
    partial.make_trainable(base, prefix, indices)
    return PreparedModel(
        model=base,
        method=partial.METHOD,
        partial_config=partial.build_config(base, prefix, indices, str(base_dir)),
    )


def prepare_model(
    base_dir: Path,
    params: TrainParams,
    *,
    total_steps: int,
    parent_adapter_dir: Path | None = None,
    device: torch.device | None = None,
) -> PreparedModel:
    """Load the base and make it trainable for the method (the parent's, if any)."""
    device = device or torch.device("cpu")
    method = params.method if parent_adapter_dir is None else parent_method(parent_adapter_dir)
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not supported (one of {', '.join(METHODS)})")
    # A qlora lineage keeps its 4-bit base: its adapters are plain LoRA adapters.
    quantize = params.method == "qlora" and method in ("lora", "qlora")
    if quantize and (problem := qlora_problem()):
        raise MethodUnavailable(problem)
    base = _load_base(base_dir, quantize, device)
    if method == partial.METHOD:
        return _prepare_partial(base, base_dir, params.num_layers, parent_adapter_dir)

    from peft import PeftModel, get_peft_model

    if parent_adapter_dir is None:
        if method in _TARGETED and not params.target_modules:
            targets = default_target_modules(method, base)
            params = dataclasses.replace(params, target_modules=targets)
        model = get_peft_model(base, _peft_config(params, total_steps, base.config.model_type))
        prepared = PreparedModel(model, method, adalora_allocates=method == "adalora")
    else:
        # PEFT refuses is_trainable=True for prompt learning; its weights are then made
        # trainable by hand. Everything else must load trainable: PEFT's default
        # (is_trainable=False) silently trains nothing.
        prompt = method in _PROMPT
        model = PeftModel.from_pretrained(base, str(parent_adapter_dir), is_trainable=not prompt)
        if prompt:
            for p in model.prompt_encoder.parameters():
                p.requires_grad_(True)
        for config in model.peft_config.values():
            config.inference_mode = False
            # The parent's config names the registered base, not a path; PEFT reads the
            # base config from there on save, so point it at the local directory meanwhile.
            config.base_model_name_or_path = str(base_dir)
        prepared = PreparedModel(model, method)
    if method == "adalora":
        prepared.adalora_orth_weight = float(next(iter(model.peft_config.values())).orth_reg_weight)
    if not quantize:  # a 4-bit model is placed by its device_map and cannot move
        model.to(device)
    return prepared
