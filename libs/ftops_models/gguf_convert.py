"""A GGUF checkpoint converted into a Hugging Face model directory, once.

transformers reads GGUF (with the ``gguf`` package) and dequantizes it to float, but the
model it returns carries the GGUF quantization config and ``save_pretrained`` refuses it.
The weights go into a plain ``LlamaForCausalLM`` built from the same config without it,
the embeddings are tied again, and that is saved as safetensors with the tokenizer (and
its chat template). ``ftops_model.json``, written last, records the source's sha256 and
every written file's: its presence marks a complete conversion.

Refused with the reason: a file that is not GGUF or is cut short (a truncated download),
and an architecture the converter does not build (only Llama-family checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ftops_runtime.errors import InvalidArgument

# Bump whenever the conversion changes the files it writes.
CONVERTER_VERSION = "1"
METADATA_FILE = "ftops_model.json"
# GGUF "general.architecture" values this converter turns into LlamaForCausalLM.
SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 20


class GGUFError(InvalidArgument):
    """The GGUF file cannot be converted; the message says why."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _field_text(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def inspect_gguf(path: Path) -> dict[str, Any]:
    """The GGUF's architecture, name, chat template and tensor count, once the whole file
    is known to be there; GGUFError otherwise."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise GGUFError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path.name} is not a GGUF file (it starts with {magic!r}, not GGUF)")
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    # The reader slices a memory map: a short file fails wherever the cut falls.
    except Exception as exc:
        raise GGUFError(
            f"{path.name} cannot be read as GGUF ({size:,} bytes): truncated download? ({exc})"
        ) from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if not reader.tensors or end > size:
        raise GGUFError(
            f"{path.name} is truncated: its tensors need {end:,} bytes, the file has {size:,}"
            if reader.tensors
            else f"{path.name} holds no tensors"
        )
    architecture = _field_text(reader, "general.architecture") or ""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path.name} is a {architecture or 'unnamed'!r} model: the converter builds "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models only"
        )
    return {
        "architecture": architecture,
        "name": _field_text(reader, "general.name") or path.stem,
        "chat_template": _field_text(reader, "tokenizer.chat_template"),
        "tensors": len(reader.tensors),
        "bytes": size,
    }


def _plain_llama(loaded: Any) -> Any:
    """The dequantized weights in a LlamaForCausalLM with no quantization config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(settings))
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    # Every weight must have come from the file: strict=False only tolerates the tied
    # lm_head a checkpoint with shared embeddings does not carry.
    missing = set(model.state_dict()) - set(loaded.state_dict())
    if missing - {"lm_head.weight"}:
        raise GGUFError(f"the GGUF lacks weights: {', '.join(sorted(missing)[:5])}")
    model.generation_config = loaded.generation_config
    return model


def _convert_into(gguf_path: Path, out: Path, info: dict[str, Any], source_sha: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = _plain_llama(loaded)
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None) and info["chat_template"]:
        tokenizer.chat_template = info["chat_template"]
    tokenizer.save_pretrained(out)
    files = {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    meta = {
        "name": info["name"],
        "architecture": info["architecture"],
        "converter_version": CONVERTER_VERSION,
        "source": {"file": gguf_path.name, "sha256": source_sha, "bytes": info["bytes"]},
        "files": files,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "convert_seconds": round(time.monotonic() - started, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_metadata(model_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((Path(model_dir) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data


def _is_conversion_of(model_dir: Path, source_sha: str) -> bool:
    meta = read_metadata(model_dir)
    return (
        meta is not None
        and meta.get("converter_version") == CONVERTER_VERSION
        and meta.get("source", {}).get("sha256") == source_sha
    )


def verify(model_dir: Path) -> list[str]:
    """Files whose sha256 differs from the recorded one (or that are gone)."""
    meta = read_metadata(model_dir) or {}
    return [
        name
        for name, digest in sorted(meta.get("files", {}).items())
        if not (model_dir / name).is_file() or file_sha256(model_dir / name) != digest
    ]


def convert_gguf(gguf_path: Path, out_dir: Path, *, force: bool = False) -> Path:
    """``out_dir`` holding the GGUF converted to a Hugging Face directory; an existing
    conversion of the same file (by sha256) by this converter version is reused."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    target = Path(out_dir).expanduser()
    info = inspect_gguf(gguf_path)
    source_sha = file_sha256(gguf_path)
    if not force and _is_conversion_of(target, source_sha):
        return target
    if target.exists() and any(target.iterdir()) and read_metadata(target) is None and not force:
        raise FileExistsError(f"{target} is non-empty and not a conversion; pass force=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the final rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_into(gguf_path, tmp, info, source_sha)
        os.chmod(tmp, 0o755)  # a shared cache: services may run as other users
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        return _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> Path:
    """Move a finished conversion into place, replacing an older one."""
    try:
        os.rename(tmp, target)  # also succeeds over an empty directory
        return target
    except OSError:
        if not target.exists():
            raise
    trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, trash)
    os.rename(tmp, target)
    shutil.rmtree(trash, ignore_errors=True)
    return target
