"""nnUNetTrainerCoWAM: step-level behaviour in-process (real nnU-Net trainer, real batches of the
synthetic dataset 501) and the stock nnUNetv2_train / nnUNetv2_predict CLIs end to end."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_helpers import load_trainer, run
from nnunet_partial.trainers import get_trainer
from nnunet_partial.trainers.candidates import CHECKPOINT_KEY
from nnunet_partial.trainers.common import unwrap

TINY = "nnUNetTrainerCoWAM_tiny"
BATCH_SIZE = 4   # 2d steps on few slices keep the in-process tests fast


class _SoftOnlyCoWAM(get_trainer(TINY)):
    """The documented two-line subclass: here with the hard losses switched off."""
    hard_loss = "focal"
    lambda_focal = 0.0
    lambda_dice = 0.0


def make_trainer(trainer_cls, dataset_name: str, configuration: str = "2d", initialize: bool = True):
    return load_trainer(trainer_cls, dataset_name, configuration, initialize=initialize)


def start_training(trainer):
    """What run_training does before the first train_step (without nnU-Net's folder bookkeeping)."""
    trainer.set_deep_supervision_enabled(True)
    trainer.on_train_epoch_start()
    return trainer


@pytest.fixture(scope="module")
def batches(partial_dataset):
    """Three real augmented 2d training batches of dataset 501 (deep-supervision targets)."""
    trainer = make_trainer(get_trainer(TINY), partial_dataset.name)
    trainer.batch_size = BATCH_SIZE
    dataloader, _ = trainer.get_dataloaders()
    return [next(dataloader) for _ in range(3)]


def _params(network) -> list[torch.Tensor]:
    return [p.detach().clone() for p in unwrap(network).parameters()]


def _assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------- set-up
def test_two_different_students_each_with_a_plain_frozen_twin(partial_dataset):
    trainer = make_trainer(get_trainer(TINY), partial_dataset.name)
    p1, p2 = _params(trainer.network), _params(trainer.network2)
    assert [p.shape for p in p1] == [p.shape for p in p2]   # same nnU-Net architecture
    # every randomly initialised tensor (conv kernels; biases start at 0 and norm scales at 1) differs
    kernels = [(a, b) for a, b in zip(p1, p2) if a.ndim >= 2]
    assert kernels and all(not torch.equal(a, b) for a, b in kernels), "the two students must not start as copies"
    for twin, student in ((trainer.ema1, trainer.network), (trainer.ema2, trainer.network2)):
        assert not isinstance(twin.module, DDP)
        assert all(not p.requires_grad for p in twin.module.parameters())
        _assert_state_equal(twin.module.state_dict(), unwrap(student).state_dict())
    assert trainer.optimizer2 is not trainer.optimizer
    assert set(map(id, trainer.optimizer2.param_groups[0]["params"])) == set(map(id, trainer.network2.parameters()))
    # seeded: a second trainer builds the same pair
    again = make_trainer(get_trainer(TINY), partial_dataset.name)
    _assert_state_equal(unwrap(again.network2).state_dict(), unwrap(trainer.network2).state_dict())
    # ramp-up length and EMA decay from the schedule of the variant (2 epochs x 4 iterations)
    assert trainer.rampup_length() == pytest.approx(trainer.rampup_fraction * 8)
    assert trainer.ema1.ema.decay == trainer.ema2.ema.decay == trainer.effective_ema_decay() == 0.0
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1000, 250   # nnU-Net's default schedule
    assert trainer.effective_ema_decay() == trainer.ema_decay == 0.999


def test_hard_loss_is_the_foundations_marginal_dc_ce_unless_the_papers_focal_is_chosen(partial_dataset):
    from nnunet_partial.losses.cowam import CoWAMHardLoss
    from nnunet_partial.losses.marginal import MarginalDCandCELoss

    assert isinstance(make_trainer(get_trainer(TINY), partial_dataset.name).loss.loss, MarginalDCandCELoss)

    class Focal(get_trainer(TINY)):
        hard_loss = "focal"

    focal = make_trainer(Focal, partial_dataset.name).loss.loss
    assert isinstance(focal, CoWAMHardLoss) and (focal.weight_focal, focal.weight_dice, focal.gamma) == (1.0, 0.1, 2.0)

    class Unknown(get_trainer(TINY)):
        hard_loss = "dice"

    with pytest.raises(ValueError, match="hard_loss must be 'dc_ce' or 'focal'"):
        make_trainer(Unknown, partial_dataset.name)


def test_equal_student_seeds_are_refused(partial_dataset):
    class Twins(get_trainer(TINY)):
        student_seeds = (3, 3)

    with pytest.raises(ValueError, match="two different seeds"):
        make_trainer(Twins, partial_dataset.name)


# ---------------------------------------------------------------------------------- steps
def test_soft_loss_alone_trains_both_students_from_the_other_twin(partial_dataset, batches):
    trainer = start_training(make_trainer(_SoftOnlyCoWAM, partial_dataset.name))
    batch = batches[0]
    data, target = batch["data"], batch["target"]
    annotated = trainer.batch_annotated_mask(batch["keys"])

    losses = trainer.cowam_losses(data, target, annotated)
    assert losses["hard_loss"].item() == 0.0
    assert losses["soft1"].item() > 0 and losses["soft2"].item() > 0
    losses["loss"].backward()
    for network in (trainer.network, trainer.network2):
        grad = torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])
        assert torch.count_nonzero(grad) > 0 and torch.isfinite(grad).all()

    # student 1 is taught by twin 2 only (never by its own past) and vice versa
    with torch.no_grad():
        for p in trainer.ema1.module.parameters():
            p.mul_(0.5)
        moved = trainer.cowam_losses(data, target, annotated)
    assert moved["soft1"].item() == pytest.approx(losses["soft1"].item(), rel=1e-6)
    assert moved["soft2"].item() != pytest.approx(losses["soft2"].item(), rel=1e-3)

    # and the real train_step applies it: both students move with zero hard loss
    before1, before2 = _params(trainer.network), _params(trainer.network2)
    trainer.train_step(batch)
    assert any(not torch.equal(a, b) for a, b in zip(before1, _params(trainer.network)))
    assert any(not torch.equal(a, b) for a, b in zip(before2, _params(trainer.network2)))


def test_train_step_one_student_at_a_time_equals_one_backward_of_the_total(partial_dataset, batches):
    """train_step back-propagates each student before the other's forward (memory, speed); the update
    must be exactly the one of the paper's total loss backpropagated at once."""
    from nnunet_partial.trainers.common import clip_and_step

    stepped = start_training(make_trainer(get_trainer(TINY), partial_dataset.name))
    reference = start_training(make_trainer(get_trainer(TINY), partial_dataset.name))
    for batch in batches[:2]:
        stepped.train_step(batch)

        annotated = reference.batch_annotated_mask(batch["keys"])
        reference.optimizer.zero_grad(set_to_none=True)
        reference.optimizer2.zero_grad(set_to_none=True)
        reference.cowam_losses(batch["data"], batch["target"], annotated)["loss"].backward()
        clip_and_step([(reference.network, reference.optimizer), (reference.network2, reference.optimizer2)],
                      reference.grad_scaler)
        reference.ema1.update(reference.network)
        reference.ema2.update(reference.network2)
        reference.global_step += 1
    assert stepped.rampup_weight() > 0   # the soft terms took part
    for a, b in ((stepped.network, reference.network), (stepped.network2, reference.network2),
                 (stepped.ema1.module, reference.ema1.module), (stepped.ema2.module, reference.ema2.module)):
        for pa, pb in zip(_params(a), _params(b)):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_ema_twins_move_after_every_step(partial_dataset, batches):
    class Uncapped(get_trainer(TINY)):   # the 8-step schedule would cap the decay to 0 (a plain copy)
        ema_horizon_fraction = None

    trainer = start_training(make_trainer(Uncapped, partial_dataset.name))
    for step, batch in enumerate(batches):
        twins_before = [_params(trainer.ema1.module), _params(trainer.ema2.module)]
        decays = [trainer.ema1.decay_for_next_update(), trainer.ema2.decay_for_next_update()]
        out = trainer.train_step(batch)
        assert np.isfinite(out["loss"]) and trainer.global_step == step + 1
        for twin, student, before, d in zip((trainer.ema1, trainer.ema2), (trainer.network, trainer.network2),
                                            twins_before, decays):
            assert twin.num_updates == step + 1
            after = _params(twin.module)
            assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"twin frozen at step {step}"
            assert d == pytest.approx(min(1 - 1 / (step + 1), 0.999))    # warm-up rule, not a copy after step 0
            # E_t = d E_{t-1} + (1 - d) θ_t with the student's weights after this step
            for e_old, e_new, theta in zip(before, after, _params(student)):
                torch.testing.assert_close(e_new, d * e_old + (1 - d) * theta, rtol=1e-5, atol=1e-6)
    assert 0 < trainer.rampup_weight() <= 1


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_resumes_the_same_state_and_exports_the_chosen_twin(partial_dataset, batches,
                                                                                   tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trained = start_training(make_trainer(get_trainer(TINY), partial_dataset.name))
    for batch in batches[:2]:
        trained.train_step(batch)
    trained.exported_candidate = "ema2"      # what validation picks when twin 2 scores better
    trained._candidate_dice_ema = {"ema1": 0.3, "ema2": 0.4}
    path = str(tmp_path / "checkpoint.pth")
    trained.save_checkpoint(path)

    resumed = make_trainer(get_trainer(TINY), partial_dataset.name)
    resumed.load_checkpoint(path)
    resumed.set_deep_supervision_enabled(True)
    for a, b in ((trained.network, resumed.network), (trained.network2, resumed.network2),
                 (trained.ema1.module, resumed.ema1.module), (trained.ema2.module, resumed.ema2.module)):
        _assert_state_equal(unwrap(a).state_dict(), unwrap(b).state_dict())
    for a, b in ((trained.optimizer, resumed.optimizer), (trained.optimizer2, resumed.optimizer2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for k in sa["state"]:
            _assert_state_equal(sa["state"][k], sb["state"][k])
    assert (resumed.global_step, resumed.exported_candidate) == (2, "ema2")
    assert resumed._candidate_dice_ema == trained._candidate_dice_ema
    assert (resumed.ema1.num_updates, resumed.ema2.num_updates) == (2, 2)
    assert resumed.rampup_weight() == trained.rampup_weight()

    # the resumed run continues exactly where the first one was
    trained.train_step(batches[2])
    resumed.train_step(batches[2])
    for a, b in ((trained.network, resumed.network), (trained.network2, resumed.network2),
                 (trained.ema1.module, resumed.ema1.module), (trained.ema2.module, resumed.ema2.module)):
        for pa, pb in zip(_params(a), _params(b)):
            torch.testing.assert_close(pa, pb)

    # network_weights = the chosen twin, loadable into a plain nnU-Net network as the predictor builds it
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert CHECKPOINT_KEY in checkpoint
    plain = nnUNetTrainer.build_network_architecture(
        trained.plans_manager, trained.configuration_manager, trained.num_input_channels,
        trained.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    plain.load_state_dict(checkpoint["network_weights"])   # strict
    _assert_state_equal(plain.state_dict(), checkpoint[CHECKPOINT_KEY]["cowam_ema2"]["weights"])
    with torch.no_grad():
        resumed.ema2.load_state_dict(checkpoint[CHECKPOINT_KEY]["cowam_ema2"])
        x = batches[0]["data"][:1]
        torch.testing.assert_close(plain.eval()(x), resumed.ema2(x)[0])


# ---------------------------------------------------------------------------------- CLI end to end
def _results_folder(env: dict, dataset_name: str, configuration: str) -> str:
    return os.path.join(env["nnUNet_results"], dataset_name, f"{TINY}__nnUNetPlans__{configuration}", "fold_0")


@pytest.fixture(scope="module")
def small_dataset(make_dataset):
    """Dataset 510: small phantoms (16x48x48), 2 cases per organ + 1 fully labelled + 1 unlabelled."""
    return make_dataset(510, configurations=("3d_fullres",), name="CoWAMSmall", cases_per_source=2, n_full=1,
                        n_unlabelled=1, shape=(16, 48, 48), seed=5)


@pytest.mark.integration
def test_cli_train_resume_predict_3d(small_dataset, nnunet_env, tmp_path):
    import SimpleITK as sitk

    train = ["nnUNetv2_train", str(small_dataset.dataset_id), "3d_fullres", "0", "-tr", TINY, "-device", "cpu"]
    run(train, env=nnunet_env)
    out = _results_folder(nnunet_env, small_dataset.name, "3d_fullres")
    final = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    state = final[CHECKPOINT_KEY]
    chosen = state["exported_candidate"]
    assert chosen in ("ema1", "ema2") and state["global_step"] == 8
    _assert_state_equal(final["network_weights"], state[f"cowam_{chosen}"]["weights"])
    for key in ("pseudo_dice_ema1", "pseudo_dice_ema2", "cowam_hard_loss", "cowam_soft_loss", "cowam_rampup"):
        assert len(final["logging"][key]) == 2, key
    assert os.path.isfile(os.path.join(out, "progress.png"))
    assert os.path.isfile(os.path.join(out, "progress_partial.png"))
    assert os.path.isfile(os.path.join(out, "validation", "summary.json"))

    # --c restores every state from the finished run and redoes its final validation with the same twin
    run(train + ["--c"], env=nnunet_env)
    again = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert again[CHECKPOINT_KEY]["exported_candidate"] == chosen
    assert again[CHECKPOINT_KEY]["global_step"] == 8
    _assert_state_equal(again["network_weights"], final["network_weights"])

    images = tmp_path / "images"
    images.mkdir()
    cases = sorted(os.listdir(os.path.join(small_dataset.raw, "imagesTr")))[:2]
    for name in cases:
        os.symlink(os.path.join(small_dataset.raw, "imagesTr", name), images / name)
    predictions = tmp_path / "predictions"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(predictions), "-d", str(small_dataset.dataset_id),
         "-c", "3d_fullres", "-f", "0", "-tr", TINY, "-device", "cpu", "-npp", "1", "-nps", "1"], env=nnunet_env)
    for name in cases:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / name.replace("_0000", ""))))
        assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(images / name))).shape
        assert set(np.unique(seg)) <= {0, 1, 2, 3, 4}


@pytest.mark.integration
def test_cli_train_2d(partial_dataset, nnunet_env):
    # dataset 501 mixes single-organ cases with a fully labelled one
    run(["nnUNetv2_train", str(partial_dataset.dataset_id), "2d", "0", "-tr", TINY, "-device", "cpu"],
        env=nnunet_env)
    out = _results_folder(nnunet_env, partial_dataset.name, "2d")
    final = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert final["trainer_name"] == TINY and final[CHECKPOINT_KEY]["global_step"] == 8
    assert all(np.isfinite(final["logging"]["cowam_soft_loss"]))
    assert os.path.isfile(os.path.join(out, "validation", "summary.json"))
