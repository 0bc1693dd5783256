"""``ftops``: the operator CLI (see ftops_cli.errors for the exit codes)."""

from ftops_cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
