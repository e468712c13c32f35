"""What keeps an organ from being lost silently: the stratified split and its warnings, annotation-aware
sampling, the per-class diagnostics, the LOST ORGAN warning, and nnUNetTrainerPartialEMA."""
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_helpers import REPO_ROOT, load_trainer, run
from nnunet_partial.evaluation import emergence_epoch
from nnunet_partial.annotations import PartialAnnotations
from nnunet_partial.splits import split_coverage, stratified_crossval_split

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}


def _annotations(cases: dict) -> PartialAnnotations:
    return PartialAnnotations.from_dataset_json({"labels": LABELS, "annotated_labels": cases})


def _demo_like(per_source=4, n_unlabelled=0):
    cases = {f"{o}_{i:03d}": [o] for o in ("liver", "kidney", "spleen", "pancreas") for i in range(per_source)}
    cases.update({f"unlabelled_{i:03d}": [] for i in range(n_unlabelled)})
    return cases


# ---------------------------------------------------------------------- training curves (unit)
def test_emergence_epoch_is_the_first_epoch_reaching_the_threshold():
    assert emergence_epoch([0.0, 0.2, 0.5, 0.9]) == 2          # reaching 0.5 counts
    assert emergence_epoch([0.9, 0.0, 0.0]) == 0               # first, not last
    assert emergence_epoch([0.0, 0.49, 0.3]) is None           # never
    assert emergence_epoch([float("nan"), float("nan"), 0.7]) == 2   # NaN (not scored) never counts
    assert emergence_epoch([]) is None
    assert emergence_epoch([0.2, 0.35], threshold=0.3) == 1


# ---------------------------------------------------------------------- split (unit)
def test_stratified_split_gives_every_fold_its_share_of_every_source():
    cases = _demo_like(per_source=4)
    ann = _annotations(cases)
    splits = stratified_crossval_split(list(cases), ann)
    assert len(splits) == 5
    vals = [s["val"] for s in splits]
    # a partition: every case validated exactly once, never in its own fold's training
    assert sorted(sum(vals, [])) == sorted(cases)
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and len(s["train"]) + len(s["val"]) == len(cases)
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    # 4 cases per source over 5 folds: each fold misses at most one source, each source is in 4 folds
    for v in vals:
        assert len({c.split("_")[0] for c in v}) >= 3
    assert "spleen" not in split_coverage(ann, splits[0]["train"], splits[0]["val"])["unscorable"]
    assert stratified_crossval_split(list(reversed(list(cases))), ann) == splits  # deterministic


def test_stratified_split_spreads_few_labelled_cases_and_sources():
    cases = _demo_like(per_source=0, n_unlabelled=20)
    cases.update({f"full_{i:03d}": list(LABELS)[1:] for i in range(5)})
    ann = _annotations(cases)
    provenance = {c: {"source": "A" if c.startswith("unlabelled") and int(c[-3:]) % 2 else "B"} for c in cases}
    splits = stratified_crossval_split(list(cases), ann, provenance)
    # the random KFold of stock nnU-Net can put two of five labelled cases into one fold; this never does
    assert all(sum(c.startswith("full") for c in s["val"]) == 1 for s in splits)
    assert all(split_coverage(ann, s["train"], s["val"])["labelled_val"] == 1 for s in splits)
    for source in "AB":
        per_fold = [sum(provenance[c]["source"] == source for c in s["val"] if c.startswith("unl")) for s in splits]
        assert max(per_fold) - min(per_fold) <= 1


def test_split_coverage_names_what_a_fold_cannot_score_or_learn():
    ann = _annotations({"a": ["liver"], "b": ["spleen"], "c": ["liver", "kidney"], "u": []})
    cover = split_coverage(ann, train_keys=["a", "b", "u"], val_keys=["c"])
    assert cover == {"unscorable": ["spleen"], "untrained": ["kidney"], "labelled_val": 1}
    assert split_coverage(ann, ["a", "b", "c"], ["u"])["labelled_val"] == 0


# ---------------------------------------------------------------------- sampler
def test_annotation_aware_loader_puts_every_label_into_batches(partial_dataset):
    from nnunet_partial.dataloading import AnnotationAwareDataLoader
    from nnunet_partial.trainers import nnUNetTrainerPartial

    trainer = load_trainer(nnUNetTrainerPartial, partial_dataset.name)
    dl_train, dl_val = trainer.get_dataloaders()
    loader = dl_train.data_loader
    assert isinstance(loader, AnnotationAwareDataLoader)
    assert type(dl_val.data_loader).__name__ == "nnUNetDataLoader"  # validation sampling stays nnU-Net's
    batch = next(dl_train)  # the real pipeline still runs end to end
    assert batch["data"].shape[0] == trainer.batch_size
    ann = trainer.annotations
    labels_in_train = set().union(*(ann.annotated[c] for c in loader.indices))
    k = len(loader.cases_by_label)
    assert k == len(labels_in_train)
    np.random.seed(0)
    seen = np.zeros(ann.num_classes)
    rounds = 30
    for _ in range(rounds):
        # consecutive batches of size B < K cover K labels within ceil(K / B) batches
        covered = set()
        for _ in range(int(np.ceil(k / min(loader.batch_size, k)))):
            keys = loader.get_indices()
            assert len(keys) == loader.batch_size and set(keys) <= set(loader.indices)
            for key in keys[-min(loader.batch_size, k):]:
                covered |= ann.annotated[key]
        assert covered >= labels_in_train
        for v in labels_in_train:
            seen[v] += 1
    assert seen[1:].min() > 0


def test_stock_sampling_when_disabled_or_on_stock_data(partial_dataset):
    from nnunet_partial.trainers import TRAINERS

    # the benchmark's ablation (and its schedule variants) switches the sampler off
    trainer = load_trainer(TRAINERS["nnUNetTrainerPartialStockSampling_bench"], partial_dataset.name)
    dl_train, _ = trainer.get_dataloaders()
    assert type(dl_train.data_loader).__name__ == "nnUNetDataLoader"


# ---------------------------------------------------------------------- split in the trainer
def test_trainer_writes_stratified_split_and_never_replaces_a_users(make_dataset, capsys):
    from nnunet_partial.trainers import nnUNetTrainerPartial

    ds = make_dataset(540, name="SplitCheck", cases_per_source=3, configurations=("2d",))
    splits_file = os.path.join(ds.preprocessed, "splits_final.json")
    assert not os.path.isfile(splits_file)
    trainer = load_trainer(nnUNetTrainerPartial, ds.name, configuration="2d", initialize=False)
    trainer.initialize()
    tr, val = trainer.do_split()
    ann = trainer.annotations
    assert json.load(open(splits_file)) == stratified_crossval_split(list(ann.annotated), ann)
    # 3 cases x 4 sources over 5 folds: fold 0 gets cases of 3 sources
    assert len(split_coverage(ann, tr, val)["unscorable"]) <= 1

    # a split the user wrote: kept as it is, and a warning names the label validation cannot score
    user = [{"train": sorted(c for c in ann.annotated if not c.startswith("liver")),
             "val": sorted(c for c in ann.annotated if c.startswith("liver"))}]
    json.dump(user, open(splits_file, "w"))
    capsys.readouterr()
    trainer = load_trainer(nnUNetTrainerPartial, ds.name, configuration="2d")
    tr, val = trainer.do_split()
    assert json.load(open(splits_file)) == user and val == user[0]["val"]
    out = capsys.readouterr().out
    assert "no validation case of fold 0 annotates ['kidney', 'spleen', 'pancreas']" in out
    assert "no training case of fold 0 annotates ['liver']" in out
    os.remove(splits_file)


# ---------------------------------------------------------------------- lost-organ warning
def test_lost_organ_warning_names_an_organ_no_validation_case_shows(partial_dataset, tmp_path, capsys):
    from nnunet_partial.trainers import nnUNetTrainerPartial

    trainer = load_trainer(nnUNetTrainerPartial, partial_dataset.name)
    pred = tmp_path / "validation"
    pred.mkdir()
    for i, present in enumerate(([0, 1, 2], [0, 1, 4])):
        arr = np.zeros((4, 8, 8), np.uint8)
        for j, v in enumerate(present):
            arr[j] = v
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(pred / f"case{i}.nii.gz"))
    capsys.readouterr()
    assert trainer.warn_lost_organs(str(pred)) == ["spleen"]
    out = capsys.readouterr().out
    assert "LOST ORGAN: ['spleen'] predicted on none of the 2 validation cases" in out
    assert "Pseudo Dice" not in out   # no epoch logged: nothing to say about the curve
    # the per-epoch pseudo Dice (liver, kidney, spleen, pancreas) tells "not learned yet" from "forgotten"
    log = trainer.logger.get_value("dice_per_class_or_region", step=None)   # the logger's own list
    log[:] = [[0.3, 0.1, 0.0, 0.0], [0.8, 0.6, 0.2, 0.7]]
    trainer.warn_lost_organs(str(pred))
    assert "Pseudo Dice of ['spleen'] never reached 0.5 in 2 epochs: not learned yet." in capsys.readouterr().out
    log[:] = [[0.3, 0.1, 0.0, 0.0], [0.8, 0.6, 0.9, 0.7], [0.8, 0.6, 0.05, 0.7]]
    trainer.warn_lost_organs(str(pred))
    assert "Pseudo Dice of ['spleen (from epoch 1)'] reached 0.5 and was lost again: forgotten." in capsys.readouterr().out
    log[:] = [[0.3, 0.1, float("nan"), 0.0]]   # the validation fold never scored the spleen: no claim either way
    trainer.warn_lost_organs(str(pred))
    assert "Pseudo Dice" not in capsys.readouterr().out
    log[:] = []
    # every organ predicted somewhere: no warning
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 8, 8), 3, np.uint8)), str(pred / "case2.nii.gz"))
    assert trainer.warn_lost_organs(str(pred)) == []
    assert "LOST ORGAN" not in capsys.readouterr().out
    assert trainer.warn_lost_organs(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------------- Partial + EMA
def test_partial_ema_step_updates_the_twin_and_exports_it(partial_dataset, tmp_path):
    from nnunet_partial.trainers import nnUNetTrainerPartialEMA
    from nnunet_partial.trainers.common import schedule_capped_decay

    trainer = load_trainer(nnUNetTrainerPartialEMA, partial_dataset.name)
    assert trainer.exported_candidate == "ema"  # the default when validation cannot decide
    trainer.on_train_start()
    try:
        batch = next(trainer.dataloader_train)
        before = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
        trainer.train_step(batch)
        assert trainer.global_step == 1 and trainer.ema.num_updates == 1
        # first warm-up update copies the network (decay min(1 - 1/1, a) = 0)
        for (k, v), p in zip(trainer.ema.module.named_parameters(), trainer.network.parameters()):
            assert torch.equal(v, p), k
        assert any(not torch.equal(before[k], v) for k, v in trainer.ema.module.state_dict().items())
        assert trainer.effective_ema_decay() == schedule_capped_decay(0.999, trainer.total_iterations(), 0.05)
        trainer.save_checkpoint(str(tmp_path / "ckpt.pth"))
        ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
        for k, v in ckpt["network_weights"].items():
            assert torch.equal(v, trainer.ema.module.state_dict()[k])
        assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["network_weights"])
    finally:
        trainer.on_train_end()


@pytest.mark.integration
def test_partial_ema_trains_and_predicts_through_stock_cli(partial_dataset, nnunet_env, tmp_path):
    trainer = "nnUNetTrainerPartialEMA_tiny"
    out = run(["nnUNetv2_train", str(partial_dataset.dataset_id), "2d", "0", "-tr", trainer, "-device", "cpu"],
              env=nnunet_env).stdout
    assert "exported:" in out
    fold = os.path.join(nnunet_env["nnUNet_results"], partial_dataset.name, f"{trainer}__nnUNetPlans__2d", "fold_0")
    assert os.path.isfile(os.path.join(fold, "progress_partial.png"))
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["nnunet_partial"]["exported_candidate"] in ("ema", "network")
    assert len(ckpt["logging"]["predicted_fraction_per_class"]) == 2  # per-class diagnostics, every epoch
    # the curves script reads this real checkpoint: one row per run, an emergence cell per organ, the figure
    curves = run([sys.executable, os.path.join(REPO_ROOT, "scripts", "organ_curves.py"), "--group", f"tiny={fold}",
                  "--png", str(tmp_path / "curves.png")], env=nnunet_env).stdout
    header = next(line for line in curves.splitlines() if line.strip().startswith("run"))
    assert header.split() == ["run", "liver", "kidney", "spleen", "pancreas"]
    assert "tiny: 1 runs, 2 epochs" in curves and curves.count("emerged: ") == 4
    pseudo = np.asarray(ckpt["logging"]["dice_per_class_or_region"], dtype=float)
    row = curves.splitlines()[curves.splitlines().index(header) + 1].split()[-4:]
    for cell, column in zip(row, pseudo.T):
        expected = emergence_epoch(column)
        assert cell == ("n/a" if not np.isfinite(column).any() else "never" if expected is None else str(expected))
    assert os.path.getsize(tmp_path / "curves.png") > 0
    images = tmp_path / "images"
    images.mkdir()
    os.symlink(os.path.join(partial_dataset.raw, "imagesTr", "full_001_0000.nii.gz"), images / "full_001_0000.nii.gz")
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "pred"), "-d", str(partial_dataset.dataset_id),
         "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env=nnunet_env)
    assert os.path.isfile(tmp_path / "pred" / "full_001.nii.gz")
