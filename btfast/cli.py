"""The `btfast` command: one subcommand per job, each defined in the module that does the job."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

# subcommand -> "module" or "module:name" whose `add_arguments(parser)` and `run(args) -> int` define it
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("btfast.benchmark.cli", "throughput, latency, memory and accuracy against HF eager and torch.compile"),
    "score": ("btfast.score.cli:score", "score image-text pairs offline (ITM or ITC), resumable"),
    "retrieve": ("btfast.score.cli:retrieve", "ITC top-k candidates re-ranked by ITM, in both directions"),
    "embed": ("btfast.score.cli:embed", "ITC image and text embeddings, written once for indexing"),
}


Flag = tuple[str, tuple[str, ...], str, dict[str, Any]]


def flag(group: str, *names: str, on: str = "", **kw: Any) -> Flag:
    """One row of a flag table: its group's title, option strings, the commands that have it (space-separated; all
    when empty) and `add_argument`'s keywords."""
    return group, names, on, kw


def add_flags(
    parser: argparse.ArgumentParser,
    flags: list[Flag],
    command: str | None = None,
    descriptions: dict[str, str] | None = None,
    **words: str,
) -> None:
    """Add the flags `command` has (all for None) in table order, each group made at its first flag. With a command,
    `{command}` and `{word}` fields in group titles and helps are filled in (a literal brace is written twice)."""
    groups: dict[str, Any] = {}
    for title, names, on, kw in flags:
        if command is not None:
            if on and command not in on.split():
                continue
            title = title.format(command=command, **words)
            kw = dict(kw, help=kw["help"].format(command=command, **words))
        if title not in groups:
            groups[title] = parser.add_argument_group(title, (descriptions or {}).get(title))
        groups[title].add_argument(*names, **kw)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="btfast",
        description="Fast, exact inference for Hugging Face BridgeTower models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if only is None or only == name:
            _load(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the subcommand asked for: `btfast score` need not import the benchmark.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # --ray: the same job on Ray Data (score, embed)
    module = _load("btfast.ray.cli" if getattr(args, "ray", False) else SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


def _load(spec: str) -> Any:
    """The module named by `spec`, or its attribute after a colon."""
    module, _, name = spec.partition(":")
    m = importlib.import_module(module)
    return getattr(m, name) if name else m


if __name__ == "__main__":
    sys.exit(main())
