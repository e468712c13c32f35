"""``nnunet-partial teachers``: one single-organ teacher dataset per label of a merged dataset (CoWAM stage 1).

The work is done by :mod:`nnunet_partial.teachers`; this module is the argparse layer.
"""
from __future__ import annotations


def run(args) -> int:
    from nnunet_partial.teachers import setup_teachers, teacher_runs, train_command, train_teachers

    folds = [str(f) for f in args.f]
    registry = setup_teachers(args.dataset, args.c, plans=args.p, trainer=args.tr, folds=folds, ids=args.ids,
                              labels=args.labels, min_cases=args.min_cases, num_processes=args.np)
    runs = teacher_runs(registry, args.c, folds)
    print("\nTrain the teachers with nnU-Net (or add --train):")
    for entry, conf, fold in runs:
        print("  " + " ".join(train_command(entry, conf, fold)))
    if args.train:
        seconds = train_teachers(registry, args.c, folds, device=args.device)
        print(f"teachers trained ({seconds / 60:.1f} min).")
    print(f"\nThen: nnunet-partial pseudolabel {args.dataset} -c {args.c[0]} -f {folds[0]}")
    return 0


def register(sub) -> None:
    from nnunet_partial.teachers import DEFAULT_MIN_CASES, DEFAULT_PLANS, DEFAULT_TEACHER_TRAINER
    p = sub.add_parser(
        "teachers", help="make one single-organ teacher dataset per label (CoWAM stage 1), optionally train them",
        description="For every label of a merged dataset: a raw nnU-Net dataset of the cases annotating it (images "
                    "linked, labels binarised), the parent's plans moved over and preprocessed, the parent's "
                    "splits_final.json restricted to its cases (a teacher never trains on a case in the student's "
                    "validation of the same fold), and a registry teachers.json in the parent's nnUNet_preprocessed "
                    "folder. Prints the nnUNetv2_train lines; --train runs them. Re-running skips finished work.")
    p.add_argument("dataset", help="the merged (parent) dataset: id or DatasetXXX_Name; planned already")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], metavar="CONFIGURATION",
                   help="configuration(s) to preprocess and train the teachers in (default 3d_fullres)")
    p.add_argument("-p", default=DEFAULT_PLANS, help=f"plans identifier of the parent to move over (default {DEFAULT_PLANS})")
    p.add_argument("-tr", default=DEFAULT_TEACHER_TRAINER,
                   help=f"trainer of the teachers (default {DEFAULT_TEACHER_TRAINER}; e.g. nnUNetTrainer_250epochs)")
    p.add_argument("-f", nargs="+", default=["0"], metavar="FOLD",
                   help="fold(s) to train: 0-4 (the parent's folds) or all (default 0)")
    p.add_argument("--ids", nargs="+", type=int, metavar="ID",
                   help="dataset ids of the teachers, one per label in label order (default: the next free ids)")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="make teachers for these labels only (default: all)")
    p.add_argument("--min-cases", type=int, default=DEFAULT_MIN_CASES,
                   help=f"refuse a label annotated on fewer cases (default {DEFAULT_MIN_CASES})")
    p.add_argument("--train", action="store_true", help="run the printed nnUNetv2_train lines (skips trained folds, "
                                                        "resumes interrupted ones)")
    p.add_argument("-device", default=None, choices=["cuda", "cpu", "mps"],
                   help="device for --train (default: cuda if available)")
    p.add_argument("-np", type=int, default=2, help="processes for writing and preprocessing (default 2)")
    p.set_defaults(func=run)
