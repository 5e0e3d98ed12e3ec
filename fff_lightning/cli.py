"""Command line: ``python -m fff_lightning <command>``. This file only wires; logic lives in the modules."""

from __future__ import annotations

import sys

from fff_lightning.errors import ConfigError

USAGE = """\
usage: python -m fff_lightning <command> [options]

commands:
  budget     trainable parameters of a run config, and --match for a fair comparison
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return
        command, rest = argv[0], argv[1:]
        if command == "budget":
            from fff_lightning import budget_cli

            budget_cli.main(rest)
        else:
            print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            sys.exit(2)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
