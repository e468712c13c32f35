"""``nnunet-partial env``: print the shell line that lets nnU-Net find our trainers."""
from __future__ import annotations

import os
import shlex

import nnunet_partial

EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(nnunet_partial.__file__)), "ext_trainers")


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with our folder appended to any existing value (once)."""
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    parts = [p for p in current.split(os.pathsep) if p]
    if EXT_TRAINER_DIR not in parts:
        parts.append(EXT_TRAINER_DIR)
    return os.pathsep.join(parts)


def run(args) -> int:
    print(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value())}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("env", help="print the shell line that registers our trainers with nnU-Net",
                       description="Print `export nnUNet_extTrainer=...` (appending to an existing value). "
                                   'Use as: eval "$(nnunet-partial env)"')
    p.set_defaults(func=run)
