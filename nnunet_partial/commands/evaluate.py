"""``nnunet-partial evaluate``: Dice and HD95 per label and case, partial-aware with a dataset.json.

Besides its own table and ``evaluation.json`` (Dice + HD95 by label name) it writes ``PRED/summary.json``
in the layout of nnU-Net's ``nnUNetv2_evaluate_folder`` (nnU-Net's own metrics, plus an ``annotated``
flag per case and label and partial-aware means), so tools that read nnU-Net summaries read it too."""
from __future__ import annotations

import json


def run(args) -> int:
    from nnunet_partial.annotations import PartialAnnotations
    import os

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_partial.evaluation import (compute_metrics_on_folder_partial_aware, evaluate_folders, format_table,
                                           save_results)

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
    # nnU-Net's layout, on the cases that have a prediction (nnU-Net's evaluation refuses missing ones)
    file_ending = dataset_json.get("file_ending", ".nii.gz")
    summary = os.path.join(os.path.dirname(os.path.abspath(out)), "summary.json")
    with _only_predicted_references(args.ref, args.pred, file_ending) as ref:
        values = [int(v) for v in labels.values()]
        if annotations is None:
            compute_metrics_on_folder(ref, args.pred, summary, SimpleITKIO(), file_ending, values, None, args.np)
        else:
            compute_metrics_on_folder_partial_aware(annotations, ref, args.pred, summary, SimpleITKIO(), file_ending,
                                                    values, None, args.np)
    print(f"written: {out}, {summary} (nnU-Net's summary.json layout)")
    return 0


class _only_predicted_references:
    """The reference folder, or a temporary folder of links to the references that have a prediction."""

    def __init__(self, ref: str, pred: str, file_ending: str):
        self.ref, self.pred, self.file_ending, self.tmp = ref, pred, file_ending, None

    def __enter__(self) -> str:
        import os
        import tempfile
        refs = [f for f in os.listdir(self.ref) if f.endswith(self.file_ending)]
        present = [f for f in refs if os.path.isfile(os.path.join(self.pred, f))]
        if len(present) == len(refs):
            return self.ref
        self.tmp = tempfile.TemporaryDirectory()
        for f in present:
            os.symlink(os.path.abspath(os.path.join(self.ref, f)), os.path.join(self.tmp.name, f))
        return self.tmp.name

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


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
