"""Write docs/configuration.md from the settings classes, so the documented variables are
exactly the ones the services read. `make docs`; a unit test fails when it is stale."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "configuration.md"
CLASSES = {
    "common (every service)": "ftops_runtime.settings:ServiceSettings",
    "registry": "ftops_registry.settings:RegistrySettings",
    "trainer": "ftops_trainer.settings:TrainerSettings",
    "inference": "ftops_inference.settings:InferenceSettings",
    "gateway": "ftops_gateway.settings:GatewaySettings",
    "monitor": "ftops_monitor.settings:MonitorSettings",
}


def _load(ref: str) -> type[BaseSettings]:
    module, _, name = ref.partition(":")
    cls: type[BaseSettings] = getattr(importlib.import_module(module), name)
    return cls


def render() -> str:
    common = set(_load(CLASSES["common (every service)"]).model_fields)
    parts = [
        "# Configuration",
        "",
        "Every setting is an environment variable `FTOPS_<NAME>`. Each service reads the",
        "common ones plus its own. Generated from the settings classes by",
        "`scripts/gen_config_docs.py`; do not edit by hand.",
        "",
    ]
    for title, ref in CLASSES.items():
        cls = _load(ref)
        parts += [f"## {title}", "", f"`{ref.replace(':', '.')}`", ""]
        parts += ["| variable | default | description |", "|---|---|---|"]
        for name, info in cls.model_fields.items():
            if title.startswith("common") or name not in common:
                default = "(generated)" if info.default_factory else repr(info.default)
                desc = (info.description or "").replace("|", "\\|")
                parts.append(f"| `FTOPS_{name.upper()}` | `{default}` | {desc} |")
        parts.append("")
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/configuration.md is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
