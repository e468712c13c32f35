"""``nnunet-partial convert {lits,kits,msd}`` and ``nnunet-partial merge`` (registered in nnunet_partial.cli)."""
from __future__ import annotations

import argparse

from dataset_conversion.common import DEFAULT_TOLERANCE, default_num_processes


def _common(p: argparse.ArgumentParser, tolerance_default=DEFAULT_TOLERANCE) -> None:
    p.add_argument("-o", "--output-root", default=None,
                   help="folder to write DatasetXXX_Name into (default: $nnUNet_raw)")
    p.add_argument("-np", "--num-processes", dest="np", type=int, default=default_num_processes(),
                   help=f"cases converted in parallel (default {default_num_processes()}); memory ~ one case per "
                        "process")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset with the same id (only after everything succeeded)")
    p.add_argument("--tolerance", type=float, default=tolerance_default,
                   help="geometry tolerance between image and label: spacing relative, origin in voxels, "
                        f"direction absolute (default {DEFAULT_TOLERANCE:g})")


def _run_lits(args) -> int:
    from dataset_conversion.lits import convert_lits
    convert_lits(args.src, args.d, name=args.name or "LiTS", root=_root(args), overwrite=args.overwrite,
                 num_processes=args.np, tolerance=args.tolerance)
    return 0


def _run_kits(args) -> int:
    from dataset_conversion.kits import convert_kits
    convert_kits(args.src, args.d, version=args.version, name=args.name, root=_root(args), overwrite=args.overwrite,
                 num_processes=args.np, tolerance=args.tolerance)
    return 0


def _run_msd(args) -> int:
    from dataset_conversion.msd import convert_msd
    convert_msd(args.src, args.d, name=args.name, root=_root(args), overwrite=args.overwrite,
                num_processes=args.np, tolerance=args.tolerance)
    return 0


def _run_merge(args) -> int:
    from dataset_conversion.merge import merge
    weak: dict = {}
    for key, given in (("image_labels", args.image_labels), ("boxes", args.boxes), ("class_labels", args.class_labels)):
        for item in given or ():
            source, sep, path = item.partition("=")
            if not sep or not source or not path:
                from dataset_conversion.common import ConversionError
                raise ConversionError(f"--{key.replace('_', '-')} {item!r}: expected SOURCE=FILE (a source name of "
                                      "the spec, then the file)")
            weak.setdefault(source, {})[key] = path
    merge(args.spec, root=_root(args), overwrite=args.overwrite, num_processes=args.np, duplicates=args.duplicates,
          allow_mixed_channels=args.allow_mixed_channels, tolerance=args.tolerance, weak_labels=weak)
    return 0


def _root(args) -> str:
    from dataset_conversion.common import resolve_output_root
    return resolve_output_root(args.output_root)


def register(sub) -> None:
    conv = sub.add_parser("convert", help="convert a public release (LiTS, KiTS19/21/23, MSD) to an nnU-Net raw dataset",
                          description="Convert a downloaded public release into $nnUNet_raw/DatasetXXX_Name. Every case "
                                      "is checked (image/label geometry, label values, unreadable files); nothing is "
                                      "written unless all cases succeed.")
    fmt = conv.add_subparsers(dest="format", required=True, metavar="{lits,kits,msd}")

    p = fmt.add_parser("lits", help="LiTS: volume-N.nii / segmentation-N.nii (in 'Training Batch 1/2')",
                       description="LiTS release -> DatasetXXX_LiTS (labels 1 liver, 2 tumor; case ids lits_NNNN).")
    p.add_argument("src", help="the extracted LiTS folder (holding 'Training Batch 1', 'Training Batch 2' or the files)")
    p.add_argument("-d", type=int, required=True, help="target dataset id (1..999)")
    p.add_argument("-n", "--name", default=None, help="target dataset name (default LiTS)")
    _common(p)
    p.set_defaults(func=_run_lits)

    p = fmt.add_parser("kits", help="KiTS19/21/23: case_XXXXX/imaging.nii.gz + segmentation.nii.gz",
                       description="KiTS release -> DatasetXXX_KiTS<version> (labels 1 kidney, 2 tumor, 3 cyst for 21/23). "
                                   "World coordinates of every voxel are kept (KiTS19's slice-first axis order included).")
    p.add_argument("src", help="the kits19/kits21/kits23 folder (holding case_XXXXX or data/case_XXXXX)")
    p.add_argument("-d", type=int, required=True, help="target dataset id (1..999)")
    p.add_argument("--version", type=int, choices=(19, 21, 23), required=True, help="KiTS release")
    p.add_argument("-n", "--name", default=None, help="target dataset name (default KiTS<version>)")
    _common(p)
    p.set_defaults(func=_run_kits)

    p = fmt.add_parser("msd", help="a Medical Segmentation Decathlon task folder (TaskNN_Name)",
                       description="Decathlon task -> DatasetXXX_Name, 4D multi-modal images split into channel files "
                                   "with nnU-Net's split_4d_nifti; macOS '._' files are ignored.")
    p.add_argument("src", help="the extracted TaskNN_Name folder")
    p.add_argument("-d", type=int, default=None, help="target dataset id (default: the task number NN)")
    p.add_argument("-n", "--name", default=None, help="target dataset name (default: Name of TaskNN_Name)")
    _common(p)
    p.set_defaults(func=_run_msd)

    p = sub.add_parser("merge", help="merge converted datasets (+ unlabelled scans) into one partial-label dataset",
                       description="Build one nnU-Net raw dataset from several (see docs/conversion.md for the spec): "
                                   "labels mapped onto one label space, annotated_labels and case_provenance for "
                                   "every case, duplicate images detected by content hash.")
    p.add_argument("spec", help="merge spec (.yaml/.yml or .json)")
    _common(p, tolerance_default=None)
    p.add_argument("--duplicates", choices=("error", "drop"), default=None,
                   help="an image found in two sources: refuse (error, default) or keep the first copy (drop); "
                        "overrides the spec")
    p.add_argument("--allow-mixed-channels", action="store_true", default=None,
                   help="allow sources whose channels differ in kind (e.g. CT with MR); overrides the spec")
    p.add_argument("--image-labels", action="append", metavar="SOURCE=CSV",
                   help="image-level labels of a source: CSV 'case,labels' (target label names separated by ';', "
                        "source case ids); overrides the source's 'image_labels' in the spec; repeat per source")
    p.add_argument("--boxes", action="append", metavar="SOURCE=JSON",
                   help="bounding boxes of a source: JSON {case: {label: [[z0, y0, x0, z1, y1, x1], ...]}} in the "
                        "source image's voxels (upper bound exclusive), mapped through the reorientation; overrides "
                        "the source's 'boxes'; repeat per source")
    p.add_argument("--class-labels", action="append", metavar="SOURCE=CSV",
                   help="image-level classes of a source: CSV 'case,class' (nnUNetTrainerMultiMix); overrides the "
                        "source's 'class_labels'; repeat per source")
    p.set_defaults(func=_run_merge)
