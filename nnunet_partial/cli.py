"""``nnunet-partial``: command-line entry point (argparse subcommands, ``--help`` on each)."""
from __future__ import annotations

import argparse
import importlib
import sys

# each module exposes register(subparsers) and sets `func` on the parsers it adds
COMMAND_MODULES = (
    "nnunet_partial.commands.env",
    "nnunet_partial.commands.check",
    "nnunet_partial.commands.evaluate",
    "nnunet_partial.commands.find_best",
    "nnunet_partial.commands.teachers",
    "nnunet_partial.commands.pseudolabel",
    "nnunet_partial.commands.predict_class",
    "nnunet_partial.commands.demo",
    "dataset_conversion.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-partial",
        description="Train one multi-organ nnU-Net from partially labelled, unlabelled and weakly "
                    "labelled datasets. Run 'nnunet-partial <command> --help' for each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    from nnunet_partial.annotations import PartialLabelError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (PartialLabelError, FileExistsError, FileNotFoundError) as e:
        # user errors: one readable line, no traceback
        print(f"nnunet-partial {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nnunet-partial {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
