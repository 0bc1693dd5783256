"""Constraints of the GPU images, derived from constraints.txt (the CPU lock) so that both
move together: ``make lock`` rewrites them after constraints.txt, and a unit test fails when
they are stale.

- trainer-gpu: the same torch version (2.13.0) as the CPU lock, but PyPI's Linux wheel,
  which is the CUDA build; the CUDA libraries it pulls (nvidia-*) are pinned exactly by
  torch's own metadata. Every other package at the CPU lock's version.
- inference-gpu: vLLM brings its own torch (a newer CUDA build): torch at vLLM's version and
  vLLM itself pinned; everything else at the CPU lock's version.

    python deploy/docker/gpu_constraints.py      # writes deploy/docker/constraints-*.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CPU_LOCK = ROOT / "constraints.txt"
# image -> pins that differ from (or add to) the CPU lock
OVERRIDES: dict[str, dict[str, str]] = {
    "trainer-gpu": {},
    "inference-gpu": {"torch": "2.14.0", "vllm": "0.33.0"},
}


def path(image: str) -> Path:
    return Path(__file__).resolve().parent / f"constraints-{image}.txt"


def _name(line: str) -> str:
    return re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0].strip().lower().replace("_", "-")


def render(image: str, cpu_lock: str) -> str:
    overrides = OVERRIDES[image]
    pins = [
        line
        for line in cpu_lock.splitlines()
        if line.strip() and not line.startswith("#") and _name(line) not in overrides
    ]
    pins += [f"{name}=={version}" for name, version in overrides.items()]
    header = (
        f"# {image} image: generated from constraints.txt by deploy/docker/gpu_constraints.py\n"
        "# (make lock rewrites it); edit OVERRIDES there, not this file.\n"
    )
    return header + "\n".join(sorted(pins, key=_name)) + "\n"


def main() -> None:
    cpu_lock = CPU_LOCK.read_text()
    for image in OVERRIDES:
        path(image).write_text(render(image, cpu_lock))
        print(f"wrote {path(image).relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
