"""``nnunet-partial pseudolabel``: the pseudo-labelled dataset D̂ from the trained teachers (CoWAM stage 1).

The work is done by :mod:`nnunet_partial.teachers`; this module is the argparse layer.
"""
from __future__ import annotations


def run(args) -> int:
    from nnunet_partial.evaluation import format_table
    from nnunet_partial.teachers import format_quality_table, make_pseudo_labelled_dataset, pseudo_label_quality

    result = make_pseudo_labelled_dataset(
        args.dataset, args.c, str(args.f), dataset_id=args.id, name=args.name, threshold=args.threshold,
        trainer=args.tr, checkpoint=args.chk, save_probabilities=args.save_probabilities,
        use_mirroring=not args.disable_tta, device=args.device, preprocess_configurations=args.preprocess,
        labels=args.labels, num_processes=args.np)
    truth = pseudo_label_quality(result.raw, args.truth, args.np) if args.truth else None
    print(f"\n{result.name}: pseudo-labelled dataset in {result.raw}, preprocessed, the parent's split copied.")
    if result.pseudo_voxels:
        print("voxels filled by each teacher: " + ", ".join(f"{k} {v}" for k, v in result.pseudo_voxels.items()))
    print("\nTeacher quality (Dice on the teacher's own validation cases"
          + (", pseudo labels against --truth" if truth else "") + "):")
    print(format_quality_table(result, truth))
    if truth:
        labels = list(truth["mean"])
        print("\n" + format_table({"pseudo labels vs truth": truth}, labels))
    print(f"\nNext: nnUNetv2_train {result.dataset_id} {args.c} {args.f} -tr nnUNetTrainerCoWAMPseudo")
    return 0


def register(sub) -> None:
    from nnunet_partial.teachers import DEFAULT_THRESHOLD
    p = sub.add_parser(
        "pseudolabel", help="run the teachers over every training case -> pseudo-labelled dataset D̂ (CoWAM stage 1)",
        description="Runs every registered teacher (nnunet-partial teachers) with nnU-Net's predictor over the "
                    "training cases of the parent that do not annotate its label, and combines: a manual label "
                    "always wins; elsewhere a voxel takes the teacher label with the highest probability above "
                    "--threshold, background otherwise. Writes a new raw dataset D̂ (images linked) with the parent's "
                    "annotated_labels plus pseudo_labels, moves the parent's plans over, preprocesses it and copies "
                    "the parent's splits_final.json. Resumable.")
    p.add_argument("dataset", help="the merged (parent) dataset the teachers were made for: id or name")
    p.add_argument("-c", default="3d_fullres", help="configuration of the teachers to run (default 3d_fullres)")
    p.add_argument("-f", default="0", help="fold of the teachers to run (default 0); train the student on D̂ with "
                                           "the same fold")
    p.add_argument("-tr", default=None, help="trainer of the teachers (default: the registry's)")
    p.add_argument("--labels", nargs="+", metavar="NAME",
                   help="use the teachers of these labels only (default: every registered teacher)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="teacher checkpoint (default checkpoint_final.pth)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"a teacher label needs a probability above this (default {DEFAULT_THRESHOLD})")
    p.add_argument("--id", type=int, default=None, help="dataset id of D̂ (default: the next free id)")
    p.add_argument("--name", default=None, help="dataset name of D̂ (default: <parent name>Pseudo)")
    p.add_argument("--preprocess", nargs="+", default=None, metavar="CONFIGURATION",
                   help="also preprocess D̂ for these configurations (always: -c)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="keep each teacher's foreground probability (float16 .npz per case in the work folder)")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring at inference (faster, as nnUNetv2_predict)")
    p.add_argument("--truth", default=None, metavar="FOLDER",
                   help="fully labelled label files (<case><file_ending>) to score the pseudo labels against")
    p.add_argument("-device", default=None, choices=["cuda", "cpu", "mps"], help="default: cuda if available")
    p.add_argument("-np", type=int, default=2, help="processes for writing and preprocessing (default 2)")
    p.set_defaults(func=run)
