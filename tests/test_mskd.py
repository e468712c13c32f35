"""MS-KD (METHODS §2): the loss terms by hand, the trainer with real nnU-Net teacher networks, every
refusal, and one run of the whole pipeline through nnU-Net's CLI.

Unit tests compute each term on tiny tensors with plain Python arithmetic. Trainer tests use
isolated nnU-Net folders holding a copy of a real preprocessed dataset (600) and teacher results
folders written as nnU-Net writes them (plans.json, dataset.json, checkpoint_final.pth of a network
built by nnU-Net's ``build_network_architecture``, untrained), so every refusal costs a second. The
integration test trains real teachers of dataset 600 with ``nnunet-partial teachers --train`` (602, 603).
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from nnunet_helpers import cli, load_trainer, run, write_untrained_teacher
from nnunet_partial.annotations import PartialLabelError, TeacherEntry, TeacherRegistry, save_teacher_registry
from nnunet_partial.losses.mskd import (background_consensus_target, downsample_mask, expand_teacher_probabilities,
                                        feature_loss, logit_losses, masked_kl, sorted_channel_log_softmax,
                                        teacher_masks)
from nnunet_partial.trainers import get_trainer
from nnunet_partial.trainers.mskd import encoder_stage_after, nnUNetTrainerMSKD

SOURCES = {"liver": ("liver",), "kidney": ("kidney",)}


def _kl(p, q):
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q) if pc > 0)


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------------------------- loss terms by hand
# two teachers (channels 1 and 3 of a 4-class student), one case, a 1 x 3 patch
Q = torch.tensor([[[[[0.9, 0.3, 0.5]], [[0.1, 0.7, 0.5]]]],      # teacher A: organ at voxel 1; a tie at voxel 2
                  [[[[0.8, 0.6, 0.2]], [[0.2, 0.4, 0.8]]]]])     # teacher B: organ at voxel 2
CHANNELS = [1, 3]


def test_expanded_teacher_probabilities_and_background_consensus():
    qa = expand_teacher_probabilities(Q[0], 1, 4)
    assert qa.shape == (1, 4, 1, 3)
    torch.testing.assert_close(qa[0, :, 0], torch.tensor([[0.9, 0.3, 0.5], [0.1, 0.7, 0.5], [0, 0, 0], [0, 0, 0]]))
    qb = background_consensus_target(Q, CHANNELS, 4)
    torch.testing.assert_close(qb[0, :, 0], torch.tensor([[0.85, 0.45, 0.35], [0.05, 0.35, 0.25], [0, 0, 0],
                                                          [0.1, 0.2, 0.4]]))
    torch.testing.assert_close(qb.sum(1), torch.ones(1, 1, 3))
    with pytest.raises(ValueError, match="not a foreground channel"):
        expand_teacher_probabilities(Q[0], 0, 4)
    with pytest.raises(ValueError, match="2 channels"):
        expand_teacher_probabilities(torch.ones(1, 3, 2), 1, 4)


def test_masks_organ_where_the_teacher_predicts_it_background_where_every_teacher_agrees():
    organ, background = teacher_masks(Q)
    assert organ.tolist() == [[[[False, True, False]]], [[[False, False, True]]]]   # the tie is background
    assert background.tolist() == [[[True, False, False]]]


def test_logit_losses_by_hand():
    logits = torch.tensor([[[0.0, 1.0, -1.0]], [[0.5, 2.0, 0.0]], [[-1.0, 0.0, 1.0]], [[0.2, -0.5, 3.0]]])[None]
    q_s = [_softmax(logits[0, :, 0, i].tolist()) for i in range(3)]
    per_teacher, consensus = logit_losses(Q, logits, CHANNELS)
    # teacher A inside M^A = {voxel 1}, teacher B inside M^B' = {voxel 2}; |R| = 3 voxels
    want = (_kl([0.3, 0.7, 0, 0], q_s[1]) + _kl([0.2, 0, 0, 0.8], q_s[2])) / 3
    assert per_teacher.item() == pytest.approx(want, rel=1e-5)
    # background consensus: voxel 0 only, target (0.85, 0.05, 0, 0.1)
    assert consensus.item() == pytest.approx(_kl([0.85, 0.05, 0, 0.1], q_s[0]) / 3, rel=1e-5)
    # the batch is averaged on top: two identical cases give the same value
    again = logit_losses(torch.cat([Q, Q], 1), torch.cat([logits, logits]), CHANNELS)
    assert again[0].item() == pytest.approx(want, rel=1e-5)


def test_zero_target_probabilities_contribute_zero_and_give_no_nan():
    q = torch.tensor([[[[[1.0, 0.0]], [[0.0, 1.0]]]]])      # one teacher, probabilities exactly 0 and 1
    logits = torch.tensor([[[[-80.0, 80.0]], [[80.0, -80.0]], [[0.0, 0.0]]]], requires_grad=True)
    per_teacher, consensus = logit_losses(q, logits, [1])
    (per_teacher + consensus).backward()
    assert torch.isfinite(per_teacher) and torch.isfinite(consensus) and torch.isfinite(logits.grad).all()
    log_q = torch.log_softmax(logits.detach().double(), 1)
    assert per_teacher.item() == pytest.approx(-log_q[0, 1, 0, 1].item() / 2, rel=1e-5)   # only the q1 = 1 term
    assert consensus.item() == pytest.approx(-log_q[0, 0, 0, 0].item() / 2, rel=1e-5)     # only the q0 = 1 term
    # a target equal to the student's distribution: KL 0, although most target entries are 0
    assert masked_kl(torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[0.0], [-1e30]]]), torch.ones(1, 1)).item() == 0


def test_empty_masks_give_zero_with_the_graph_attached():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    background_only = torch.zeros(1, 2, 2, 4, 4)
    background_only[:, :, 0] = 1.0                           # M^k empty, M^B everywhere
    per_teacher, consensus = logit_losses(background_only, logits, [2])
    assert per_teacher.item() == 0 and consensus.item() > 0
    organ_everywhere = background_only.flip(2)               # M^B empty
    per_teacher, consensus = logit_losses(organ_everywhere, logits, [2])
    assert consensus.item() == 0 and per_teacher.item() > 0
    feature = feature_loss(torch.randn(1, 2, 5, 2, 2), torch.randn(2, 5, 2, 2, requires_grad=True),
                           torch.zeros(1, 2, 4, 4, dtype=torch.bool))
    assert feature.item() == 0 and feature.requires_grad
    (consensus + feature).backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_downsampled_mask_max_and_nearest_by_hand():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 1] = True                                     # only in the first 2x2 cell, not its corner
    mask[0, 2, 2] = mask[0, 2, 3] = True                     # the corner of the last cell
    assert downsample_mask(mask, (2, 2), "max")[0].tolist() == [[True, False], [False, True]]
    assert downsample_mask(mask, (2, 2), "nearest")[0].tolist() == [[False, False], [False, True]]
    vol = torch.zeros(1, 2, 4, 4, dtype=torch.bool)          # 3D, anisotropic pooling (1, 2, 2)
    vol[0, 1, 3, 0] = True
    out = downsample_mask(vol, (2, 2, 2), "max")
    assert out.shape == (1, 2, 2, 2) and out.sum() == 1 and out[0, 1, 1, 0]
    with pytest.raises(ValueError, match="'max' or 'nearest'"):
        downsample_mask(mask, (2, 2), "mean")


def test_feature_loss_sorts_channels_and_uses_the_downsampled_mask_by_hand():
    teacher = torch.tensor([1.0, 3.0, 2.0])
    student = torch.tensor([0.5, -1.0, 2.0])
    assert torch.allclose(sorted_channel_log_softmax(teacher.view(1, 3, 1)).exp().view(-1),
                          torch.tensor(sorted(_softmax(teacher.tolist()), reverse=True)))
    # features 1 x 2 (one organ cell of two), mask 2 x 4 at full resolution -> (1, 2) by max pooling
    t_feat = torch.stack([teacher, torch.zeros(3)], -1).view(1, 1, 3, 1, 2)
    s_feat = torch.stack([student, torch.ones(3)], -1).view(1, 3, 1, 2).requires_grad_(True)
    organ = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    organ[0, 0, 1, 0] = True
    got = feature_loss(t_feat, s_feat, organ)
    want = _kl(sorted(_softmax(teacher.tolist()), reverse=True), sorted(_softmax(student.tolist()), reverse=True)) / 2
    assert got.item() == pytest.approx(want, rel=1e-5)
    # channel order does not matter (teacher and student channels do not correspond), values do
    permuted = s_feat.detach()[:, [2, 0, 1]]
    assert feature_loss(t_feat, permuted, organ).item() == pytest.approx(want, rel=1e-5)
    assert feature_loss(t_feat, s_feat.detach() * 2, organ).item() != pytest.approx(want, rel=1e-3)
    got.backward()
    assert s_feat.grad[..., 0].abs().sum() > 0 and s_feat.grad[..., 1].abs().sum() == 0   # outside the mask: none
    with pytest.raises(ValueError, match="differ in shape"):
        feature_loss(t_feat, torch.zeros(1, 4, 1, 2), organ)


def test_encoder_stage_after_counts_downsamplings():
    strides = [[1, 1], [2, 2], [2, 2], [1, 2]]
    assert [encoder_stage_after(strides, n) for n in (0, 1, 2, 3)] == [0, 1, 2, 3]
    assert encoder_stage_after([1, 1, 2], 0) == 1           # the last stage at that resolution
    with pytest.raises(ValueError, match="no stage after 4"):
        encoder_stage_after(strides, 4)


# ---------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def unit_dataset(make_dataset):
    """Dataset 600 (2d, 8 x 32 x 32): liver / kidney single-organ cases, 3 each."""
    return make_dataset(600, configurations=("2d",), name="MSKDUnit", sources=SOURCES, cases_per_source=3,
                        shape=(8, 32, 32))


@pytest.fixture()
def roots(unit_dataset, tmp_path, monkeypatch):
    """Isolated nnU-Net folders holding dataset 600's plans, dataset.json and preprocessed data (linked)."""
    out = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in out.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    pre = out["nnUNet_preprocessed"] / unit_dataset.name
    pre.mkdir()
    for f in os.listdir(unit_dataset.preprocessed):
        src = os.path.join(unit_dataset.preprocessed, f)
        if os.path.isdir(src):
            os.symlink(src, pre / f)
        elif f != "teachers.json":
            shutil.copy(src, pre / f)
    return out


def write_teacher(roots, label, value, dataset_id, edit_plans=None, labels=None, channels=None, checkpoint=True,
                  parent="Dataset600_MSKDUnit", seed=0) -> TeacherEntry:
    """A teacher results folder as nnU-Net writes it, with an untrained network of its plans."""
    return write_untrained_teacher(str(roots["nnUNet_raw"]), str(roots["nnUNet_preprocessed"]),
                                   str(roots["nnUNet_results"]), parent, label, value, dataset_id,
                                   edit_plans=edit_plans, labels=labels, channels=channels, checkpoint=checkpoint,
                                   seed=seed)


def test_an_untrained_teacher_written_again_is_kept_unless_its_plans_change(roots):
    first = write_teacher(roots, "liver", 1, 604)
    checkpoint = os.path.join(first.results_folder(str(roots["nnUNet_results"]), "2d"), "fold_0", "checkpoint_final.pth")
    weights, mtime = torch.load(checkpoint, weights_only=False)["network_weights"], os.stat(checkpoint).st_mtime_ns
    assert write_teacher(roots, "liver", 1, 604, seed=5) == first and os.stat(checkpoint).st_mtime_ns == mtime
    write_teacher(roots, "liver", 1, 604, edit_plans=_narrow)            # other plans: a new network
    narrowed = torch.load(checkpoint, weights_only=False)["network_weights"]
    assert any(narrowed[k].shape != v.shape for k, v in weights.items())


def write_registry(roots, *entries, parent="Dataset600_MSKDUnit"):
    save_teacher_registry(TeacherRegistry(parent, {e.label: e for e in entries}),
                          str(roots["nnUNet_preprocessed"] / parent))


def two_teachers(roots, **liver_problem):
    entries = [write_teacher(roots, "liver", 1, 604, **liver_problem), write_teacher(roots, "kidney", 2, 605, seed=1)]
    write_registry(roots, *entries)
    return entries


def mskd(cls=nnUNetTrainerMSKD, initialize=True):
    schedule = get_trainer(f"{cls.__name__}_tiny") if cls is nnUNetTrainerMSKD else cls
    return load_trainer(schedule, "Dataset600_MSKDUnit", "2d", initialize=initialize)


def _fake_batch(trainer, seed=0):
    """A batch shaped as nnU-Net's loader makes it (data, deep-supervision targets, case keys)."""
    g = torch.Generator().manual_seed(seed)
    patch = tuple(trainer.configuration_manager.patch_size)
    data = torch.randn((2, trainer.num_input_channels) + patch, generator=g)
    with torch.no_grad():
        shapes = [o.shape[2:] for o in (trainer.network(data) if trainer.enable_deep_supervision else [data])]
    # liver_001 annotates liver (1), kidney_001 kidney (2): a stored label is always an annotated one
    target = [torch.randint(0, 2, (2, 1) + tuple(s), generator=g).float() * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
              for s in shapes]
    return {"data": data, "target": target if trainer.enable_deep_supervision else target[0],
            "keys": ["liver_001", "kidney_001"]}


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_student_gets_gradient_from_every_term_teachers_none_and_do_not_change(roots):
    two_teachers(roots)
    trainer = mskd()
    assert trainer.enable_deep_supervision and trainer.ground_truth_loss_enabled()   # annotated_labels: GT on
    assert [(t.label, t.channel) for t in trainer.teachers] == [("liver", 1), ("kidney", 2)]
    seen = []
    for t in trainer.teachers:
        assert not t.network.training and not any(p.requires_grad for p in t.network.parameters())
        t.network.register_forward_hook(lambda m, a, o: seen.append((torch.is_inference_mode_enabled(),
                                                                     o.is_inference())))
    before = {t.label: _snapshot(t.network) for t in trainer.teachers}
    student_before = _snapshot(trainer.network)
    batch = _fake_batch(trainer)
    annotated = trainer.batch_annotated_mask(batch["keys"])

    probs, feats = trainer.teacher_outputs(batch["data"])
    assert seen == [(True, True), (True, True)]                # the teachers ran under inference_mode
    assert not probs.is_inference() and not feats.is_inference()
    assert probs.shape[:3] == (2, 2, 2) and feats.shape[2] == trainer.configuration_manager.network_arch_init_kwargs[
        "features_per_stage"][1]
    organ, background = teacher_masks(probs)
    assert organ.any() and background.any()                   # every term has voxels to work on
    trainer.network.train()
    for term in ("logit", "background", "feature", "gt"):
        trainer.optimizer.zero_grad(set_to_none=True)
        output = trainer.network(batch["data"])
        terms = trainer.mskd_losses(output, trainer.student_features.pop(), probs, feats, batch["target"], annotated)
        assert terms[term].item() > 0, term
        terms[term].backward()
        grads = [p.grad for p in trainer.network.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, term
        assert all(p.grad is None for t in trainer.teachers for p in t.network.parameters()), term
    # one real optimiser step: the student moves, the teachers do not
    out = trainer.train_step(batch)
    assert set(out) == {"loss", "mskd_logit_loss", "mskd_background_loss", "mskd_feature_loss", "mskd_gt_loss"}
    assert all(np.isfinite(v) for v in out.values())
    assert out["loss"] == pytest.approx(out["mskd_logit_loss"] + out["mskd_background_loss"]
                                        + 10 * out["mskd_feature_loss"] + out["mskd_gt_loss"], rel=1e-4)
    after = _snapshot(trainer.network)
    assert any(not torch.equal(student_before[k], after[k]) for k in after)
    for t in trainer.teachers:
        assert all(torch.equal(before[t.label][k], v) for k, v in t.network.state_dict().items())
    # teachers are not part of the checkpoint's network
    assert set(trainer.exported_network().state_dict()) == set(student_before)


def test_without_the_ground_truth_term_deep_supervision_is_off_and_the_weights_apply(roots):
    two_teachers(roots)

    class NoGT(get_trainer("nnUNetTrainerMSKDNoGroundTruth_tiny")):   # the benchmark's ablation, by name
        lambda_background = 0.0
        lambda_feature = 0.5
        feature_mask_downsampling = "nearest"

    trainer = mskd(NoGT)
    assert not trainer.enable_deep_supervision
    heads = trainer.network.decoder.seg_layers
    # the heads without output are frozen (DDP stops on trainable parameters without gradient)
    assert not any(p.requires_grad for h in heads[:-1] for p in h.parameters())
    before = _snapshot(heads[-1])
    out = trainer.train_step(_fake_batch(trainer))
    assert any(not torch.equal(before[k], v) for k, v in heads[-1].state_dict().items())
    assert math.isnan(out["mskd_gt_loss"]) and out["mskd_background_loss"] > 0
    assert out["loss"] == pytest.approx(out["mskd_logit_loss"] + 0.5 * out["mskd_feature_loss"], rel=1e-4)


def _strides_fewer(config):
    arch = config["architecture"]["arch_kwargs"]
    n = arch["n_stages"] - 1
    arch.update(n_stages=n, **{k: arch[k][:n] for k in ("features_per_stage", "kernel_sizes", "strides",
                                                         "n_conv_per_stage")},
                n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"][:n - 1])


def _narrow(config):
    config["architecture"]["arch_kwargs"]["features_per_stage"][1] += 8


@pytest.mark.parametrize("problem, error, message", [
    ({"checkpoint": False}, FileNotFoundError,
     r"teacher of 'liver' \(Dataset604_MSKDUnitTeacherLiver\): no checkpoint_final.pth .*it is not trained.*"
     r"nnUNetv2_train 604 2d 0"),
    ({"edit_plans": lambda c: c.update(patch_size=[16, 16])}, PartialLabelError,
     r"teacher of 'liver' .* trained with patch_size \[16, 16\] but .*Re-run nnunet-partial teachers 600"),
    ({"edit_plans": lambda c: c.update(spacing=[9.0, 9.0])}, PartialLabelError, r"teacher of 'liver' .* spacing"),
    ({"channels": {"0": "T1", "1": "T2"}}, PartialLabelError, r"teacher of 'liver' .*takes channels.*no teacher"),
    ({"edit_plans": _strides_fewer}, PartialLabelError,
     r"teacher of 'liver' .*pools with strides .*\(\d pooling steps\), the student with .*\(\d\).*nnunet-partial "
     r"teachers 600"),
    ({"edit_plans": _narrow}, PartialLabelError,
     r"teacher of 'liver' .*has \d+ channels after 1 downsampling\(s\), the student \d+"),
    ({"labels": {"background": 0, "liver": 1, "tumour": 2}}, PartialLabelError,
     r"teacher of 'liver' .*predicts labels .*a teacher predicts \{'background': 0, 'liver': 1\}"),
])
def test_teacher_refusals_come_before_training(roots, problem, error, message):
    two_teachers(roots, **problem)
    trainer = mskd(initialize=False)
    with pytest.raises(error, match=message):
        trainer.initialize()
    assert not trainer.was_initialized


def test_registry_refusals(roots):
    trainer = mskd(initialize=False)
    with pytest.raises(FileNotFoundError, match=r"Dataset600_MSKDUnit has no teachers .*teachers.json is missing.*"
                                                r"nnunet-partial teachers 600 -c 2d --train"):
        trainer.initialize()
    liver = write_teacher(roots, "liver", 1, 604)
    write_registry(roots, liver, TeacherEntry("lung", 7, "Dataset606_MSKDUnitTeacherLung", 606, "nnUNetTrainer",
                                              "nnUNetPlans", ("2d",), ("0",), 3))
    with pytest.raises(PartialLabelError, match=r"teacher of 'lung'.*has no label 'lung' of value 7.*re-run "
                                                r"nnunet-partial teachers"):
        mskd(initialize=False).initialize()
    kidney = TeacherEntry("kidney", 2, "Dataset605_MSKDUnitTeacherKidney", 605, "nnUNetTrainer", "nnUNetPlans",
                          ("2d",), ("0",), 3)
    write_registry(roots, liver, kidney)                       # registered, never set up
    with pytest.raises(FileNotFoundError, match=r"teacher of 'kidney' \(Dataset605_MSKDUnitTeacherKidney\) is "
                                                r"missing.*nnunet-partial teachers 600 -c 2d"):
        mskd(initialize=False).initialize()

    class TooDeep(get_trainer("nnUNetTrainerMSKD_tiny")):
        feature_level = 99

    with pytest.raises(PartialLabelError, match="no feature stage for feature_level 99"):
        mskd(TooDeep, initialize=False).initialize()


def test_teacher_fold_and_checkpoint_are_class_attributes(roots):
    two_teachers(roots)

    class Pinned(get_trainer("nnUNetTrainerMSKD_tiny")):
        teacher_fold = "3"

    with pytest.raises(FileNotFoundError, match=r"no checkpoint_final.pth in .*fold_3"):
        mskd(Pinned, initialize=False).initialize()

    class Best(get_trainer("nnUNetTrainerMSKD_tiny")):
        teacher_checkpoint = "checkpoint_best.pth"

    for e in ("Dataset604_MSKDUnitTeacherLiver", "Dataset605_MSKDUnitTeacherKidney"):
        fold = roots["nnUNet_results"] / e / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
        os.rename(fold / "checkpoint_final.pth", fold / "checkpoint_best.pth")
    assert [t.fold for t in mskd(Best).teachers] == ["0", "0"]


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_teachers_then_mskd_train_resume_predict_end_to_end(unit_dataset, nnunet_env, tmp_path):
    import SimpleITK as sitk
    from nnunet_partial.synthetic import write_test_set
    from nnunet_partial.trainers.candidates import CHECKPOINT_KEY

    run(cli("teachers", "600", "-c", "2d", "--labels", "liver", "kidney", "--ids", "602", "603", "--min-cases", "3",
            "-tr", "nnUNetTrainer_tiny", "--train", "-device", "cpu", "-np", "1"), env=nnunet_env)

    train = ["nnUNetv2_train", "600", "2d", "0", "-tr", "nnUNetTrainerMSKD_tiny", "-device", "cpu"]
    out = run(train, env=nnunet_env).stdout
    assert "MS-KD: 2 teacher(s) of fold 0" in out and "liver -> channel 1 (Dataset602_MSKDUnitTeacherLiver)" in out
    fold = os.path.join(nnunet_env["nnUNet_results"], unit_dataset.name, "nnUNetTrainerMSKD_tiny__nnUNetPlans__2d",
                        "fold_0")
    final = os.path.join(fold, "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerMSKD_tiny" and ckpt[CHECKPOINT_KEY]["global_step"] == 8
    assert set(ckpt[CHECKPOINT_KEY]["mskd_teachers"]) == {"liver", "kidney"}      # recorded, not saved
    assert not [k for k in ckpt["network_weights"] if "teacher" in k or k.startswith(("module.", "_orig_mod."))]
    for key in ("mskd_logit_loss", "mskd_background_loss", "mskd_feature_loss", "mskd_gt_loss"):
        values = ckpt["logging"][key]
        assert len(values) == 2 and all(np.isfinite(values)), key
    assert os.path.isfile(os.path.join(fold, "progress_partial.png"))
    summary = json.load(open(os.path.join(fold, "validation", "summary.json")))
    assert summary["metric_per_case"]

    # --c: the checkpoint an interruption after epoch 0 would leave; the teachers are loaded again
    ckpt["current_epoch"] = 1
    ckpt[CHECKPOINT_KEY]["global_step"] = 4
    for k, v in ckpt["logging"].items():
        ckpt["logging"][k] = v[:1]
    torch.save(ckpt, os.path.join(fold, "checkpoint_latest.pth"))
    os.remove(final)
    out = run(train + ["--c"], env=nnunet_env).stdout
    assert "MS-KD: 2 teacher(s)" in out and "Epoch 1" in out and "Epoch 0\n" not in out
    resumed = torch.load(final, map_location="cpu", weights_only=False)
    assert resumed[CHECKPOINT_KEY]["global_step"] == 8 and len(resumed["logging"]["mskd_feature_loss"]) == 2

    # stock nnUNetv2_predict runs the student alone
    shape = (8, 32, 32)
    images, _ = write_test_set(str(tmp_path / "test"), 1, shape=shape)
    run(["nnUNetv2_predict", "-i", images, "-o", str(tmp_path / "pred"), "-d", "600", "-c", "2d", "-f", "0",
         "-tr", "nnUNetTrainerMSKD_tiny", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env=nnunet_env)
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / "test_000.nii.gz")))
    assert prediction.shape == shape and set(np.unique(prediction)) <= {0, 1, 2, 3, 4}
