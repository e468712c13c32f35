"""One DDP harness for every multi-network trainer (CoWAM, Mean Teacher, Partial + EMA; add later ones
to MULTI_NETWORK_TRAINERS).

Two gloo processes on CPU go through nnU-Net's own DDP set-up: the process group exists before the
trainer (so nnU-Net splits the global batch over the ranks and DDP-wraps the student in
``initialize``), then ``on_train_start`` (data loaders, plans.json, barrier), a few real training
steps and ``on_train_end``. Checked: both ranks hold identical students, EMA twins, optimiser states
and everything else the checkpoint keeps, although their initialisations and batches differ; twins
are never DDP-wrapped; Mean Teacher's two-stream batches keep, summed over the ranks, the labelled
share one process would have; only rank 0 writes checkpoints; the checkpoint written under DDP is
loaded by a single-process ``nnUNetv2_predict``.
"""
from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_helpers import load_trainer, run
from nnunet_partial.dataloading import TwoStreamDataLoader
from nnunet_partial.trainers import TRAINERS, get_trainer
from nnunet_partial.trainers.candidates import CHECKPOINT_KEY
from nnunet_partial.trainers.common import EMATwin, unwrap

MULTI_NETWORK_TRAINERS = ["nnUNetTrainerCoWAM", "nnUNetTrainerMeanTeacher", "nnUNetTrainerPartialEMA",
                          "nnUNetTrainerMLDSMeanTaught"]
WORLD_SIZE = 2
GLOBAL_BATCH = 6   # 3 cases per rank: the labelled share (3) does not split evenly over the ranks
STEPS = 2


@pytest.fixture(scope="module")
def ddp_dataset(make_dataset):
    """Dataset 535 (2d, 16x32x32): one case per single-organ source, 2 fully labelled, 4 unlabelled;
    fold 0 trains on every case (Mean Teacher needs the unlabelled ones) and validates on two."""
    ds = make_dataset(535, configurations=("2d",), name="DDPPartialSemi", cases_per_source=1, n_full=2,
                      n_unlabelled=4, shape=(16, 32, 32), seed=7)
    cases = sorted(f[: -len(".nii.gz")] for f in os.listdir(os.path.join(ds.raw, "labelsTr")))
    with open(os.path.join(ds.preprocessed, "splits_final.json"), "w") as f:
        json.dump([{"train": cases, "val": ["full_001", "liver_001"]}], f)
    return ds


class _CpuDDP(DDP):
    """nnU-Net wraps with ``device_ids=[rank]``, which only a CUDA module accepts; on CPU (gloo) none."""

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module, **kwargs)


def twins(trainer) -> dict:
    """The trainer's EMA twins / teachers, found by type so that new trainers need no entry here."""
    return {name: value for name, value in vars(trainer).items() if isinstance(value, EMATwin)}


def agreed_state(trainer) -> dict:
    """Everything the ranks must agree on (a snapshot: state_dict() returns live tensors)."""
    state = {"network": unwrap(trainer.network).state_dict(), "optimizer": trainer.optimizer.state_dict(),
             **{f"candidate_{n}": unwrap(m).state_dict() for n, m in trainer.candidate_networks().items()},
             "twins": {n: t.module.state_dict() for n, t in twins(trainer).items()},
             "extra": trainer.extra_checkpoint_state()}
    return copy.deepcopy(state)


def flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flatten(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in flatten(value, f"{prefix}/{i}").items()}
    return {prefix: obj}


def assert_same(a: dict, b: dict) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k, va in fa.items():
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, fb[k]), k
        else:
            assert va == fb[k], k


def _worker(rank: int, trainer_name: str, dataset_name: str, folder: str) -> None:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as stock

    torch.set_num_threads(1)
    stock.DDP = _CpuDDP
    dist.init_process_group("gloo", init_method=f"file://{folder}/process_group", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        trainer = load_trainer(get_trainer(f"{trainer_name}_tiny"), dataset_name, "2d", initialize=False)
        # nnU-Net's DDP assumes one GPU per rank; this harness stays on CPU (no CUDA grad scaler either)
        trainer.device, trainer.grad_scaler = torch.device("cpu"), None
        trainer.configuration_manager.configuration["batch_size"] = GLOBAL_BATCH
        # rank-dependent initialisation and sampling: only DDP can make the ranks agree
        torch.manual_seed(1000 + rank)
        np.random.seed(rank)
        if hasattr(trainer, "student_seeds"):   # CoWAM seeds its students itself
            trainer.student_seeds = (100 + rank, 200 + rank)
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        initial = agreed_state(trainer)
        keys, losses = [], []
        for _ in range(STEPS):
            batch = next(trainer.dataloader_train)
            keys.append(list(batch["keys"]))
            losses.append(float(trainer.train_step(batch)["loss"]))
        trainer.save_checkpoint(os.path.join(folder, f"rank{rank}.pth"))   # only rank 0 may write
        trainer.on_train_end()                                              # checkpoint_final.pth
        loader = trainer.dataloader_train.data_loader                       # nnUNet_n_proc_DA=0
        report = {
            "initial": initial, "final": agreed_state(trainer), "keys": keys, "losses": losses,
            "batch_size": trainer.batch_size, "two_stream": isinstance(loader, TwoStreamDataLoader),
            "unlabelled": [[bool(trainer.annotations.is_unlabelled(k)) for k in b] for b in keys],
            # every trained network (the student, CoWAM's second student, ...) is DDP-wrapped
            "students_ddp": {n: isinstance(m, DDP) for n, m in vars(trainer).items()
                             if isinstance(m, torch.nn.Module) and any(p.requires_grad for p in m.parameters())},
            "twins": {n: (isinstance(t.module, DDP), any(p.requires_grad for p in t.module.parameters()))
                      for n, t in twins(trainer).items()},
            "exported": trainer.exported_candidate, "output_folder": trainer.output_folder,
            # MS-KD: (DDP-wrapped, trainable, weights) of each rank's own teachers
            "teachers": [(isinstance(t.network, DDP), any(p.requires_grad for p in t.network.parameters()),
                          copy.deepcopy(t.network.state_dict())) for t in getattr(trainer, "teachers", [])],
        }
        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, report)
        if rank == 0:
            torch.save(gathered, os.path.join(folder, "ranks.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration   # runs nnUNetv2_predict
@pytest.mark.parametrize("trainer_name", [
    pytest.param(n, marks=pytest.mark.skipif(n not in TRAINERS, reason=f"{n} has not landed yet"))
    for n in MULTI_NETWORK_TRAINERS])
def test_ddp_two_gloo_ranks(trainer_name, ddp_dataset, nnunet_env, tmp_path):
    import SimpleITK as sitk
    from nnunet_partial.synthetic import write_test_set

    torch.multiprocessing.spawn(_worker, args=(trainer_name, ddp_dataset.name, str(tmp_path)), nprocs=WORLD_SIZE,
                                join=True)
    rank0, rank1 = torch.load(tmp_path / "ranks.pt", weights_only=False)

    assert rank0["batch_size"] + rank1["batch_size"] == GLOBAL_BATCH    # nnU-Net split the global batch
    assert "network" in rank0["students_ddp"] and all(rank0["students_ddp"].values()), rank0["students_ddp"]
    if trainer_name == "nnUNetTrainerCoWAM":
        assert set(rank0["students_ddp"]) == {"network", "network2"}
    assert rank0["twins"] and all(v == (False, False) for v in rank0["twins"].values()), rank0["twins"]
    assert rank0["losses"] != rank1["losses"]                             # the ranks saw different batches
    assert_same(rank0["initial"], rank1["initial"])                       # DDP broadcast rank 0's weights
    assert_same(rank0["final"], rank1["final"])                           # ... and kept them in step
    before, after = flatten(rank0["initial"]), flatten(rank0["final"])
    for name in rank0["twins"]:                                           # the twins really moved
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(f"/twins/{name}/"))

    if rank0["two_stream"]:
        cls = get_trainer(trainer_name)
        share = cls.labeled_batch_size or math.ceil(GLOBAL_BATCH / 2)     # one process, the global batch
        for step in range(STEPS):
            labelled = [sum(not u for u in r["unlabelled"][step]) for r in (rank0, rank1)]
            # the same count on every rank (batch Dice gathers per-case tensors), rounded up: 2 + 2 for 3
            assert labelled == [math.ceil(share / WORLD_SIZE)] * WORLD_SIZE, (step, labelled)
            for r, n in zip((rank0, rank1), labelled):                    # every rank: both kinds of case
                assert 0 < n < r["batch_size"]

    assert os.path.isfile(tmp_path / "rank0.pth") and not os.path.exists(tmp_path / "rank1.pth")
    final = os.path.join(rank0["output_folder"], "checkpoint_final.pth")
    checkpoint = torch.load(final, map_location="cpu", weights_only=False)
    assert not [k for k in checkpoint["network_weights"] if k.startswith(("module.", "_orig_mod."))]
    exported = checkpoint[CHECKPOINT_KEY]["exported_candidate"]
    assert exported == rank0["exported"]
    assert_same(checkpoint["network_weights"], rank0["final"][f"candidate_{exported}"])

    images, _ = write_test_set(str(tmp_path / "test"), 1, shape=(16, 32, 32))
    out = str(tmp_path / "pred")
    run(["nnUNetv2_predict", "-i", images, "-o", out, "-d", str(ddp_dataset.dataset_id), "-c", "2d", "-f", "0",
         "-tr", f"{trainer_name}_tiny", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
        env={**nnunet_env, "nnUNet_def_n_proc": "1"})
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "test_000.nii.gz")))
    assert prediction.shape == (16, 32, 32) and set(np.unique(prediction)) <= {0, 1, 2, 3, 4}


@pytest.mark.integration
def test_ddp_mskd_each_rank_holds_its_own_frozen_teachers(ddp_dataset, nnunet_env, tmp_path):
    """MS-KD under DDP: each rank loads the (untrained) teachers itself; they stay plain, frozen and equal
    while the DDP-wrapped students agree although their batches differ."""
    import pathlib
    from test_mskd import write_registry, write_teacher
    roots = {k: pathlib.Path(nnunet_env[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    write_registry(roots, write_teacher(roots, "liver", 1, 606, parent=ddp_dataset.name),
                   write_teacher(roots, "kidney", 2, 607, parent=ddp_dataset.name, seed=1), parent=ddp_dataset.name)
    torch.multiprocessing.spawn(_worker, args=("nnUNetTrainerMSKD", ddp_dataset.name, str(tmp_path)),
                                nprocs=WORLD_SIZE, join=True)
    rank0, rank1 = torch.load(tmp_path / "ranks.pt", weights_only=False)
    assert rank0["batch_size"] + rank1["batch_size"] == GLOBAL_BATCH and rank0["losses"] != rank1["losses"]
    assert rank0["students_ddp"] == {"network": True}
    assert_same(rank0["initial"], rank1["initial"])
    assert_same(rank0["final"], rank1["final"])
    assert len(rank0["teachers"]) == len(rank1["teachers"]) == 2
    for (ddp0, grad0, weights0), (ddp1, grad1, weights1) in zip(rank0["teachers"], rank1["teachers"]):
        assert not (ddp0 or grad0 or ddp1 or grad1)
        assert_same(weights0, weights1)
    assert os.path.isfile(tmp_path / "rank0.pth") and not os.path.exists(tmp_path / "rank1.pth")


def test_labelled_share_per_rank():
    from nnunet_partial.trainers.mean_teacher import labelled_per_rank

    assert labelled_per_rank(4, 2, 2) == 1                # 2 of 4 globally: 1 of 2 per GPU
    assert labelled_per_rank(6, 3, 2) == 2                # rounded up: never fewer labelled cases than one process
    assert labelled_per_rank(7, 2, 2) == 1                # per-GPU batches 4 + 3
    assert labelled_per_rank(8, 4, 4) == 1
    # nnU-Net's 3d default batch 2 on 2 GPUs: 1 case per GPU cannot hold both kinds; the message says so
    with pytest.raises(ValueError, match=r"a labelled and an unlabelled case in every GPU's part .* \[1, 1\]"):
        labelled_per_rank(2, 1, 2)
    with pytest.raises(ValueError, match="smaller labeled_batch_size"):
        labelled_per_rank(6, 5, 2)
