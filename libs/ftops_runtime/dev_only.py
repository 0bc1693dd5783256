"""Settings that only tests, benchmarks and chaos runs may use: fault injection and the
like. A production configuration (``FTOPS_DEV_MODE`` not true) that sets one is refused at
start, naming it, so a leftover benchmark variable can never make real traffic fail."""

from __future__ import annotations

from typing import Any

from pydantic_settings import BaseSettings

# ``Field(..., json_schema_extra=DEV_ONLY)`` marks a setting as development-only.
DEV_ONLY: dict[str, Any] = {"dev_only": True}


def dev_only_fields(settings_type: type[BaseSettings]) -> list[str]:
    """The names of the settings marked development-only."""
    return [
        name
        for name, info in settings_type.model_fields.items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("dev_only")
    ]


def dev_only_problems(settings: BaseSettings) -> list[str]:
    """One message per development-only setting changed from its default outside
    development mode (none in development mode)."""
    if bool(getattr(settings, "dev_mode", False)):
        return []
    fields = type(settings).model_fields
    problems = []
    for name in dev_only_fields(type(settings)):
        value = getattr(settings, name)
        if value != fields[name].get_default(call_default_factory=True):
            problems.append(
                f"FTOPS_{name.upper()}={value!r} is a fault-injection setting for tests and "
                "benchmarks, accepted only in development mode (FTOPS_DEV_MODE=true); "
                "unset it in production"
            )
    return problems
