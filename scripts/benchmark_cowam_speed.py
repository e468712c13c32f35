#!/usr/bin/env python
"""Speed of nnUNetTrainerCoWAM against the stock nnUNetTrainer (issue #4, benchmark 2).

In one process, on the same pre-drawn augmented batches (data loading excluded), alternating the
two trainers batch by batch so that machine load hits both alike:

- training step time, stock ``nnUNetTrainer.train_step`` vs ``nnUNetTrainerCoWAM.train_step``, and
  their ratio (arithmetic floor ≈ 2.67: two students' forward + backward plus two forward-only
  twins, against one forward + backward; target ≤ 2.8);
- the EMA update of both twins (timed on its own after each step) as a share of the CoWAM step
  (target < 3 %);
- inference: nnU-Net's sliding-window prediction (``nnUNetPredictor``, no mirroring) of one
  preprocessed case with the network nnUNetv2_predict builds from CoWAM's exported
  ``network_weights`` vs from a stock checkpoint (target ≈ 1.0: the same plain network).

Usage (creates and preprocesses the synthetic dataset if it is missing)::

    eval "$(nnunet-partial env)"   # or set nnUNet_raw/_preprocessed/_results yourself
    python scripts/benchmark_cowam_speed.py -d 501 -c 3d_fullres --steps 6 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def ensure_dataset(dataset_id: int, configuration: str) -> None:
    """Write + preprocess the synthetic partial dataset (as the tests' dataset 501) when absent."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunet_partial.synthetic import write_partial_dataset
    try:
        name = maybe_convert_to_dataset_name(dataset_id)
        if os.path.isdir(os.path.join(nnUNet_preprocessed, name, f"nnUNetPlans_{configuration}")):
            return
    except RuntimeError:
        write_partial_dataset(nnUNet_raw, dataset_id, name="SyntheticPartial", cases_per_source=3, n_full=1)
    env = dict(os.environ, nnUNet_n_proc_DA="1")   # the planner crashes with 0
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "2"],
                   env=env, check=True, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", type=int, default=501)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--steps", type=int, default=6, help="timed batches (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    if "nnUNet_extTrainer" not in os.environ:
        from nnunet_partial.commands.env import ext_trainer_value
        os.environ["nnUNet_extTrainer"] = ext_trainer_value("")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_compile", "false")
    import torch
    torch.set_num_threads(args.threads)
    ensure_dataset(args.dataset, args.configuration)

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunet_partial.trainers.common import unwrap

    device = torch.device(args.device)
    quiet = open(os.devnull, "w")
    stdout, sys.stdout = sys.stdout, quiet   # nnU-Net's set-up chatter
    try:
        stock = get_trainer_from_args(str(args.dataset), args.configuration, 0, "nnUNetTrainer", device=device)
        cowam = get_trainer_from_args(str(args.dataset), args.configuration, 0, "nnUNetTrainerCoWAM", device=device)
        for trainer in (stock, cowam):
            trainer.initialize()
            trainer.set_deep_supervision_enabled(True)
            trainer.on_train_epoch_start()
        dataloader, _ = cowam.get_dataloaders()
        batches = [next(dataloader) for _ in range(args.steps + 1)]
    finally:
        sys.stdout = stdout

    def ema_update():
        cowam.ema1.update(cowam.network)
        cowam.ema2.update(cowam.network2)

    t_stock, t_cowam, t_ema = [], [], []
    for i, batch in enumerate(batches):
        a = _timed(lambda: stock.train_step(batch), device)
        b = _timed(lambda: cowam.train_step(batch), device)   # includes its own EMA updates
        e = _timed(ema_update, device)                         # the same work once more, timed alone
        if i > 0:   # first batch = warm-up
            t_stock.append(a), t_cowam.append(b), t_ema.append(e)
        print(f"batch {i}: stock {a:.3f} s, CoWAM {b:.3f} s, EMA update {e * 1000:.1f} ms", file=sys.stderr)

    # inference: exactly what nnUNetv2_predict builds from each checkpoint's network_weights
    case = cowam.dataset_class.get_identifiers(cowam.preprocessed_dataset_folder)[0]
    data = cowam.dataset_class(cowam.preprocessed_dataset_folder, [case]).load_case(case)[0]
    data = torch.from_numpy(data[:]).float()

    def predictor_for(trainer, weights):
        network = type(trainer).build_network_architecture(
            trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
            trainer.label_manager.num_segmentation_heads, enable_deep_supervision=False)
        predictor = nnUNetPredictor(use_mirroring=False, device=device, allow_tqdm=False)
        predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, [weights],
                                        trainer.dataset_json, type(trainer).__name__, None)
        return predictor

    predictors = {"stock": predictor_for(stock, unwrap(stock.network).state_dict()),
                  "exported": predictor_for(cowam, cowam.exported_network().state_dict())}
    t_inf = {k: [] for k in predictors}
    for i in range(4):
        for k, p in predictors.items():
            t = _timed(lambda: p.predict_logits_from_preprocessed_data(data), device)
            if i > 0:
                t_inf[k].append(t)

    # median = typical; min = least disturbed by other processes (a shared machine)
    med, low = statistics.median, min
    patch = "x".join(map(str, cowam.configuration_manager.patch_size))
    print(f"\nCoWAM speed, dataset {args.dataset} {args.configuration} (patch {patch}, batch "
          f"{cowam.batch_size}), device {args.device}, {args.threads} threads, {len(t_cowam)} timed batches "
          f"after 1 warm-up (inference: {len(t_inf['stock'])} runs, sliding window, no mirroring)\n")
    rows = [
        ("train step, stock nnUNetTrainer", [f"{f(t_stock):.3f} s" for f in (med, low)], ""),
        ("train step, nnUNetTrainerCoWAM", [f"{f(t_cowam):.3f} s" for f in (med, low)], ""),
        ("step ratio CoWAM / stock", [f"{f(t_cowam) / f(t_stock):.2f}x" for f in (med, low)], "≤ 2.8 (floor ≈ 2.67)"),
        ("EMA update, both twins", [f"{f(t_ema) * 1000:.1f} ms" for f in (med, low)], ""),
        ("EMA share of the CoWAM step", [f"{100 * f(t_ema) / f(t_cowam):.2f} %" for f in (med, low)], "< 3 %"),
        ("inference, stock network", [f"{f(t_inf['stock']):.3f} s/case" for f in (med, low)], ""),
        ("inference, CoWAM exported network", [f"{f(t_inf['exported']):.3f} s/case" for f in (med, low)], ""),
        ("inference ratio exported / stock",
         [f"{f(t_inf['exported']) / f(t_inf['stock']):.2f}x" for f in (med, low)], "≈ 1.0"),
    ]
    print("| measure | median | min | target |\n|---|---|---|---|")
    for name, (m, lo), target in rows:
        print(f"| {name} | {m} | {lo} | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
