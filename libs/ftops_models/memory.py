"""Will a model fit: its size estimated from the safetensors headers alone (no weight is
read), refused before loading when it exceeds the configured memory.

The estimate is parameters x the bytes of the dtype it loads in (the config's ``dtype`` /
``torch_dtype``, float32 when it names none; the trainer always loads float32). It is a
lower bound: activations, the KV cache and, for training, gradients and optimizer state of
the adapter come on top, which is why a limit is compared against the weights alone with
``headroom`` (the share of the limit the weights may take).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .check import ModelDirError

DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
}
# safetensors dtype tags -> bytes per element (for the parameter count only).
_ST_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# Headers larger than this are not a safetensors header (the format caps it at 100 MB).
_MAX_HEADER = 100 << 20
DEFAULT_HEADROOM = 0.8
_GB = 1024**3


def size_text(n: int) -> str:
    return f"{n / _GB:.2f} GiB" if n >= _GB else f"{n / 2**20:.1f} MiB"


class ModelTooLarge(ModelDirError):
    """The model's weights alone would not fit the memory it may use."""


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    dtype: str
    dtype_bytes: int

    @property
    def weight_bytes(self) -> int:
        return self.parameters * self.dtype_bytes

    def describe(self) -> str:
        return (
            f"{self.parameters / 1e6:,.1f}M parameters x {self.dtype_bytes} bytes "
            f"({self.dtype}) = {size_text(self.weight_bytes)} of weights"
        )


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelDirError(f"{index} is not a safetensors index ({exc})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelDirError(f"{model_dir} has no safetensors weights")


def count_parameters(model_dir: Path) -> int:
    """Elements in every tensor of the model's safetensors files, from their headers; a
    file cut short or not safetensors raises ModelDirError naming it."""
    total = 0
    for path in _weight_files(Path(model_dir)):
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelDirError(f"{path.name} is empty or truncated ({size} bytes)")
                (length,) = struct.unpack("<Q", head)
                if length > min(_MAX_HEADER, size - 8):
                    raise ModelDirError(
                        f"{path.name} is not safetensors or is truncated (header of "
                        f"{length:,} bytes in a file of {size:,})"
                    )
                header = json.loads(f.read(length))
        except OSError as exc:
            raise ModelDirError(f"cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ModelDirError(f"{path.name} has an unreadable header ({exc})") from None
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            total += numel
            end = max(end, int(info["data_offsets"][1]))
            if _ST_BYTES.get(info["dtype"], 0) * numel > int(info["data_offsets"][1]) - int(
                info["data_offsets"][0]
            ):
                raise ModelDirError(f"{path.name}: tensor {name} is shorter than its shape")
        if 8 + length + end > size:
            raise ModelDirError(
                f"{path.name} is truncated: its tensors need {8 + length + end:,} bytes, "
                f"the file has {size:,}"
            )
    return total


def load_dtype(model_dir: Path) -> str:
    """The dtype the config asks weights to load in; float32 when it names none."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype) if str(dtype) in DTYPE_BYTES else "float32"


def estimate_memory(model_dir: Path, dtype: str | None = None) -> MemoryEstimate:
    """The weights' size in memory when loaded as ``dtype`` (default: the config's)."""
    name = dtype or load_dtype(model_dir)
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}: one of {', '.join(DTYPE_BYTES)}")
    return MemoryEstimate(count_parameters(model_dir), name, DTYPE_BYTES[name])


def available_memory() -> int | None:
    """Bytes this process may still use: the cgroup's limit less its usage where one is
    set, else the kernel's MemAvailable; None where neither can be read."""
    candidates: list[int] = []
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    if not candidates and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(candidates) if candidates else None


def check_memory(
    model_dir: Path,
    *,
    limit_mb: float = 0,
    dtype: str | None = None,
    headroom: float = DEFAULT_HEADROOM,
) -> MemoryEstimate:
    """The estimate, once the weights fit ``headroom`` of the limit: ``limit_mb`` when set
    (> 0), else the memory available now. ModelTooLarge, with the estimate, otherwise.
    Nothing is loaded: only the safetensors headers are read."""
    estimate = estimate_memory(Path(model_dir), dtype)
    if limit_mb > 0:
        limit, where = int(limit_mb * 1024 * 1024), f"the configured {limit_mb:,.0f} MiB"
    else:
        avail = available_memory()
        if avail is None:
            return estimate
        limit, where = avail, f"the {size_text(avail)} of memory available now"
    if estimate.weight_bytes > headroom * limit:
        raise ModelTooLarge(
            f"{Path(model_dir).name} is too large to load: {estimate.describe()}, more "
            f"than {headroom:.0%} of {where} (activations and caches need the rest)"
        )
    return estimate


def check_base_model(
    path: Path, *, limit_mb: float = 0, dtype: str | None = None
) -> tuple[Path, MemoryEstimate]:
    """Everything refused at a base model's registration, before any weight is loaded: not
    a model directory (config, safetensors weights, tokenizer), weight files cut short, or
    weights too large for the memory (see ``check_memory``)."""
    from .check import check_model_dir

    model_dir = check_model_dir(path)
    return model_dir, check_memory(model_dir, limit_mb=limit_mb, dtype=dtype)
