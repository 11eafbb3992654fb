"""`seqr`: one command line for the service, its operators and its callers.

Each command lives with the package that implements it; this module only dispatches, so the
arrows point one way (seqr_cli -> seqr_server, seqr_client, seqr_eval). Running a command imports
only its owner: `seqr serve` loads neither the client nor the model stack, and an install
without an extra still runs the commands of the others (the missing one says what to install).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from seqr_core.config_values import ConfigError
from seqr_core.errors import SeqrError

EPILOG = """quick start:
  seqr serve                      # ./data, dev key, demo library, 127.0.0.1:50051, metrics :9464
  seqr describe --library demo    # in another shell
  seqr route --library demo --random 16
"""

# owner module -> (the extra it needs, its commands); the order is the order of `seqr --help`.
OWNERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "seqr_server.cli": ("server", ("serve", "keys", "tokens", "audit", "export", "backup", "restore")),
    "seqr_client.cli": ("client", ("libraries", "adapters", "route", "describe", "calibrate", "health", "train",
                                   "host")),
    "seqr_eval.demo": ("host", ("demo",)),
}


def owner_of(command: str) -> str | None:
    return next((m for m, (_, cmds) in OWNERS.items() if command in cmds), None)


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none (None, False) or says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS, []) or (
                not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {str(default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """`seqr`'s parser class; sub-command parsers inherit it, so all show their defaults."""

    def __init__(self, *args, formatter_class=DefaultsFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def remote_export(args) -> bytes:
    """`seqr export ... --target`: the scorer through the ExportScorer RPC (the client's)."""
    from seqr_client.cli import fetch_scorer
    return fetch_scorer(args)


# Hooks an owner's commands get from the others, imported only when such a command runs.
HOOKS = {"seqr_server.cli": {"remote_export": remote_export}}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `seqr` parser with every owner's commands, or just those of owner module ``only``."""
    ap = Parser(prog="seqr", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="seqr-router: route LLM requests to LoRA adapters from their own "
                            "activations (SEQR). Privacy-first, on-prem gRPC service. Every "
                            "command takes -h/--help.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module, (extra, commands) in OWNERS.items():
        if only in (None, module):
            _mount(sub, module, extra, commands)
    return ap


def _mount(sub, module: str, extra: str, commands: tuple[str, ...]) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        # Keep the command visible and make it say what is missing instead of a traceback.
        for name in commands:
            p = sub.add_parser(name, help=f"(needs the '{extra}' extra)", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=lambda a, e=e: _missing(a.command, extra, e))
        return
    mod.add_commands(sub, **HOOKS.get(module, {}))


def _missing(command: str, extra: str, error: ImportError) -> int:
    print(f"seqr {command}: {error.name or error} is not installed here; install the '{extra}' extra "
          f"(pip install 'seqr-router[{extra}]', or the offline bundle built with it)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((x for x in argv[:1] if not x.startswith("-")), None)
    try:
        args = build_parser(owner_of(command) if command else None).parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as e:         # a flag or SEQR_* variable that does not parse: one line
        print(f"seqr: {e.field}: {e.message}", file=sys.stderr)
        return 2
    except SeqrError as e:
        print(json.dumps({"error": e.code, "field": e.field, "message": str(e)}), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
