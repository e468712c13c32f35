#!/usr/bin/env python
"""Conversion throughput of ``nnunet-partial convert`` against a plain SimpleITK read+write of the same files.

Builds LiTS- and KiTS19-shaped fake releases (tests/conversion_fakes.py layout: LiTS = uncompressed .nii in
'Training Batch 1/2', KiTS19 = .nii.gz with the slice axis first), then per release and repeat times

  * baseline: ``sitk.WriteImage(sitk.ReadImage(f), out.nii.gz)`` for every image and label file, one process;
  * converter: ``convert_lits`` / ``convert_kits`` with ``-np 1`` (reads, checks geometry and label values,
    writes image + uint8 label into a temp folder, dataset.json, atomic rename),

alternating the order, and prints the best time of each as cases/s and MB/s (MB of source files) and the
ratio converter / baseline (target <= 1.25), in wall-clock time and in CPU time of this process (the CPU ratio
stays meaningful on a machine shared with other jobs, where wall-clock times swing).

    python scripts/benchmark_conversion.py [--cases 6] [--shape 96 256 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import conversion_fakes as cf  # noqa: E402
from dataset_conversion.kits import convert_kits  # noqa: E402
from dataset_conversion.lits import convert_lits  # noqa: E402


def make_volume(shape, seed):
    """CT-like int16 volume with smooth anatomy + noise (compresses like real CT, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    organ = ((z / 0.7) ** 2 + ((y - 0.1) / 0.4) ** 2 + ((x + 0.2) / 0.35) ** 2) < 1
    tumor = organ & ((z ** 2 + (y - 0.15) ** 2 + (x + 0.2) ** 2) < 0.02)
    img = np.where(body, 40, -1000).astype(np.float32) + 60 * organ + 30 * tumor
    img += rng.normal(0, 15, shape).astype(np.float32)
    lab = organ.astype(np.uint8) + tumor.astype(np.uint8)
    return np.clip(img, -1024, 3071).astype(np.int16), lab


def build_lits(root, n, shape):
    for i in range(n):
        a, lab = make_volume(shape, i)
        sp, org = (0.7, 0.7, 1.5), (170.0, 150.0, -400.0)
        cf.write_lits_case(os.path.join(root, "Training Batch 1" if i < 28 else "Training Batch 2"), i,
                           cf.sitk_image(a, sp, org, cf.LITS_DIRECTION), cf.sitk_image(lab, sp, org, cf.LITS_DIRECTION))


def build_kits19(root, n, shape):
    for i in range(n):
        a, lab = make_volume(shape, 100 + i)
        folder = os.path.join(root, "data", f"case_{i:05d}")
        os.makedirs(folder)
        cf.write_kits19_nifti(a, (0.8, 0.8, 3.0), (-200.0, -200.0, 0.0), os.path.join(folder, "imaging.nii.gz"))
        cf.write_kits19_nifti(lab, (0.8, 0.8, 3.0), (-200.0, -200.0, 0.0), os.path.join(folder, "segmentation.nii.gz"))


def source_files(src):
    out = []
    for dp, _, fs in os.walk(src):
        out += [os.path.join(dp, f) for f in fs if f.endswith((".nii", ".nii.gz"))]
    return sorted(out)


def timed(fn):
    """(wall-clock s, CPU s of this process) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def baseline(files, out_dir):
    os.makedirs(out_dir)
    for i, f in enumerate(files):
        sitk.WriteImage(sitk.ReadImage(f), os.path.join(out_dir, f"{i}.nii.gz"), True)


def quietly(fn):
    with open(os.devnull, "w") as devnull:
        out, err, sys.stdout, sys.stderr = sys.stdout, sys.stderr, devnull, devnull
        try:
            fn()
        finally:
            sys.stdout, sys.stderr = out, err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a new temp folder, removed at the end)")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    tmp = tempfile.mkdtemp(dir=args.tmp)
    rows = []
    try:
        for name, build, convert in (
                ("LiTS (.nii)", build_lits, lambda s, r, i: convert_lits(s, i, root=r, num_processes=1)),
                ("KiTS19 (.nii.gz, slice axis first)", build_kits19,
                 lambda s, r, i: convert_kits(s, i, version=19, root=r, num_processes=1))):
            src = os.path.join(tmp, name.split()[0])
            build(src, args.cases, tuple(args.shape))
            files = source_files(src)
            mb = sum(os.path.getsize(f) for f in files) / 1e6
            t_base, t_conv = [], []
            for r in range(args.repeats):
                out = os.path.join(tmp, f"out_{r}")
                order = ("base", "conv") if r % 2 == 0 else ("conv", "base")
                for which in order:
                    if which == "base":
                        t_base.append(timed(lambda: baseline(files, os.path.join(out, "baseline"))))
                    else:
                        t_conv.append(timed(lambda: quietly(lambda: convert(src, os.path.join(out, "raw"), 900 + r))))
                shutil.rmtree(out)
            rows.append((name, args.cases, mb, min(t[0] for t in t_base), min(t[0] for t in t_conv),
                         min(t[1] for t in t_base), min(t[1] for t in t_conv)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    z, y, x = args.shape
    print(f"\n{args.cases} cases of {z}x{y}x{x} int16 + uint8 label per release, best of {args.repeats}, 1 process, "
          f"{os.cpu_count()} CPU(s)\n")
    print("| source | cases | source MB | SimpleITK read+write: s, cases/s, MB/s | nnunet-partial convert: s, cases/s, "
          "MB/s | ratio (convert / plain) | CPU s: plain, convert, ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, mb, tb, tc, cb, cc in rows:
        print(f"| {name} | {n} | {mb:.0f} | {tb:.2f} s, {n / tb:.2f}, {mb / tb:.1f} | {tc:.2f} s, {n / tc:.2f}, "
              f"{mb / tc:.1f} | {tc / tb:.2f}x | {cb:.2f}, {cc:.2f}, {cc / cb:.2f}x |")
    worst = max(r[4] / r[3] for r in rows)
    worst_cpu = max(r[6] / r[5] for r in rows)
    print(f"\nworst ratio {worst:.2f}x wall-clock, {worst_cpu:.2f}x CPU (target <= 1.25x): "
          f"{'OK' if worst <= 1.25 else 'ABOVE TARGET'}; load average {os.getloadavg()[0]:.1f}")
    return 0 if worst <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(main())
