"""``nnunet-partial evaluate``: Dice and HD95 per label and case, partial-aware with a dataset.json."""
from __future__ import annotations

import json


def run(args) -> int:
    from nnunet_partial.annotations import PartialAnnotations
    from nnunet_partial.evaluation import evaluate_folders, format_table, save_results

    with open(args.dataset_json) as f:
        dataset_json = json.load(f)
    annotations = None if args.ignore_annotations else PartialAnnotations.from_dataset_json(dataset_json)
    labels = {k: v for k, v in dataset_json["labels"].items() if k != "background"}
    results = evaluate_folders(args.pred, args.ref, labels, dataset_json.get("file_ending", ".nii.gz"),
                               annotations=annotations, num_processes=args.np)
    names = list(labels)
    print(f"{len(results['per_case'])} case(s){' (partial-aware)' if annotations else ''}; "
          f"missing predictions: {len(results['missing_predictions'])}")
    print("Dice")
    print(format_table({args.name: results}, names, "Dice"))
    print("HD95 [mm]")
    print(format_table({args.name: results}, names, "HD95", digits=2))
    out = args.output or f"{args.pred.rstrip('/')}/evaluation.json"
    save_results(results, out)
    print(f"written: {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice + HD95 per label and case of a prediction folder",
                       description="Compare a folder of predicted label maps with a folder of references (same "
                                   "file names). Labels come from dataset.json; if it holds annotated_labels, a "
                                   "label is scored only on cases where it was annotated.")
    p.add_argument("-pred", "--pred", required=True, help="folder of predictions")
    p.add_argument("-ref", "--ref", required=True, help="folder of reference label maps")
    p.add_argument("-dj", "--dataset-json", required=True, help="dataset.json naming the labels (and annotated_labels)")
    p.add_argument("-o", "--output", default=None, help="JSON output file (default: PRED/evaluation.json)")
    p.add_argument("--ignore-annotations", action="store_true", help="score every label on every case")
    p.add_argument("--name", default="prediction", help="row name in the printed table")
    p.add_argument("-np", type=int, default=2, help="processes (default 2)")
    p.set_defaults(func=run)
