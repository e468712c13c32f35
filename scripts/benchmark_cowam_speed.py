#!/usr/bin/env python
"""CoWAM against stock nnUNetTrainer: train step and exported-network inference. Merged into
scripts/benchmark_speed.py (all trainers, sizes, compile on/off, JSON); this keeps the old command:

    python scripts/benchmark_cowam_speed.py -d 501 -c 3d_fullres --steps 16 --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_speed import main as benchmark_speed  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="501")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--steps", type=int, default=6, help="timed batches (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    return benchmark_speed(["-d", args.dataset, "-c", args.configuration, "--trainers", "nnUNetTrainerCoWAM",
                            "--sizes", "planned", "--steps", str(args.steps), "--warmup", "1", "--threads",
                            str(args.threads), "--device", args.device, "--inference"])


if __name__ == "__main__":
    sys.exit(main())
