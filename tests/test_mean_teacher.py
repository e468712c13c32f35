"""nnUNetTrainerMeanTeacher: two-stream sampling, train step (consistency reaches the student,
teacher follows the EMA warm-up rule), checkpoints, and the real nnUNetv2_train / predict CLIs."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from nnunet_helpers import load_trainer, predict_one_test_case, resume_after_epoch_0, run

from nnunet_partial.dataloading import (SemiSupervisedSplitError, ShuffledStream, TwoStreamDataLoader,
                                        split_labelled_unlabelled)
from nnunet_partial.trainers import get_trainer
from nnunet_partial.trainers.common import unwrap
from nnunet_partial.trainers.mean_teacher import nnUNetTrainerMeanTeacher

LABELLED = ["liver_001", "liver_002", "spleen_001", "spleen_002", "full_001", "full_002"]
UNLABELLED = [f"unlabelled_{i:03d}" for i in range(1, 7)]
# fold 0: labelled and unlabelled cases in training; fold 1: no unlabelled training case
SPLITS = [
    {"train": [k for k in LABELLED + UNLABELLED if k not in ("full_001", "unlabelled_001")],
     "val": ["full_001", "unlabelled_001"]},
    {"train": LABELLED, "val": ["full_001", "unlabelled_001"]},
]
TRAIN0 = SPLITS[0]["train"]


@pytest.fixture(scope="module")
def semi_dataset(make_dataset):
    """Dataset 520: two single-organ sources x 2, 2 fully labelled, 6 unlabelled cases; small volumes."""
    ds = make_dataset(520, name="SyntheticSemi", sources={"liver": ("liver",), "spleen": ("spleen",)},
                      cases_per_source=2, n_full=2, n_unlabelled=6, shape=(16, 32, 32))
    splits_file = os.path.join(ds.preprocessed, "splits_final.json")
    if not os.path.isfile(splits_file):
        with open(splits_file, "w") as f:
            json.dump(SPLITS, f)
    return ds


@pytest.fixture(scope="module")
def trainer(semi_dataset):
    return _load(semi_dataset)


@pytest.fixture(scope="module")
def batches(trainer):
    """Real training batches from the trainer's own (two-stream) nnU-Net pipeline."""
    dl_train, _ = trainer.get_dataloaders()
    return [next(dl_train) for _ in range(3)]


def _load(semi_dataset, cls=nnUNetTrainerMeanTeacher, fold=0):
    return load_trainer(cls, semi_dataset.name, "3d_fullres", fold)


def _is_unlabelled(keys):
    return [k.startswith("unlabelled") for k in keys]


def _sub_batch(batch, rows):
    """Rows of a real batch (same crops and augmentation)."""
    rows = torch.as_tensor(rows)
    target = batch["target"]
    return {"data": batch["data"][rows],
            "target": [t[rows] for t in target] if isinstance(target, list) else target[rows],
            "keys": [batch["keys"][i] for i in rows.tolist()]}


def _concat(*parts):
    return {"data": torch.cat([p["data"] for p in parts]),
            "target": [torch.cat(ts) for ts in zip(*[p["target"] for p in parts])],
            "keys": sum((p["keys"] for p in parts), [])}


def _state(module):
    return {k: v.detach().clone() for k, v in unwrap(module).state_dict().items()}


# ---------------------------------------------------------------------- two-stream sampling
def test_shuffled_stream_reshuffles_every_pass():
    np.random.seed(0)
    stream = ShuffledStream(list("abcd"))
    draws = stream.take(3) + stream.take(3) + stream.take(6)
    for p in range(3):  # each pass of 4 is a permutation, even across take() boundaries
        assert sorted(draws[4 * p:4 * p + 4]) == list("abcd")
    assert draws[:4] != draws[4:8] or draws[4:8] != draws[8:12]  # reshuffled, not repeated
    more = stream.take(10)  # more than one pass in one batch (2D: many slices of few labelled volumes)
    assert sorted(more[:4]) == sorted(more[4:8]) == list("abcd") and set(more[8:]) < set("abcd")


def test_two_stream_batches(trainer, semi_dataset):
    np.random.seed(1)
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, TRAIN0)
    labelled, unlabelled = split_labelled_unlabelled(TRAIN0, trainer.annotations)
    assert sorted(labelled) == sorted(k for k in TRAIN0 if not k.startswith("unlabelled"))
    patch = trainer.configuration_manager.patch_size
    loader = TwoStreamDataLoader(dataset, 4, patch, patch, trainer.label_manager, oversample_foreground_percent=0.33,
                                 labelled_keys=labelled, unlabelled_keys=unlabelled, labeled_batch_size=3)
    n_batches = 5 * len(unlabelled)
    keys = [loader.get_indices() for _ in range(n_batches)]
    for k in keys:
        assert _is_unlabelled(k) == [True, False, False, False]  # labelled last: nnU-Net oversamples those slots
    lab = [x for k in keys for x in k[1:]]
    unl = [k[0] for k in keys]
    assert Counter(lab) == {c: 3 * n_batches // len(labelled) for c in labelled}  # every labelled case equally
    for p in range(len(unl) // len(unlabelled)):  # unlabelled: one permutation after another
        assert sorted(unl[p * len(unlabelled):(p + 1) * len(unlabelled)]) == sorted(unlabelled)

    # the full batch: nnU-Net's cropping and foreground oversampling run on unlabelled cases too
    # (no foreground locations: random crop) and force foreground into the labelled slots
    loader.oversample_foreground_percent = 1.0
    for _ in range(4):
        batch = loader.generate_train_batch()
        assert batch["data"].shape[0] == 4 and _is_unlabelled(batch["keys"]) == [True, False, False, False]
        assert (batch["target"][0] <= 0).all()  # background, or -1 where nnU-Net pads
        assert all((batch["target"][i] > 0).any() for i in range(1, 4))


def test_trainer_batches_hold_labeled_batch_size_labelled_cases(trainer, batches):
    assert trainer.effective_labeled_batch_size() == 1 and trainer.batch_size == 2  # ceil(2 / 2)
    for b in batches:
        assert _is_unlabelled(b["keys"]) == [True, False]
        assert set(b["keys"]) <= set(TRAIN0)
        assert isinstance(b["target"], list)  # nnU-Net's deep-supervision targets


def test_bad_labeled_batch_size(trainer):
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, TRAIN0)
    patch = trainer.configuration_manager.patch_size
    for lbs in (0, 2):
        with pytest.raises(ValueError, match="labeled_batch_size must be between 1 and"):
            TwoStreamDataLoader(dataset, 2, patch, patch, trainer.label_manager, labelled_keys=["full_002"],
                                unlabelled_keys=["unlabelled_002"], labeled_batch_size=lbs)


def test_clear_error_without_unlabelled_cases(semi_dataset, trainer):
    with pytest.raises(SemiSupervisedSplitError, match="nnUNetTrainerPartial"):
        split_labelled_unlabelled(LABELLED, None, "nnUNetTrainerMeanTeacher")
    with pytest.raises(SemiSupervisedSplitError, match="at least one case with annotated labels"):
        split_labelled_unlabelled(UNLABELLED, trainer.annotations)
    # fold 1 has no unlabelled training case: the trainer refuses before training, naming the fix
    fold1 = _load(semi_dataset, fold=1)
    with pytest.raises(SemiSupervisedSplitError, match="Train with nnUNetTrainerPartial"):
        fold1.get_dataloaders()


# ---------------------------------------------------------------------- train step
def test_consistency_loss_trains_the_student(semi_dataset, batches):
    """All-unlabelled batch: the supervised part is exactly 0, yet the student gets gradients
    (from the weighted consistency term alone) and its weights change."""
    t = _load(semi_dataset)
    batch = _concat(*[_sub_batch(b, [0]) for b in batches[:2]])
    assert all(_is_unlabelled(batch["keys"]))
    t.global_step = t.consistency_rampup_steps()  # ramp-up finished: weight = w_max
    # make the teacher differ from the student so the consistency target is informative
    t.teacher.update(t.network)
    with torch.no_grad():
        for p in t.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = _state(t.network)
    out = t.train_step(batch)
    assert out["supervised_loss"] == 0.0
    assert out["consistency_loss"] > 0 and out["consistency_weight"] == pytest.approx(t.consistency_weight)
    assert out["loss"] == pytest.approx(out["consistency_weight"] * out["consistency_loss"], rel=1e-5)
    grads = [p.grad for p in t.network.parameters()]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    changed = [k for k, v in _state(t.network).items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed
    assert all(p.grad is None for p in t.teacher.module.parameters())


def test_no_consistency_ablation_trains_from_labels_only_and_keeps_the_teacher(semi_dataset, batches):
    """The benchmark ablation: Mean Teacher's batches and EMA export, the consistency computed and logged but
    weighted 0 (also after the ramp-up), so an all-unlabelled batch gives the student no gradient."""
    from nnunet_partial.trainers import TRAINERS
    t = _load(semi_dataset, TRAINERS["nnUNetTrainerMeanTeacherNoConsistency_bench"])
    assert list(t.candidate_networks())[0] == "teacher"
    t.global_step = t.consistency_rampup_steps()
    t.teacher.update(t.network)
    with torch.no_grad():
        for p in t.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = t.train_step(_concat(*[_sub_batch(b, [0]) for b in batches[:2]]))
    assert out["consistency_weight"] == 0 and out["consistency_loss"] > 0 and out["loss"] == 0
    assert all(p.grad is None or not p.grad.any() for p in t.network.parameters())
    assert t.teacher.num_updates == 2


def test_strong_consistency_variant_reaches_its_weight_at_thirty_percent_of_the_run(semi_dataset):
    """The benchmark variant: w(t) = 1 * exp(-5 (1 - t/T)^2) with T = 30 % of the optimiser steps, then 1."""
    from nnunet_partial.trainers import TRAINERS
    t = _load(semi_dataset, TRAINERS["nnUNetTrainerMeanTeacherStrongConsistency_bench"])
    total = t.total_iterations()
    assert t.consistency_rampup_steps() == round(0.3 * total)
    for step, expected in ((0, math.exp(-5)), (t.consistency_rampup_steps() // 2, math.exp(-5 * 0.5 ** 2)),
                           (t.consistency_rampup_steps(), 1.0), (total - 1, 1.0)):
        t.global_step = step
        assert t.current_consistency_weight() == pytest.approx(expected, rel=0.02), step


def test_supervised_loss_uses_only_the_labelled_cases(semi_dataset, batches):
    t = _load(semi_dataset)
    batch = batches[0]
    labelled = _sub_batch(batch, [1])
    with torch.no_grad():
        output = t.network(labelled["data"])
        expected = t.supervised_loss(output, labelled["target"], t.batch_annotated_mask(labelled["keys"])).item()
    out = t.train_step(batch)
    assert out["supervised_loss"] == pytest.approx(expected, rel=1e-4)
    assert out["consistency_loss"] > 0


def test_teacher_moves_every_step_and_starts_as_a_copy(semi_dataset, batches):
    t = _load(semi_dataset)
    teacher_prev, student_prev = _state(t.teacher.module), _state(t.network)
    for step, batch in enumerate(batches):
        assert t.global_step == step and t.teacher.num_updates == step
        t.train_step(batch)
        student, teacher = _state(t.network), _state(t.teacher.module)
        if step == 0:  # warm-up rule at t = 0: α_0 = 0, the first update copies the student
            assert all(torch.equal(teacher[k], student[k]) for k in teacher)
        # every tensor the optimiser moved in the student moves in the teacher, at every step (the
        # lowest deep-supervision head has loss weight 0 and no gradient: neither moves)
        trained = {k for k in student if not torch.equal(student[k], student_prev[k])}
        moved = {k for k in teacher if not torch.equal(teacher[k], teacher_prev[k])}
        assert len(trained) > 100 and moved == trained, f"step {step}: {sorted(trained ^ moved)[:5]}"
        teacher_prev, student_prev = teacher, student
    assert t.global_step == len(batches)


def test_teacher_follows_the_warmup_ema_rule(semi_dataset, batches):
    t = _load(semi_dataset)
    teacher_prev = _state(t.teacher.module)
    for step, batch in enumerate(batches):
        t.train_step(batch)
        student, teacher = _state(t.network), _state(t.teacher.module)
        alpha = min(1 - 1 / (step + 1), t.ema_decay)  # reference: min(1 - 1/(global_step + 1), α)
        for k, v in teacher.items():
            if v.is_floating_point():
                torch.testing.assert_close(v, alpha * teacher_prev[k] + (1 - alpha) * student[k], rtol=1e-5, atol=1e-6)
        teacher_prev = teacher


def test_checkpoint_restores_student_teacher_optimiser_and_step(semi_dataset, batches, tmp_path):
    t = _load(semi_dataset)
    for b in batches[:2]:
        t.train_step(b)
    t.exported_candidate = "teacher"  # network_weights then holds the teacher; the student must still come back
    path = str(tmp_path / "checkpoint.pth")
    t.save_checkpoint(path)

    r = _load(semi_dataset)
    r.load_checkpoint(path)
    assert r.global_step == 2 and r.teacher.num_updates == 2 and r.exported_candidate == "teacher"
    for a, b in ((t.network, r.network), (t.teacher.module, r.teacher.module)):
        sa, sb = _state(a), _state(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(v, _state(r.teacher.module)[k]) for k, v in _state(r.network).items())
    opt_a, opt_b = t.optimizer.state_dict()["state"], r.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)
    # and training continues from there: the same next step on both gives the same result
    assert r.current_consistency_weight() == pytest.approx(t.current_consistency_weight())


def test_kl_subclass_and_bad_option(semi_dataset):
    class KL(nnUNetTrainerMeanTeacher):
        consistency_type = "kl"

    assert _load(semi_dataset, KL).consistency_loss.kind == "kl"

    class Bad(nnUNetTrainerMeanTeacher):
        consistency_on = "labelled"

    with pytest.raises(ValueError, match="consistency_on"):
        _load(semi_dataset, Bad)


# ---------------------------------------------------------------------- end to end (real CLIs)
@pytest.mark.integration
def test_cli_train_resume_predict(semi_dataset, nnunet_env, tmp_path):
    name = "nnUNetTrainerMeanTeacher_tiny"
    assert get_trainer(name).__mro__[1] is nnUNetTrainerMeanTeacher
    train = ["nnUNetv2_train", str(semi_dataset.dataset_id), "3d_fullres", "0", "-tr", name, "-device", "cpu"]
    run(train, env=nnunet_env)
    fold = os.path.join(nnunet_env["nnUNet_results"], semi_dataset.name, f"{name}__nnUNetPlans__3d_fullres", "fold_0")
    final = os.path.join(fold, "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    state = ckpt["nnunet_partial"]
    assert state["global_step"] == 8 and state["teacher"]["num_updates"] == 8  # 2 epochs x 4 steps
    assert state["exported_candidate"] in ("student", "teacher")
    for k in ("supervised_loss", "consistency_loss", "consistency_weight", "pseudo_dice_teacher"):
        assert len(ckpt["logging"][k]) == 2
    assert ckpt["logging"]["consistency_weight"][1] > ckpt["logging"]["consistency_weight"][0] > 0
    assert os.path.isfile(os.path.join(fold, "progress_partial.png"))
    log = open(sorted(glob.glob(os.path.join(fold, "training_log_*.txt")))[0]).read()
    assert "Two-stream sampling: 5 labelled and 5 unlabelled training cases, 1 labelled per batch of 2" in log

    # --c from the checkpoint an interruption after epoch 0 would leave
    resumed = resume_after_epoch_0(fold, train, nnunet_env)["nnunet_partial"]
    assert resumed["global_step"] == 12 and resumed["teacher"]["num_updates"] == 12  # +1 epoch of 4 steps

    pred = predict_one_test_case(str(tmp_path), semi_dataset.dataset_id, "3d_fullres", name, (16, 32, 32), nnunet_env)
    assert pred.shape == (16, 32, 32) and set(np.unique(pred)) <= {0, 1, 2, 3, 4}
    shutil.rmtree(tmp_path / "pred")
