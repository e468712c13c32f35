"""nnUNetTrainerPartial through nnU-Net's real CLI: registration, train, resume, predict; and
equivalence with nnUNetTrainer on stock data."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_helpers import load_trainer, run


def test_stock_trainer_lookup_finds_every_trainer(nnunet_env):
    """nnU-Net's own lookup (used by nnUNetv2_train and nnUNetv2_predict) finds each of our classes,
    and each keeps one identity in nnunet_partial.trainers."""
    code = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "from nnunet_partial.trainers import TRAINER_NAMES, get_trainer\n"
        "bad = [n for n in TRAINER_NAMES if find(n) is not get_trainer(n)]\n"
        "assert not bad, bad\n"
        "print(len(TRAINER_NAMES))\n"
    )
    out = run([sys.executable, "-c", code], env=nnunet_env).stdout
    assert int(out.strip().splitlines()[-1]) >= 15


def test_env_command_appends_to_existing_value(nnunet_env):
    env = dict(nnunet_env, nnUNet_extTrainer="/some/other/folder")
    out = run([sys.executable, "-m", "nnunet_partial.cli", "env"], env=env).stdout.strip()
    assert out.startswith("export nnUNet_extTrainer=")
    value = subprocess.run(["bash", "-c", out + ' && echo "$nnUNet_extTrainer"'], capture_output=True,
                           text=True).stdout.strip()
    parts = value.split(os.pathsep)
    assert parts[0] == "/some/other/folder" and parts[1].endswith(os.path.join("nnunet_partial", "ext_trainers"))
    # idempotent: running it twice does not add the folder twice
    again = run([sys.executable, "-m", "nnunet_partial.cli", "env"], env=dict(env, nnUNet_extTrainer=value))
    assert again.stdout.strip().count("ext_trainers") == 1


def _first_batch(trainer):
    dl_train, _ = trainer.get_dataloaders()
    return next(dl_train)


def test_same_loss_as_nnunet_trainer_on_stock_dataset(make_dataset):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_partial.trainers import nnUNetTrainerPartial

    ds = make_dataset(530, name="SyntheticFull", sources={}, n_full=5, partial=False)
    stock = load_trainer(nnUNetTrainer, ds.name)
    ours = load_trainer(nnUNetTrainerPartial, ds.name)
    assert ours.annotations is None
    ours.network.load_state_dict(stock.network.state_dict())
    batch = _first_batch(stock)
    with torch.no_grad():
        out = stock.network(batch["data"])
        assert ours.loss(out, batch["target"]).item() == stock.loss(out, batch["target"]).item()
    # and a full train step from identical states gives identical losses
    ours.optimizer.load_state_dict(stock.optimizer.state_dict())
    assert ours.train_step(batch)["loss"] == pytest.approx(stock.train_step(batch)["loss"], rel=1e-6)


def test_marginal_loss_equals_stock_loss_when_all_cases_are_fully_annotated(make_dataset):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_partial.trainers import nnUNetTrainerPartial

    ds = make_dataset(531, name="SyntheticAllAnnotated", sources={}, n_full=5, partial=True)
    stock = load_trainer(nnUNetTrainer, ds.name)
    ours = load_trainer(nnUNetTrainerPartial, ds.name)
    assert ours.annotations is not None
    batch = _first_batch(stock)
    with torch.no_grad():
        out = stock.network(batch["data"])
        mask = ours.batch_annotated_mask(batch["keys"])
        assert mask.all()
        assert ours.supervised_loss(out, batch["target"], mask).item() == \
            pytest.approx(stock.loss(out, batch["target"]).item(), rel=1e-5)


def test_bad_metadata_is_refused_before_training(make_dataset, nnunet_env, tmp_path):
    """A preprocessed label map holding an organ its case does not list stops initialize()."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunet_partial.annotations import PartialLabelError
    from nnunet_partial.trainers import nnUNetTrainerPartial

    ds = make_dataset(532, name="SyntheticMislabelled", sources={"liver": ["liver"]}, cases_per_source=5)
    dj_path = os.path.join(ds.preprocessed, "dataset.json")
    original = load_json(dj_path)
    try:
        broken = dict(original, annotated_labels={**original["annotated_labels"], "liver_002": ["kidney"]})
        save_json(broken, dj_path)
        with pytest.raises(PartialLabelError, match=r"case 'liver_002'.*\['liver'\].*lists only \['kidney'\]"):
            load_trainer(nnUNetTrainerPartial, ds.name)
    finally:
        save_json(original, dj_path)


@pytest.mark.integration
def test_train_resume_predict_through_stock_cli(partial_dataset, nnunet_env, tmp_path):
    trainer = "nnUNetTrainerPartial_tiny"
    # fresh processes, as a user runs them: nnUNet_extTrainer finds our trainer from the command line
    run(["nnUNetv2_train", str(partial_dataset.dataset_id), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
        env=nnunet_env, fresh_process=True)
    fold = os.path.join(nnunet_env["nnUNet_results"], partial_dataset.name,
                        f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")
    for f in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "validation/summary.json"):
        assert os.path.isfile(os.path.join(fold, f)), f
    summary = json.load(open(os.path.join(fold, "validation", "summary.json")))
    assert summary["partial_aware"] is True
    # every label's mean counts only cases that annotate it
    dj = json.load(open(os.path.join(partial_dataset.raw, "dataset.json")))
    for label, m in summary["mean"].items():
        name = [n for n, v in dj["labels"].items() if str(v) == label][0]
        n_annot = sum(name in dj["annotated_labels"][os.path.basename(c["reference_file"])[:-7]]
                      for c in summary["metric_per_case"])
        assert m["n_cases_annotated"] == n_annot

    # --c: make it look interrupted after epoch 0 (checkpoint_latest at epoch 1), resume, finish epoch 1
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["inference_allowed_mirroring_axes"] is None   # _tiny: no test-time mirroring (smoke-test speed)
    ckpt["current_epoch"] = 1
    for k, v in ckpt["logging"].items():
        ckpt["logging"][k] = v[:1]
    torch.save(ckpt, os.path.join(fold, "checkpoint_latest.pth"))
    os.remove(os.path.join(fold, "checkpoint_final.pth"))
    logs_before = set(glob.glob(os.path.join(fold, "training_log_*.txt")))
    out = run(["nnUNetv2_train", str(partial_dataset.dataset_id), "3d_fullres", "0", "-tr", trainer, "-device", "cpu",
               "--c"], env=nnunet_env, fresh_process=True).stdout
    assert "Epoch 1" in out and "Epoch 0\n" not in out
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert len(set(glob.glob(os.path.join(fold, "training_log_*.txt"))) - logs_before) <= 1

    # stock nnUNetv2_predict loads the checkpoint with no change to nnU-Net
    images = tmp_path / "images"
    images.mkdir()
    for case in ("liver_001", "full_001"):
        src = os.path.join(partial_dataset.raw, "imagesTr", f"{case}_0000.nii.gz")
        os.symlink(src, images / f"{case}_0000.nii.gz")
    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(pred), "-d", str(partial_dataset.dataset_id), "-c",
         "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env=nnunet_env,
        fresh_process=True)
    for case in ("liver_001", "full_001"):
        seg = sitk.ReadImage(str(pred / f"{case}.nii.gz"))
        img = sitk.ReadImage(os.path.join(images, f"{case}_0000.nii.gz"))
        assert seg.GetSize() == img.GetSize() and np.allclose(seg.GetSpacing(), img.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3, 4}


def test_fixed_batch_ablation_trains_with_its_own_batch_size(make_dataset):
    """The benchmark's batch ablation (nnUNetTrainerPartialBatch16, …EMABatch16, …Batch16Foreground) replaces the
    planned batch: the training loader draws 16 cases (5 or 11 of them forced to foreground), and a train step
    runs on them."""
    from nnunet_partial.trainers import (nnUNetTrainerPartialBatch16, nnUNetTrainerPartialBatch16Foreground,
                                         nnUNetTrainerPartialEMABatch16)

    ds = make_dataset(533, name="SyntheticBatch", sources={}, n_full=5, partial=True, configurations=("2d",))
    for cls, forced in ((nnUNetTrainerPartialBatch16, 5), (nnUNetTrainerPartialEMABatch16, 5),
                        (nnUNetTrainerPartialBatch16Foreground, 11)):
        trainer = load_trainer(cls, ds.name, "2d")
        assert trainer.configuration_manager.batch_size != 16 and trainer.batch_size == 16
        augmenter, _ = trainer.get_dataloaders()   # tests run without DA workers: a SingleThreadedAugmenter
        assert sum(augmenter.data_loader.get_do_oversample(i) for i in range(16)) == forced, cls.__name__
        batch = next(augmenter)
        assert batch["data"].shape[0] == 16 and len(batch["keys"]) == 16
        assert np.isfinite(trainer.train_step(batch)["loss"])
