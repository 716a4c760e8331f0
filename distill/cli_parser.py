"""Argument parsing shared by every console command: usage errors as one line, and commands with
subcommands (``distill-cache build|info``, ``python -m distill.cli train|eval|...``) whose ``--help``
lists each subcommand with its one-line description."""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Tuple

from .errors import DistillError, close_matches

Subcommand = Tuple[str, Callable[[List[str]], int]]  # (one-line help, main taking the remaining arguments)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are DistillErrors: one line naming the argument, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        raise DistillError(f"{self.prog}: {message} (see {self.prog} --help)")


def run_subcommand(prog: str, description: str, commands: Dict[str, Subcommand], argv: List[str]) -> int:
    """Run the subcommand ``argv[0]`` of ``prog`` on the rest of ``argv``; return its exit code.

    ``-h`` / ``--help`` prints each subcommand with its line and returns 0; no subcommand or an
    unknown one is a DistillError naming it and the choices."""
    parser = CommandParser(prog=prog, description=description,
                           epilog=f"'{prog} COMMAND --help' describes a command's arguments.",
                           formatter_class=lambda prog: argparse.HelpFormatter(prog, width=120))
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (line, _) in commands.items():
        subparsers.add_parser(name, help=line)
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if not argv:
        raise DistillError(f"{prog}: a command is required: {', '.join(commands)} (see {prog} --help)")
    if argv[0] not in commands:
        raise DistillError(f"{prog}: unknown command {argv[0]!r}{close_matches(argv[0], commands)}; "
                           f"choose one of: {', '.join(commands)} (see {prog} --help)")
    return commands[argv[0]][1](argv[1:])
