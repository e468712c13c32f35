"""``nnunet-partial demo``: the main job end to end on built-in synthetic data.

1. four single-organ synthetic datasets (liver / kidney / spleen / pancreas annotated, the other
   organs present in the images but stored as background), merged into one nnU-Net dataset
   with ``annotated_labels``, plus a fully labelled test set;
2. ``nnUNetv2_plan_and_preprocess``;
3. ``nnUNetv2_train`` with stock ``nnUNetTrainer`` (naive baseline) and ``nnUNetTrainerPartial``,
   both on the ``_demo`` schedule (reachable through the stock CLI by the same names);
4. ``nnUNetv2_predict`` on the test set and a per-organ Dice table of both.
"""
from __future__ import annotations

import json
import os
import time

DEMO_DATASET_ID = 990
DEMO_BASE_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerPartial")


def run_demo(workdir: str, configuration: str = "2d", cases_per_source: int = 4, n_test: int = 4,
             schedule: str = "demo", device=None, dataset_id: int = DEMO_DATASET_ID, echo=print) -> dict:
    from nnunet_partial.annotations import PROVENANCE_KEY, PartialAnnotations
    from nnunet_partial.evaluation import evaluate_folders, format_table, save_results
    from nnunet_partial.splits import write_stratified_split
    from nnunet_partial.experiment import Workspace, default_device
    from nnunet_partial.synthetic import LABELS, ORGANS, write_partial_dataset, write_test_set

    device = device or default_device()
    trainers = [f"{base}_{schedule}" for base in DEMO_BASE_TRAINERS]
    t_start = time.time()
    ws = Workspace(workdir, echo=echo)
    name = f"Dataset{dataset_id:03d}_DemoPartial"
    steps = 3 + 2 * len(trainers)
    step = iter(range(1, steps + 1))

    echo(f"[{next(step)}/{steps}] synthetic data: 4 single-organ sources x {cases_per_source} cases "
         f"+ {n_test} fully labelled test cases -> {ws.raw}/{name}")
    if not os.path.isdir(os.path.join(ws.raw, name)):
        write_partial_dataset(ws.raw, dataset_id, "DemoPartial", cases_per_source=cases_per_source)
    test_images, test_labels = write_test_set(os.path.join(ws.root, "test"), n_test)

    echo(f"[{next(step)}/{steps}] nnUNetv2_plan_and_preprocess -d {dataset_id} -c {configuration}")
    ws.plan_and_preprocess(dataset_id, [configuration])
    # the stratified split before any training: the stock baseline trains first and would otherwise write nnU-Net's
    # random split, which Partial then keeps (a split on disk is never replaced); fold 0 would miss a source
    with open(os.path.join(ws.raw, name, "dataset.json")) as f:
        dataset_json = json.load(f)
    annotations = PartialAnnotations.from_dataset_json(dataset_json)
    write_stratified_split(os.path.join(ws.preprocessed, name), sorted(annotations.annotated), annotations,
                           dataset_json.get(PROVENANCE_KEY))

    results = {}
    for trainer in trainers:
        echo(f"[{next(step)}/{steps}] nnUNetv2_train {dataset_id} {configuration} 0 -tr {trainer} -device {device}"
             f"  (log: {ws.logs})")
        if not os.path.isfile(os.path.join(ws.results, name, f"{trainer}__nnUNetPlans__{configuration}",
                                           "fold_0", "checkpoint_final.pth")):
            ws.train(dataset_id, configuration, trainer, device=device)
        else:
            echo("    already trained, reusing checkpoint_final.pth")
        out = os.path.join(ws.root, "predictions", trainer)
        echo(f"[{next(step)}/{steps}] nnUNetv2_predict -i {test_images} -o {out} -d {dataset_id} -c {configuration} "
             f"-f 0 -tr {trainer}")
        ws.predict(dataset_id, configuration, trainer, test_images, out, device=device)
        results[trainer] = evaluate_folders(out, test_labels, {k: v for k, v in LABELS.items() if v}, ".nii.gz")
        save_results(results[trainer], os.path.join(out, "evaluation.json"))

    echo(f"[{next(step)}/{steps}] Dice on {n_test} fully labelled test cases ({configuration}, "
         f"{time.time() - t_start:.0f} s in total):")
    echo(format_table(results, list(ORGANS), "Dice"))
    echo("HD95 [mm] (n/a: organ missing from prediction):")
    echo(format_table(results, list(ORGANS), "HD95", digits=1))
    return results


def run(args) -> int:
    run_demo(args.workdir, configuration=args.configuration, cases_per_source=args.cases_per_source,
             n_test=args.n_test, schedule=args.schedule, device=args.device)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on built-in synthetic partial-label data",
                       description="Make four single-organ synthetic datasets, merge them with annotated_labels, "
                                   "plan/preprocess, train stock nnUNetTrainer (naive) and nnUNetTrainerPartial on "
                                   "the short '_demo' schedule, predict a fully labelled test set and print the "
                                   "per-organ Dice of both. Re-running reuses what is already there.")
    p.add_argument("-w", "--workdir", default="nnunet_partial_demo", help="working folder (default ./nnunet_partial_demo)")
    p.add_argument("-c", "--configuration", default="2d", choices=("2d", "3d_fullres"),
                   help="nnU-Net configuration (default 2d: fastest on CPU)")
    p.add_argument("--cases-per-source", type=int, default=4, help="training cases per single-organ source (default 4)")
    p.add_argument("--n-test", type=int, default=4, help="fully labelled test cases (default 4)")
    p.add_argument("--schedule", default="demo", choices=("tiny", "demo", "bench"),
                   help="training schedule of both trainers (default demo; tiny = a 1-minute smoke run)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.set_defaults(func=run)
