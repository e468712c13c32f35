#!/usr/bin/env python
"""Train-step speed of every nnunet-partial trainer against stock ``nnUNetTrainer`` (issue 17).

For each configuration, size and compile setting: stock and one trainer at a time are built in this
process (``nnunet_partial.experiment.load_trainer``, as ``nnUNetv2_train`` builds them); the batches
are drawn beforehand from the trainer's own data loader (its sampling and target format; data
loading is not timed), and the two ``train_step``\\ s run as *pairs* on the same batch, alternating
which one goes first, so that machine load and allocator state hit both alike. The first
``--warmup`` pairs (allocator, cuDNN autotuning, ``torch.compile``) are not timed. Reported per
trainer: median step time, ratio to stock (median of the per-pair ratios), samples/s, and on CUDA
the peak GPU memory of a step (``max_memory_allocated``; both trainers' weights are resident, so
compare the two columns). A trainer that cannot be set up on the dataset (e.g. MS-KD without
teachers, Mean Teacher without unlabelled cases) gets a row with the reason.

Sizes: ``planned`` = the patch and batch nnU-Net planned for the dataset; ``toy`` = ``--toy-patch`` /
``--toy-batch`` with the planned network cut to the stages that patch allows (a launch-bound step:
host overhead shows, arithmetic does not). Compile: ``on`` = nnU-Net's default on CUDA
(``nnUNet_compile=true``: the networks are ``torch.compile``\\ d), ``off``; nnU-Net never compiles on
CPU, so there only ``off`` runs. ``--inference`` adds, for trainers that export one of several
networks, nnU-Net's sliding-window prediction of one case with the exported network vs a stock one
(no mirroring; the target is 1.00x: the same plain network).

Datasets: ``-d`` an id or name in ``nnUNet_preprocessed``; the synthetic partial set 501 (32x64x64
phantoms, as in the tests) is made when asked for and missing. ``--make-synthetic KIND`` writes (when
missing) and plans a synthetic partial set with unlabelled cases and image-level classes under the id
``-d``: ``small`` (32x64x64 phantoms) or ``ct-like``, a realistic CT-like set (1 mm spacing, 200x256x256
voxels; on a GPU machine 3d_fullres then plans nnU-Net's usual ~128^3 patch), refused off CUDA unless
``--force``. With it every trainer runs: its pseudo-labelled D̂ (id ``-d`` + 1, same images and plans) is
written for nnUNetTrainerCoWAMPseudo, and MS-KD gets one untrained teacher per organ (ids ``-d`` + 2 ...,
the student's plans; a teacher's forward costs the same trained or not), registered in the set's
``teachers.json``.

    # the tables of issue 17, on a GPU machine
    python scripts/benchmark_speed.py --make-synthetic ct-like -d 640 -c 3d_fullres 2d --device cuda \\
        --sizes planned toy --compile on off --inference --json speed_gpu.json
    # CPU, toy size (docs/speed.md)
    python scripts/benchmark_speed.py --make-synthetic small -d 622 -c 3d_fullres --sizes toy --steps 3 \\
        --warmup 1 --json speed_cpu.json

Prints a markdown table; ``--json`` writes the rows and the settings.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

TOY_PATCH = {"3d": (32, 64, 64), "2d": (64, 64)}
TOY_BATCH = {"3d": 2, "2d": 16}
CT_LIKE_SHAPE = (200, 256, 256)   # z, y, x voxels at 1 mm


# ---------------------------------------------------------------------------------- datasets
def _plan(dataset_id: int, configurations) -> None:
    env = dict(os.environ, nnUNet_n_proc_DA="1")   # nnU-Net's planner crashes with 0
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations,
                    "-np", str(workers), "-npfp", str(workers)], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def _dataset_name(dataset) -> str | None:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        return None


def ensure_dataset(dataset: str, configurations) -> str:
    """The dataset's name, planned and preprocessed for ``configurations``; 501 (the tests' synthetic partial
    set) is written when missing."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    name = _dataset_name(dataset)
    if name is None:
        if str(dataset) != "501":
            raise SystemExit(f"dataset {dataset} not found in nnUNet_raw / nnUNet_preprocessed")
        from nnunet_partial.synthetic import write_partial_dataset
        write_partial_dataset(nnUNet_raw, 501, name="SyntheticPartial", cases_per_source=3, n_full=1)
        name = _dataset_name(501)
    missing = [c for c in configurations
               if not os.path.isdir(os.path.join(nnUNet_preprocessed, name, f"nnUNetPlans_{c}"))]
    if missing:
        _plan(int(name[7:10]), missing)
    return name


SYNTHETIC = {   # kind -> write_partial_dataset arguments: 4 single-organ sources, fully labelled and unlabelled
    # cases, an image-level lesion class on half of the cases (nnUNetTrainerMultiMix)
    "small": dict(name="SyntheticSpeed", cases_per_source=2, n_full=1, n_unlabelled=3, seed=17, class_task="lesion",
                  class_labelled_fraction=0.5),   # 32x64x64
    "ct-like": dict(name="SyntheticCTLike", cases_per_source=1, n_full=1, n_unlabelled=3, shape=CT_LIKE_SHAPE,
                    seed=17, class_task="lesion", class_labelled_fraction=0.5),
}


class SyntheticSet(NamedTuple):
    """A synthetic speed set and its companions, so that every trainer has what it trains on: ``pseudo`` = its
    pseudo-labelled D̂ (id + 1; the same images, pseudo labels of perfect teachers) for nnUNetTrainerCoWAMPseudo,
    ``teacher_ids`` = ids + 2 ... for MS-KD's single-organ teachers (untrained networks of the student's plans,
    written per plans and configuration: a forward costs the same trained or not)."""
    name: str
    pseudo: str
    teacher_ids: tuple


def _write_synthetic(kind: str, dataset_id: int, **extra) -> None:
    from nnunetv2.paths import nnUNet_raw
    from nnunet_partial import synthetic
    write_nifti = synthetic.write_nifti
    if kind == "ct-like":   # write_partial_dataset writes its phantoms' 3 x 1.5 x 1.5 mm; CT-like is 1 mm
        synthetic.write_nifti = lambda array, path: write_nifti(array, path, spacing_zyx=(1.0, 1.0, 1.0))
    try:
        synthetic.write_partial_dataset(nnUNet_raw, dataset_id, **{**SYNTHETIC[kind], **extra})
    finally:
        synthetic.write_nifti = write_nifti


def make_synthetic(kind: str, dataset_id: int, configurations, plans: str = "nnUNetPlans") -> SyntheticSet:
    """Write (when missing) and plan a synthetic partial dataset with unlabelled cases (Mean Teacher runs too)
    and class labels (MultiMix): ``small`` = the tests' 32x64x64 phantoms at 3 x 1.5 x 1.5 mm, ``ct-like`` =
    200x256x256 at 1 mm; and its D̂ under ``dataset_id + 1``, preprocessed with the same plans."""
    from nnunet_partial.synthetic import ORGANS
    from nnunet_partial.teachers import check_id_free, load_parent, nnunet_roots, preprocess_like_parent
    if _dataset_name(dataset_id) is None:
        _write_synthetic(kind, dataset_id)
    name = ensure_dataset(str(dataset_id), configurations)
    pseudo_id, pseudo = dataset_id + 1, f"Dataset{dataset_id + 1:03d}_{SYNTHETIC[kind]['name']}Pseudo"
    existing = _dataset_name(pseudo_id)
    if existing is None:
        _write_synthetic(kind, pseudo_id, name=pseudo.split("_", 1)[1], pseudo_labelled=True)
    elif existing != pseudo:
        check_id_free(pseudo_id, pseudo)   # refuses, naming the dataset that holds the id
    cases = [f[: -len(".nii.gz")] for f in os.listdir(os.path.join(nnunet_roots()[0], pseudo, "labelsTr"))]
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    preprocess_like_parent(load_parent(name), pseudo_id, pseudo, cases, plans, configurations, workers,
                           echo=lambda *a: None)
    return SyntheticSet(name, pseudo, tuple(dataset_id + 2 + i for i in range(len(ORGANS))))


def register_untrained_teachers(synthetic: SyntheticSet, plans: str, configuration: str) -> None:
    """MS-KD's teachers for ``plans``/``configuration`` (untrained, see SyntheticSet) and the registry naming them."""
    from nnunet_partial.annotations import TeacherRegistry, save_teacher_registry
    from nnunet_partial.synthetic import LABELS, ORGANS
    from nnunet_partial.teachers import nnunet_roots, write_untrained_teacher
    raw, pre, results = nnunet_roots()
    entries = {organ: write_untrained_teacher(raw, pre, results, synthetic.name, organ, LABELS[organ], dataset_id,
                                              plans_name=plans, configuration=configuration, seed=i)
               for i, (organ, dataset_id) in enumerate(zip(ORGANS, synthetic.teacher_ids))}
    save_teacher_registry(TeacherRegistry(synthetic.name, entries), os.path.join(pre, synthetic.name))


def write_toy_plans(dataset_name: str, plans_identifier: str, configuration: str, patch, batch: int) -> str:
    """The name of a plans file written beside ``plans_identifier``: its plans with ``patch``/``batch`` for ``configuration`` and the planned network cut to the
    stages whose total stride divides the patch and leaves at least 4 voxels per axis."""
    from nnunetv2.paths import nnUNet_preprocessed
    folder = os.path.join(nnUNet_preprocessed, dataset_name)
    with open(os.path.join(folder, f"{plans_identifier}.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = f"{plans_identifier}SpeedToy"
    config = plans["configurations"][configuration]
    if len(patch) != len(config["patch_size"]):
        raise SystemExit(f"toy patch {patch} does not fit {configuration} (patch {config['patch_size']})")
    arch = config["architecture"]["arch_kwargs"]
    total, n = [1] * len(patch), 0
    for stride in arch["strides"]:
        total = [t * (s if isinstance(stride, (list, tuple)) else stride) for t, s in
                 zip(total, stride if isinstance(stride, (list, tuple)) else [stride] * len(patch))]
        if any(p % t or p // t < 4 for p, t in zip(patch, total)):
            break
        n += 1
    n = max(n, 2)
    arch.update(n_stages=n, features_per_stage=arch["features_per_stage"][:n], kernel_sizes=arch["kernel_sizes"][:n],
                strides=arch["strides"][:n], n_conv_per_stage=arch["n_conv_per_stage"][:n],
                n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"][:n - 1])
    config.update(patch_size=list(patch), batch_size=int(batch))
    with open(os.path.join(folder, f"{plans['plans_name']}.json"), "w") as f:
        json.dump(plans, f, indent=1)
    return plans["plans_name"]


# ---------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, float]:
    """(seconds, peak GPU MiB or None off CUDA) of ``fn()``."""
    import torch
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return seconds, peak


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """nnU-Net's set-up chatter to /dev/null."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def build(trainer_cls, dataset_name: str, configuration: str, plans: str, device: str, compile_on: bool):
    """A trainer as nnUNetv2_train builds it, ready for ``train_step`` (deep supervision on, training mode)."""
    from nnunet_partial.experiment import load_trainer
    os.environ["nnUNet_compile"] = "true" if compile_on else "false"   # read by nnU-Net's initialize
    trainer = load_trainer(trainer_cls, dataset_name, configuration, device=device, plans_identifier=plans)
    trainer.set_deep_supervision_enabled(True)
    trainer.on_train_epoch_start()
    return trainer


def stock_format(batch) -> bool:
    """Targets stock nnU-Net can read (label maps, one channel per scale); else a trainer's own format."""
    targets = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
    return all(t.shape[1] == 1 for t in targets)


def draw_batches(trainer, n: int) -> list:
    loader, val_loader = trainer.get_dataloaders()
    batches = [next(loader) for _ in range(n)]
    for augmenter in (loader, val_loader):   # background workers (nnUNet_n_proc_DA > 0) end here
        getattr(augmenter, "_finish", lambda: None)()
    return batches


def paired_steps(stock, trainer, batches, stock_batches, warmup: int, device) -> dict:
    """Alternating pairs of train steps on the same batch; returns the timed samples."""
    out = {"stock": [], "trainer": [], "ratio": [], "stock_peak": [], "trainer_peak": []}
    for i, batch in enumerate(batches):
        ref_batch = batch if stock_format(batch) else stock_batches[i]
        runs = [("stock", lambda: stock.train_step(ref_batch)), ("trainer", lambda: trainer.train_step(batch))]
        result = {}
        for name, fn in (runs if i % 2 == 0 else runs[::-1]):
            result[name] = timed(fn, device)
        if i >= warmup:
            for name in ("stock", "trainer"):
                out[name].append(result[name][0])
                out[f"{name}_peak"].append(result[name][1])
            out["ratio"].append(result["trainer"][0] / result["stock"][0])
    return out


def inference_ratio(stock, trainer, device, repeats: int = 3) -> dict:
    """Sliding-window prediction of one preprocessed case: the network nnUNetv2_predict builds from the trainer's
    exported ``network_weights`` vs from a stock checkpoint (no mirroring), alternating, first run untimed."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_partial.trainers.common import unwrap

    case = trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder)[0]
    data = torch.from_numpy(trainer.dataset_class(trainer.preprocessed_dataset_folder, [case]).load_case(case)[0][:])
    data = data.float()

    def predictor_for(t, weights):
        network = type(t).build_network_architecture(
            t.plans_manager, t.configuration_manager, t.num_input_channels, t.label_manager.num_segmentation_heads,
            enable_deep_supervision=False)
        predictor = nnUNetPredictor(use_mirroring=False, device=device, allow_tqdm=False)
        predictor.manual_initialization(network, t.plans_manager, t.configuration_manager, [weights], t.dataset_json,
                                        type(t).__name__, None)
        return predictor

    predictors = {"stock": predictor_for(stock, unwrap(stock.network).state_dict()),
                  "exported": predictor_for(trainer, trainer.exported_network().state_dict())}
    times = {k: [] for k in predictors}
    for i in range(repeats + 1):
        for k, p in (predictors.items() if i % 2 == 0 else reversed(predictors.items())):
            seconds, _ = timed(lambda: p.predict_logits_from_preprocessed_data(data), device)
            if i:
                times[k].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"stock_s": med["stock"], "exported_s": med["exported"], "ratio": med["exported"] / med["stock"]}


def _free(device) -> None:
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args) -> dict:
    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_partial.trainers import DISTINCT_STEP_TRAINERS, get_trainer, needs_pseudo_labels

    device = torch.device(args.device)
    trainers = [get_trainer(n) for n in args.trainers] if args.trainers else list(DISTINCT_STEP_TRAINERS)
    compile_settings = ["off"] if device.type != "cuda" else args.compile
    if args.make_synthetic == "ct-like" and device.type != "cuda" and not args.force:
        raise SystemExit("--make-synthetic ct-like: 200x256x256 volumes are for a GPU machine (--force to write "
                         "and plan them here anyway)")
    synthetic = None
    if args.make_synthetic:
        synthetic = make_synthetic(args.make_synthetic, int(args.dataset), args.configurations, args.plans)
        name = synthetic.name
    else:
        name = ensure_dataset(str(args.dataset), args.configurations)
    rows, n = [], args.warmup + args.steps
    for configuration in args.configurations:
        dim = "3d" if configuration.startswith("3d") else "2d"
        for size in args.sizes:
            toy = (args.toy_patch or TOY_PATCH[dim], args.toy_batch or TOY_BATCH[dim])
            plans = args.plans if size == "planned" else write_toy_plans(name, args.plans, configuration, *toy)
            if synthetic:
                if size == "toy":
                    write_toy_plans(synthetic.pseudo, args.plans, configuration, *toy)
                register_untrained_teachers(synthetic, plans, configuration)
            for compile_setting in compile_settings:
                torch.manual_seed(0)
                np.random.seed(0)
                with quiet(not args.verbose):
                    stock = build(nnUNetTrainer, name, configuration, plans, args.device, compile_setting == "on")
                    stock_batches = draw_batches(stock, n)
                patch = "x".join(map(str, stock.configuration_manager.patch_size))
                common = {"dataset": name, "configuration": configuration, "size": size, "patch": patch,
                          "batch": stock.batch_size, "compile": compile_setting}
                for cls in trainers:
                    dataset = synthetic.pseudo if synthetic and needs_pseudo_labels(cls) else name
                    row = dict(common, trainer=cls.__name__, dataset=dataset)
                    try:
                        with quiet(not args.verbose):
                            trainer = build(cls, dataset, configuration, plans, args.device, compile_setting == "on")
                            batches = draw_batches(trainer, n)
                    except Exception as e:   # a trainer this dataset cannot run: a row that says why
                        rows.append(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                        print(f"{cls.__name__}: not run ({rows[-1]['error']})", file=sys.stderr)
                        continue
                    with quiet(not args.verbose):
                        s = paired_steps(stock, trainer, batches, stock_batches, args.warmup, device)
                    med = statistics.median
                    row.update(steps=len(s["trainer"]), stock_s=med(s["stock"]), trainer_s=med(s["trainer"]),
                               ratio=med(s["ratio"]), samples_per_s=trainer.batch_size / med(s["trainer"]),
                               stock_samples_per_s=stock.batch_size / med(s["stock"]),
                               peak_mib=None if device.type != "cuda" else max(s["trainer_peak"]),
                               stock_peak_mib=None if device.type != "cuda" else max(s["stock_peak"]))
                    if args.inference and hasattr(trainer, "exported_network"):
                        with quiet(not args.verbose):
                            row["inference"] = inference_ratio(stock, trainer, device)
                    rows.append(row)
                    print(format_row(row), file=sys.stderr)
                    del trainer, batches
                    _free(device)
                del stock, stock_batches
                _free(device)
    return {"rows": rows, "settings": settings(args, device)}


def settings(args, device) -> dict:
    import torch
    from importlib.metadata import version
    info = {"argv": sys.argv[1:], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
            "threads": torch.get_num_threads(), "host": platform.node(), "cpu_count": os.cpu_count(),
            "warmup": args.warmup, "steps": args.steps}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


HEADER = ("| configuration | size (patch, batch) | compile | trainer | step, median | stock step | ratio to stock "
          "| samples/s | peak GPU MiB (stock) |\n|---|---|---|---|---|---|---|---|---|")


def format_row(row: dict) -> str:
    where = f"| {row['configuration']} | {row['size']} ({row['patch']}, {row['batch']}) | {row['compile']} | {row['trainer']} |"
    if "error" in row:
        return f"{where} not run: {row['error']} | | | | |"
    peak = "n/a (not CUDA)" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} ({row['stock_peak_mib']:.0f})"
    line = (f"{where} {row['trainer_s']:.3f} s | {row['stock_s']:.3f} s | {row['ratio']:.2f}x | "
            f"{row['samples_per_s']:.3g} | {peak} |")
    if "inference" in row:
        inf = row["inference"]
        line += (f"\n| {row['configuration']} | one case, sliding window | {row['compile']} | {row['trainer']} exported "
                 f"network, inference | {inf['exported_s']:.3f} s | {inf['stock_s']:.3f} s | {inf['ratio']:.2f}x | | |")
    return line


def format_table(result: dict) -> str:
    s = result["settings"]
    head = (f"Train step vs stock nnUNetTrainer: {s['device']}{' (' + s['gpu'] + ')' if 'gpu' in s else ''}, "
            f"torch {s['torch']}, nnunetv2 {s['nnunetv2']}, {s['threads']} threads; median of {s['steps']} paired "
            f"steps after {s['warmup']} warm-up pairs")
    return "\n".join([head, "", HEADER] + [format_row(r) for r in result["rows"]])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="501", help="id or name (default 501, made if missing)")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"])
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (the toy size derives from it)")
    p.add_argument("--trainers", nargs="+", help="trainer names (default: DISTINCT_STEP_TRAINERS, one per train step)")
    p.add_argument("--sizes", nargs="+", choices=("planned", "toy"), default=["planned", "toy"])
    p.add_argument("--toy-patch", type=int, nargs="+", help="default 32 64 64 (3d) / 64 64 (2d)")
    p.add_argument("--toy-batch", type=int, help="default 2 (3d) / 16 (2d)")
    p.add_argument("--compile", nargs="+", choices=("on", "off"), default=["on", "off"],
                   help="CUDA only; nnU-Net never compiles on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed pairs per trainer")
    p.add_argument("--warmup", type=int, default=3, help="untimed pairs first (compile, allocator, autotuning)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--inference", action="store_true", help="also time the exported network's sliding-window "
                                                            "prediction (multi-network trainers)")
    p.add_argument("--make-synthetic", choices=sorted(SYNTHETIC), help="write (when missing) and plan a synthetic "
                   "dataset with id -d first: small (32x64x64) or ct-like (200x256x256 at 1 mm)")
    p.add_argument("--force", action="store_true", help="--make-synthetic ct-like also off CUDA (slow)")
    p.add_argument("--json", help="write rows + settings here")
    p.add_argument("--verbose", action="store_true", help="keep nnU-Net's output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "nnUNet_extTrainer" not in os.environ:
        from nnunet_partial.commands.env import ext_trainer_value
        os.environ["nnUNet_extTrainer"] = ext_trainer_value("")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
