#!/usr/bin/env python
"""Speed of nnUNetTrainerMSKD against stock nnUNetTrainer (issue 11, benchmark 2): the MS-KD rows of
scripts/benchmark_speed.py (train step time in one process, alternating pairs on the same batches;
peak memory on CUDA), with the arithmetic floor ``(3 + K)/3`` for the K registered teachers (K teacher
forwards, each about a third of a forward + backward) and the target floor + 0.15. Inference needs no
row: the exported student is nnU-Net's plain network.

The dataset needs its trained teachers first (``nnunet-partial teachers DATASET -c CFG --train``)::

    python scripts/benchmark_mskd.py -d 501 -c 2d [any option of scripts/benchmark_speed.py]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_speed import main as benchmark_speed  # noqa: E402


def main(argv=None) -> int:
    """``benchmark_speed`` for MS-KD only (planned size, compile off, one warm-up pair; any of its options
    given here wins), after the floor line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    dataset = argparse.ArgumentParser(add_help=False)
    dataset.add_argument("-d", "--dataset", default="501")
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunet_partial.annotations import load_teacher_registry
    name = maybe_convert_to_dataset_name(dataset.parse_known_args(argv)[0].dataset)
    registry = load_teacher_registry(os.path.join(nnUNet_preprocessed, name))
    k = len(registry.teachers) if registry is not None else 0
    print(f"MS-KD on {name} with K = {k} registered teacher(s): floor (3 + K)/3 = {(3 + k) / 3:.2f}x stock, "
          f"target ≤ {(3 + k) / 3 + 0.15:.2f}x")
    return benchmark_speed(["--trainers", "nnUNetTrainerMSKD", "--sizes", "planned", "--compile", "off",
                            "--steps", "6", "--warmup", "1", *argv])

if __name__ == "__main__":
    sys.exit(main())
