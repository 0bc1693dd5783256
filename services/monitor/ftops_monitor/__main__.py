"""``ftops-monitor``: run the monitor."""

from __future__ import annotations

from ftops_monitor.service import serve
from ftops_monitor.settings import MonitorSettings
from ftops_runtime.app import run_service


def main() -> None:
    run_service("monitor", MonitorSettings, serve)


if __name__ == "__main__":
    main()
