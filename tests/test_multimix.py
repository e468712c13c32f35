"""MultiMix (nnunet_partial/networks.py, nnunet_partial/losses/multimix.py, nnunet_partial/trainers/multimix.py):
class-label metadata, synthetic lesion classes, the losses, the saliency bridge (incl. under inference mode), the
trainer's real nnU-Net batches, and the stock nnUNetv2_train / --c / nnUNetv2_predict CLIs plus
``nnunet-partial predict-class`` in 2D and 3D. Dataset ids 630-639."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_helpers import cli, load_trainer, resume_after_epoch_0, run

from nnunet_partial.annotations import ClassLabels, PartialLabelError
from nnunet_partial.losses.multimix import (confidence_mask, pseudo_label_loss, segmentation_distribution_kl,
                                            supervised_classification_loss)
from nnunet_partial.networks import MultiMixNetwork
from nnunet_partial.synthetic import LESION_CLASSES, lesion_present, make_phantom, write_test_set
from nnunet_partial.trainers import get_trainer
from nnunet_partial.trainers.common import unwrap
from nnunet_partial.augmentation import default_strong_transforms, strong_view
from nnunet_partial.trainers.multimix import classification_metrics, nnUNetTrainerMultiMix


# ---------------------------------------------------------------------- metadata
BASE_JSON = {"labels": {"background": 0, "liver": 1}, "annotated_labels": {"a": ["liver"], "b": [], "c": []}}


@pytest.mark.parametrize("extra, message", [
    ({"class_labels": {"a": "lesion"}}, "'class_labels' is given but 'class_names' is not"),
    ({"class_names": ["lesion"], "class_labels": {}}, "at least two"),
    ({"class_names": ["no_lesion", "lesion"], "class_labels": {"zz": "lesion"}}, "names case 'zz'"),
    ({"class_names": ["no_lesion", "lesion"], "class_labels": {"a": "tumour"}}, "case 'a' has class 'tumour'"),
    ({"class_names": ["x", "x"]}, "more than once"),
])
def test_class_label_metadata_errors_name_case_and_fix(extra, message):
    with pytest.raises(PartialLabelError, match=message):
        ClassLabels.from_dataset_json({**BASE_JSON, **extra})


def test_class_label_metadata_parsed():
    assert ClassLabels.from_dataset_json(BASE_JSON) is None
    c = ClassLabels.from_dataset_json({**BASE_JSON, "class_names": ["no_lesion", "lesion"],
                                       "class_labels": {"a": "lesion", "c": "no_lesion"}})
    assert c.num_classes == 2 and c.counts() == {"no_lesion": 1, "lesion": 1}
    assert c.batch_targets(["a", "b", "c"]).tolist() == [1, -1, 0]
    with pytest.raises(PartialLabelError, match="names case 'c'"):  # checked against the real case list too
        ClassLabels.from_dataset_json({**BASE_JSON, "class_names": ["n", "l"], "class_labels": {"c": "n"}},
                                      case_ids=["a", "b"])


def test_synthetic_lesion_classes_are_visible_and_deterministic():
    seeds = range(12)
    present = [lesion_present(s) for s in seeds]
    assert 0 < sum(present) < len(present) and present == [lesion_present(s) for s in seeds]
    seed = next(s for s in seeds if present[s])
    plain_img, plain_lab = make_phantom(seed, (16, 32, 32))
    img, lab = make_phantom(seed, (16, 32, 32), lesion=True)
    changed = img != plain_img
    assert np.array_equal(lab, plain_lab) and changed.any()     # labels unchanged: the lesion stays liver
    assert (lab[changed] == 1).all()                             # only liver voxels change ...
    assert img[changed].astype(float).mean() > plain_img[changed].astype(float).mean() + 40  # ... brighter


# ---------------------------------------------------------------------- losses
def test_confidence_mask_and_pseudo_label_loss():
    weak = torch.tensor([[3.0, 0.0], [0.2, 0.0], [0.0, 4.0], [0.0, 0.1]])   # confident, not, confident, not
    pseudo, mask = confidence_mask(weak, 0.7)
    assert pseudo.tolist() == [0, 0, 1, 1] and mask.tolist() == [True, False, True, False]
    strong = torch.zeros(4, 2, requires_grad=True)
    counted = torch.tensor([True, True, True, False])
    loss, usage = pseudo_label_loss(strong, weak, counted, 0.7)
    # CE(uniform) = log 2 on the 2 confident counted cases, mean over the 3 counted cases
    assert loss.item() == pytest.approx(2 * np.log(2) / 3, rel=1e-5) and usage.item() == pytest.approx(2 / 3)
    loss.backward()
    assert strong.grad[1].abs().sum() == 0 and strong.grad[3].abs().sum() == 0 and strong.grad[0].abs().sum() > 0
    none, usage = pseudo_label_loss(strong, weak, torch.zeros(4, dtype=torch.bool), 0.7)
    assert none.item() == 0 and usage.item() == 0


def test_supervised_classification_loss_ignores_cases_without_label():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]])
    loss = supervised_classification_loss(logits, torch.tensor([0, -1, 1]))
    expected = (torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 1]))).item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert supervised_classification_loss(logits, torch.tensor([-1, -1, -1])).item() == 0


def test_segmentation_kl_is_not_identically_zero_and_trains_the_unsegmented_side():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, generator=g)
    logits[2:, 1] += 3.0   # unsegmented cases predict much more of class 1
    logits.requires_grad_(True)
    segmented = torch.tensor([True, True, False, False])
    kl = segmentation_distribution_kl(logits, segmented)
    probs = torch.softmax(logits.detach(), 1).flatten(2).mean(2)
    p_l, p_u = probs[:2].mean(0), probs[2:].mean(0)
    assert kl.item() > 0.05 and kl.item() == pytest.approx(float((p_l * (p_l / p_u).log()).sum()), rel=1e-4)
    kl.backward()
    assert logits.grad[:2].abs().sum() == 0 and logits.grad[2:].abs().sum() > 0   # the segmented side is the reference
    # the official code's term compares a prediction with itself: ours is 0 only when the proportions agree ...
    same = torch.randn(1, 3, 8, 8, generator=g).repeat(2, 1, 1, 1)
    assert segmentation_distribution_kl(same, torch.tensor([True, False])).item() == pytest.approx(0, abs=1e-6)
    # ... or when the batch lacks one kind of case
    assert segmentation_distribution_kl(logits, torch.ones(4, dtype=torch.bool)).item() == 0


def test_classification_metrics():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    m = classification_metrics(p, np.array([0, 1, 1, -1]))
    assert m["n_cases"] == 3 and m["accuracy"] == pytest.approx(2 / 3) and m["auc"] == pytest.approx(1.0)
    assert np.isnan(classification_metrics(p, np.array([0, 0, -1, -1]))["auc"])   # one class: AUC undefined


# ---------------------------------------------------------------------- strong view
def test_strong_view_is_a_strongly_augmented_copy_of_the_same_crop():
    np.random.seed(0)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(3, 1, 8, 24, 24, generator=g)
    data = torch.nn.functional.avg_pool3d(data, 3, 1, 1) * 3      # smooth crops (structure to keep)
    strong = strong_view(data, default_strong_transforms())
    assert strong.shape == data.shape and strong.dtype == data.dtype and not torch.equal(strong, data)
    assert torch.equal(data, torch.nn.functional.avg_pool3d(torch.randn(3, 1, 8, 24, 24, generator=torch.Generator()
                                                                        .manual_seed(1)), 3, 1, 1) * 3)  # input untouched
    corr = np.corrcoef(np.concatenate([strong.flatten(1).numpy(), data.flatten(1).numpy()]))[:3, 3:]
    # case i of the strong view is the same crop as case i of the weak one: its best match, by far
    assert (corr.argmax(1) == np.arange(3)).all() and (np.diag(corr) > 0.5).all()
    assert torch.equal(strong_view(data, [], (0, 0)), data)   # identity (no transform picked)


# ---------------------------------------------------------------------- network and saliency bridge
def _unet(dim: int, deep_supervision: bool = True) -> nn.Module:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    strides = [1, 2, 2] if dim == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    return PlainConvUNet(1, 3, (4, 8, 16), conv, 3, strides, 2, 3, (2, 2), True, norm, {"eps": 1e-5, "affine": True},
                         None, None, nn.LeakyReLU, {"inplace": True}, deep_supervision=deep_supervision)


@pytest.mark.parametrize("dim", [2, 3])
def test_saliency_map_nonzero_detached_and_no_parameter_gradient(dim):
    torch.manual_seed(0)
    net = MultiMixNetwork(_unet(dim), 1, num_image_classes=3)
    x = torch.randn(2, 1, *((16, 16) if dim == 2 else (8, 16, 16)))
    net.train()
    sal = net.saliency(x)
    assert sal.shape == x.shape and not sal.requires_grad and sal.grad_fn is None
    assert (sal.flatten(1).amax(1) == 1).all() and (sal >= 0).all()           # |grad|, per case normalised
    assert all(p.grad is None for p in net.parameters())                      # the pass wrote no .grad
    assert net.encoder.training                                               # eval mode restored

    # a training step with the bridge gives exactly the gradients of the same step with the saliency map given as
    # a constant: the saliency pass leaves nothing in the parameters, hence nothing for the optimiser
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    seg, logits = net(x, return_classification=True)
    (sum(s.square().mean() for s in seg) + logits.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}

    class Fixed(MultiMixNetwork):
        def saliency(self, inp):
            return sal

    fixed = copy.deepcopy(net)
    fixed.__class__ = Fixed
    fixed.zero_grad(set_to_none=True)
    seg2, logits2 = fixed(x, return_classification=True)
    (sum(s.square().mean() for s in seg2) + logits2.square().mean()).backward()
    for n, p in fixed.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    # the bridge matters: another saliency map changes the segmentation
    fixed.saliency = lambda inp: torch.zeros_like(inp)
    assert not torch.allclose(fixed(x)[0], seg2[0])


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_bridge_under_inference_mode_as_in_nnunets_predictor(mode):
    torch.manual_seed(0)
    net = MultiMixNetwork(_unet(3, deep_supervision=False), 1)
    net.eval()
    x = torch.randn(1, 1, 8, 16, 16)
    expected = net(x)
    net.record_classification = True
    with (torch.inference_mode() if mode == "inference_mode" else torch.no_grad()):
        x_inf = x.clone()
        out = net(x_inf)
        assert out.shape == (1, 3, 8, 16, 16) and not out.requires_grad
        assert net.saliency(x_inf).abs().sum() > 0
    assert torch.allclose(out, expected, atol=1e-5)
    assert len(net.recorded_probabilities) == 1 and net.recorded_probabilities[0].sum().item() == pytest.approx(1)
    assert all(p.grad is None for p in net.parameters())


def test_checkpoint_loads_into_the_predictors_network_with_any_class_count():
    trained = MultiMixNetwork(_unet(2, deep_supervision=True), 1, num_image_classes=4)
    rebuilt = MultiMixNetwork(_unet(2, deep_supervision=False), 1)  # as nnUNetv2_predict builds it: 2 by default
    rebuilt.load_state_dict(trained.state_dict())
    assert rebuilt.num_image_classes == 4
    assert torch.equal(rebuilt.classifier.weight, trained.classifier.weight)


# ---------------------------------------------------------------------- trainer on real nnU-Net data
SPLIT = {"train": ["full_001", "unlabelled_001", "unlabelled_002", "unlabelled_003", "unlabelled_004"],
         "val": ["full_002"]}
TOY_PLANS = "nnUNetPlansMultiMixToy"
SHAPE = (8, 32, 32)


@pytest.fixture(scope="module")
def mm_dataset(make_dataset):
    """Dataset 639 (2d + 3d_fullres), 8x32x32: 2 segmented + 4 unsegmented cases, the first 4 class-labelled
    (lesion / no_lesion); a fixed split with one segmented, class-labelled validation case; toy plans (8-16-32
    features, small batches) so that the CLI tests fit the CPU budget."""
    ds = make_dataset(639, configurations=("2d", "3d_fullres"), name="SyntheticMultiMix", sources={}, n_full=2,
                      n_unlabelled=4, shape=SHAPE, class_task="lesion", class_labelled_fraction=4 / 6)
    with open(os.path.join(ds.preprocessed, "splits_final.json"), "w") as f:
        json.dump([SPLIT] * 5, f)
    with open(os.path.join(ds.preprocessed, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = TOY_PLANS
    for name, batch in (("2d", 4), ("3d_fullres", 2)):
        arch = plans["configurations"][name]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [min(8 * 2 ** i, 32) for i in range(arch["n_stages"])]
        plans["configurations"][name]["batch_size"] = batch
    with open(os.path.join(ds.preprocessed, f"{TOY_PLANS}.json"), "w") as f:
        json.dump(plans, f)
    return ds


def test_check_reports_class_counts(mm_dataset, capsys):
    from nnunet_partial.cli import main
    assert main(["check", mm_dataset.raw, "--skip-nnunet"]) == 0
    out = capsys.readouterr().out
    assert "class_labels OK: 4 case(s) with a class label" in out and "2 classes" in out
    counts = {n: sum(lesion_present(i) for i in range(4)) if n == "lesion" else 4 - sum(lesion_present(i) for i in range(4))
              for n in LESION_CLASSES}
    assert f"no_lesion {counts['no_lesion']}, lesion {counts['lesion']}" in out


def test_initialize_builds_the_classifier_for_the_datasets_classes(mm_dataset):
    t = load_trainer(nnUNetTrainerMultiMix, mm_dataset.name, "2d", 0, plans_identifier=TOY_PLANS, initialize=False)
    t.dataset_json = {**t.dataset_json, "class_names": ["a", "b", "c"], "class_labels": {"full_001": "c"}}
    t.initialize()
    assert unwrap(t.network).num_image_classes == 3 and t.batch_class_targets(["full_001", "full_002"]).tolist() == [2, -1]
    # the class stays the predictor's entry point: nnUNetv2_predict calls it without the class count
    assert isinstance(nnUNetTrainerMultiMix.build_network_architecture(
        t.plans_manager, t.configuration_manager, 1, 5, False), MultiMixNetwork)
    bad = load_trainer(nnUNetTrainerMultiMix, mm_dataset.name, "2d", 0, plans_identifier=TOY_PLANS, initialize=False)
    bad.dataset_json = {k: v for k, v in bad.dataset_json.items() if k not in ("class_names", "class_labels")}
    with pytest.raises(PartialLabelError, match="needs image-level classes"):
        bad.initialize()


def test_train_step_uses_weak_and_strong_views_of_the_batch(mm_dataset):
    t = load_trainer(nnUNetTrainerMultiMix, mm_dataset.name, "2d", 0, plans_identifier=TOY_PLANS)
    t.pseudo_threshold = 0.0  # every pseudo label used: the term must be live
    loader, _ = t.get_dataloaders()
    # a batch with a case without class label (two of the four unsegmented training cases have none)
    batch = next(b for b in (next(loader) for _ in range(30)) if any(k not in t.class_labels.labels for k in b["keys"]))
    keys = batch["keys"]
    assert any(k.startswith("full") for k in keys) and any(k.startswith("unlabelled") for k in keys)  # two-stream
    targets = t.batch_class_targets(keys).tolist()
    assert targets == [t.class_labels.index_of(k) for k in keys] and -1 in targets
    terms = t.multimix_losses(batch["data"], batch["target"], keys)
    assert terms["pseudo"].item() > 0 and terms["usage"].item() == 1 and terms["kl"].item() > 0
    out = t.train_step(batch)
    assert set(out) >= {"loss", "mm_classification_loss", "mm_pseudo_loss", "mm_pseudo_usage", "mm_kl_loss"}
    assert out["mm_pseudo_usage"] == 1 and np.isfinite(out["loss"])


# ---------------------------------------------------------------------- end to end (real CLIs)
@pytest.mark.integration
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_cli_train_resume_predict_with_classes(configuration, mm_dataset, nnunet_env, tmp_path):
    env = {**nnunet_env, "nnUNet_def_n_proc": "1"}
    name = "nnUNetTrainerMultiMix_tiny"
    assert get_trainer(name).__mro__[1] is nnUNetTrainerMultiMix
    ds_id = str(mm_dataset.dataset_id)
    train = ["nnUNetv2_train", ds_id, configuration, "0", "-tr", name, "-p", TOY_PLANS, "-device", "cpu"]
    run(train, env=env)
    fold = os.path.join(nnunet_env["nnUNet_results"], mm_dataset.name, f"{name}__{TOY_PLANS}__{configuration}", "fold_0")
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    log = ckpt["logging"]
    assert len(log["train_losses"]) == 2 and len(log["mm_classification_loss"]) == 2 and len(log["mm_val_auc"]) == 2
    assert any(k.startswith("classifier.") for k in ckpt["network_weights"])
    with open(os.path.join(fold, "validation", "summary.json")) as f:
        summary = json.load(f)
    assert summary["classification"]["n_cases"] == 1 and np.isfinite(summary["classification"]["accuracy"])
    assert os.path.isfile(os.path.join(fold, "validation", "classification.json"))
    assert os.path.isfile(os.path.join(fold, "progress_multimix.png"))

    resumed = resume_after_epoch_0(fold, train, env)   # --c from the state an interruption after epoch 0 leaves
    assert len(resumed["logging"]["mm_pseudo_usage"]) == 2 and resumed["current_epoch"] == 2

    # 2D: the stock nnUNetv2_predict rebuilds the network through build_network_architecture and loads the
    # checkpoint (bridge under inference_mode). 3D: nnunet-partial predict-class, the same nnUNetPredictor
    # (initialize_from_trained_model_folder) plus the class output. One predictor run per test: CPU budget.
    images, _ = write_test_set(os.path.join(str(tmp_path), "test"), 1, shape=SHAPE)
    out = os.path.join(str(tmp_path), "pred")
    common = ["-i", images, "-o", out, "-d", ds_id, "-c", configuration, "-tr", name, "-p", TOY_PLANS, "-f", "0",
              "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
    run(["nnUNetv2_predict", *common] if configuration == "2d" else cli("predict-class", *common), env=env)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "test_000.nii.gz")))
    assert pred.shape == SHAPE and set(np.unique(pred)) <= {0, 1, 2, 3, 4}
    if configuration == "2d":
        assert not os.path.exists(os.path.join(out, "classification.json"))
        return
    out_cls = out
    with open(os.path.join(out_cls, "classification.json")) as f:
        result = json.load(f)
    probs = result["cases"]["test_000"]["probabilities"]
    assert result["class_names"] == list(LESION_CLASSES) and sum(probs.values()) == pytest.approx(1, abs=1e-5)
    assert result["cases"]["test_000"]["predicted_class"] == max(probs, key=probs.get)


# ---------------------------------------------------------------------- benchmark script (its pure parts; runs: README)
def test_benchmark_script_test_set_and_table(tmp_path):
    import importlib.util
    from nnunet_helpers import REPO_ROOT
    spec = importlib.util.spec_from_file_location("benchmark_multimix",
                                                  os.path.join(REPO_ROOT, "scripts", "benchmark_multimix.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--smoke"])
    assert args.seeds == [0] and args.schedule == "_tiny" and set(bench.ROWS.values()) == {
        "nnUNetTrainerPartial", "nnUNetTrainerMultiMixNoBridge", "nnUNetTrainerMultiMixNoPseudo", "nnUNetTrainerMultiMix"}
    images, labels, classes = bench.write_lesion_test_set(str(tmp_path), 3, (8, 16, 16), seed=1)
    assert classes == {f"test_{i:03d}": int(lesion_present(11_000 + i)) for i in range(3)}
    assert sorted(os.listdir(images)) == [f"test_{i:03d}_0000.nii.gz" for i in range(3)]
    table = bench.format_results({"(a) x": [{"dice": 0.5, "accuracy": float("nan"), "auc": float("nan"), "ratio": 1.0}],
                                  "(d) y": [{"dice": 0.6, "accuracy": 0.5, "auc": 0.7, "ratio": 2.0},
                                            {"dice": 0.8, "accuracy": 1.0, "auc": 0.9, "ratio": 2.2}]})
    assert "n/a" in table.splitlines()[2] and "0.750 ± 0.354" in table and "0.700 ± 0.141" in table
    assert "2.10 ± 0.14" in table
