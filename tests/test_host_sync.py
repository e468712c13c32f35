"""Host syncs of our train steps: none that nnU-Net's own step does not make (issue 17).

On a GPU every read of a device value from Python (``.item()``, ``.cpu()``, ``if tensor:``, a
boolean-mask index, ``torch.nonzero``, a blocking ``.to(device)`` of host data) makes the host wait
until the GPU has run everything queued before it: a fixed cost per step that no arithmetic
explains. This CPU test catches them without a GPU: while ``train_step`` runs (and only then) the
Python entry points of those operations are replaced by counting wrappers, and the counts of each
trainer of ``DISTINCT_STEP_TRAINERS`` (``BASE_TRAINERS`` and nnUNetTrainerMultiMix, so a new trainer is covered
the day it is added; variants share their base's step) are compared, kind by
kind, with stock ``nnUNetTrainer.train_step``'s on the same batch. Stock makes exactly one sync per
step: ``loss.detach().cpu().numpy()`` for its log.

What the wrappers can see: calls made from Python (C++ internals of an operator are invisible, and
the same in stock and ours). ``.to(...)``/``torch.tensor(..., device=...)`` cannot be told apart
from same-device no-ops on a CPU-only machine, so those count only when called from nnunet_partial
code with a device named and ``non_blocking`` off: a blocking host->device copy in a train step of
ours is always a sync on CUDA (pageable memory) and never needed (per-case metadata lives on the
device, built once at ``initialize``).

Also here: the pure loss functions trace into one graph each under ``torch._dynamo`` (no graph
break), so ``torch.compile`` can fuse them.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import sys
import threading

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_helpers import REPO_ROOT, write_untrained_teacher
from nnunet_partial.annotations import PSEUDO_KEY, TeacherRegistry, save_teacher_registry
from nnunet_partial.trainers import DISTINCT_STEP_TRAINERS

# Trainers this test cannot set up, with the reason. Every other trainer of DISTINCT_STEP_TRAINERS is run; one
# that fails to set up fails the test (add it here with the reason, or give the test what it needs).
NOT_COVERED: dict = {}
# Syncs beyond stock's allowed per trainer and kind, each with its justification; none so far.
ALLOWED_EXTRA: dict = {}

# Tensor methods / torch functions whose call reads device data on the host (or waits for it)
SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "nonzero", "argwhere", "masked_select", "unique",
                "__bool__", "__float__", "__int__", "__index__")
SYNC_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique")
_MISSING = object()
PLANS = "nnUNetPlansSpeedToy"


def _load_speed_script():
    """scripts/benchmark_speed.py, whose set-up of trainers for single steps this test shares."""
    spec = importlib.util.spec_from_file_location("benchmark_speed", os.path.join(REPO_ROOT, "scripts",
                                                                                 "benchmark_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = _load_speed_script()


def _from_our_code(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith("nnunet_partial")


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _names_device(args, kwargs) -> bool:
    """``.to(...)`` arguments that name a device (not only a dtype)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, int, torch.Tensor)) and not isinstance(a, bool) for a in args)


class SyncCounter:
    """Context manager: counts host-sync calls by kind, with the call sites (``file:line``)."""

    def __init__(self):
        self.counts = collections.Counter()
        self.sites = collections.defaultdict(collections.Counter)
        self._local = threading.local()
        self._saved = []

    def _record(self, kind: str) -> None:
        frame = sys._getframe(2)
        self.counts[kind] += 1
        self.sites[kind][f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"] += 1

    def _outermost(self, kind, fn, should_count=None):
        """Wrap ``fn``: count when it is not called from inside another counted call."""
        def wrapper(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0 and (should_count is None or should_count(args, kwargs)):
                self._record(kind)
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth
        return wrapper

    def _patch(self, owner, name, wrapper_for) -> None:
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, wrapper_for(getattr(owner, name)))

    def __enter__(self):
        T = torch.Tensor
        for name in SYNC_METHODS:
            self._patch(T, name, lambda fn, n=name: self._outermost(f"Tensor.{n}", fn))
        for name in SYNC_FUNCTIONS:
            self._patch(torch, name, lambda fn, n=name: self._outermost(f"torch.{n}", fn))
        # torch.where(condition) alone is torch.nonzero
        self._patch(torch, "where", lambda fn: self._outermost("torch.where(condition)", fn,
                                                               lambda a, k: len(a) + len(k) == 1))
        self._patch(T, "__getitem__", lambda fn: self._outermost(
            "boolean-mask index", fn, lambda a, k: _is_bool_index(a[1])))
        self._patch(T, "__setitem__", lambda fn: self._outermost(
            "boolean-mask assignment", fn, lambda a, k: _is_bool_index(a[1])))
        self._patch(T, "to", lambda fn: self._outermost(
            "blocking .to(device) in nnunet_partial", fn,
            lambda a, k: _from_our_code(3) and not k.get("non_blocking", False) and _names_device(a[1:], k)))
        self._patch(T, "cuda", lambda fn: self._outermost("Tensor.cuda", fn))
        for name in ("tensor", "as_tensor"):
            self._patch(torch, name, lambda fn, n=name: self._outermost(
                f"torch.{n}(..., device=...) in nnunet_partial", fn,
                lambda a, k: _from_our_code(3) and k.get("device") is not None))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()
        return False

    def report(self) -> str:
        return "; ".join(f"{k}: {n} ({dict(self.sites[k])})" for k, n in sorted(self.counts.items()))


def count_syncs(fn, *args) -> SyncCounter:
    with SyncCounter() as counter:
        fn(*args)
    return counter


# ---------------------------------------------------------------------------------- the counter itself
def test_the_counter_sees_every_kind_of_sync():
    """Each pattern the trainers must avoid is counted (else the test below could not fail)."""
    from nnunet_partial.annotations import PartialAnnotations
    x = torch.randn(4, 3)
    mask = x[:, 0] > 0
    annotations = PartialAnnotations(label_names=("a", "b"), annotated={"c": frozenset({1})})
    cases = {
        "Tensor.item": lambda: x.sum().item(),
        "Tensor.cpu": lambda: x.cpu(),
        "Tensor.tolist": lambda: x.tolist(),
        "Tensor.__bool__": lambda: bool(mask.any()),
        "Tensor.__float__": lambda: float(x.sum()),
        "torch.nonzero": lambda: torch.nonzero(mask),
        "Tensor.nonzero": lambda: mask.nonzero(),
        "torch.where(condition)": lambda: torch.where(mask),
        "boolean-mask index": lambda: x[mask],
        # the per-step mask of the trainers before issue 17: a numpy array copied to the device
        "blocking .to(device) in nnunet_partial": lambda: annotations.annotated_mask(["c"], "cpu"),
    }
    for kind, fn in cases.items():
        assert count_syncs(fn).counts[kind] == 1, kind
    # and the sync-free forms are not counted
    free = count_syncs(lambda: (torch.where(mask, x[:, 0], 0.0).sum() / mask.sum().clamp_min(1), x[1:3], x.to(x.dtype),
                                x.to("cpu", non_blocking=True)))
    assert not free.counts, free.report()
    # the patches are gone afterwards
    assert "__bool__" not in torch.Tensor.__dict__ and torch.nonzero is torch._C._VariableFunctions.nonzero


def test_host_row_selection_equals_boolean_indexing_without_a_sync():
    """Mean Teacher's case selection from host-known rows: the same tensors as ``x[mask]``, no sync."""
    from nnunet_partial.trainers.mean_teacher import _all, _any, _select_cases, with_host_rows
    x = torch.randn(5, 2, 3, requires_grad=True)
    for picked in ([3, 4], [0, 2, 3], [1], [], [0, 1, 2, 3, 4]):
        mask = torch.zeros(5, dtype=torch.bool)
        mask[picked] = True
        expected = [x[mask], x[mask] * 2]
        counter = SyncCounter()
        with counter:
            host = with_host_rows(mask.clone(), picked)
            got = _select_cases([x, x * 2], host)
            flags = _any(host), _all(host)
        assert not counter.counts, counter.report()
        assert flags == (bool(picked), len(picked) == 5)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- the trainers
@pytest.fixture(scope="module")
def sync_dataset(make_dataset):
    """Dataset 620 (2d, 16x32x32): a liver and a spleen case, one fully labelled, two unlabelled (Mean
    Teacher's batches); fold 0 trains on every case; image-level lesion classes on the first four cases (both
    classes; MultiMix pseudo-labels the fifth). ``pseudo_labels`` name the unlabelled cases' organs as
    pseudo-labelled (their label files hold none), so nnUNetTrainerCoWAMPseudo runs on the same data; the
    other trainers read ``annotated_labels`` only."""
    ds = make_dataset(620, configurations=("2d",), name="HostSync", sources={"liver": ("liver",), "spleen": ("spleen",)},
                      cases_per_source=1, n_full=1, n_unlabelled=2, shape=(16, 32, 32), seed=5,
                      class_task="lesion", class_labelled_fraction=0.8)
    cases = sorted(f[: -len(".nii.gz")] for f in os.listdir(os.path.join(ds.raw, "labelsTr")))
    with open(os.path.join(ds.preprocessed, "splits_final.json"), "w") as f:
        json.dump([{"train": cases, "val": ["full_001", "liver_001"]}], f)
    # counts do not depend on the network's size: the benchmark's toy plans, 16x16 patches (three stages), batch 4
    # (2 labelled + 2 unlabelled for Mean Teacher), keep the steps cheap
    assert speed.write_toy_plans(ds.name, "nnUNetPlans", "2d", (16, 16), 4) == PLANS
    dj_path = os.path.join(ds.preprocessed, "dataset.json")
    with open(dj_path) as f:
        dataset_json = json.load(f)
    dataset_json[PSEUDO_KEY] = {c: ["liver", "spleen"] for c in cases if c.startswith("unlabelled")}
    with open(dj_path, "w") as f:
        json.dump(dataset_json, f)
    # nnUNetTrainerMSKD's teachers: untrained single-organ networks of the same toy plans, registered
    roots = [os.environ[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")]
    teachers = [write_untrained_teacher(*roots, ds.name, label, dataset_json["labels"][label], dataset_id,
                                        plans_name=PLANS, seed=i)
                for i, (label, dataset_id) in enumerate((("liver", 621), ("spleen", 622)))]
    save_teacher_registry(TeacherRegistry(ds.name, {t.label: t for t in teachers}), ds.preprocessed)
    return ds


def _ready(trainer_cls, ds):
    torch.manual_seed(0)
    return speed.build(trainer_cls, ds.name, "2d", PLANS, "cpu", compile_on=False)


@pytest.fixture(scope="module")
def stock(sync_dataset):
    trainer = _ready(nnUNetTrainer, sync_dataset)
    loader, _ = trainer.get_dataloaders()
    return trainer, next(loader)


@pytest.mark.parametrize("trainer_cls", [
    pytest.param(cls, id=cls.__name__, marks=pytest.mark.skipif(
        cls.__name__ in NOT_COVERED, reason=NOT_COVERED.get(cls.__name__, ""))) for cls in DISTINCT_STEP_TRAINERS])
def test_train_step_syncs_no_more_than_stock(trainer_cls, sync_dataset, stock):
    stock_trainer, stock_batch = stock
    trainer = _ready(trainer_cls, sync_dataset)
    loader, _ = trainer.get_dataloaders()   # the trainer's own sampling and target format
    allowed = ALLOWED_EXTRA.get(trainer_cls.__name__, {})
    for step in range(2):
        batch = next(loader)
        # stock on the same batch where it can read it (a trainer with other targets: on a stock batch; its
        # count does not depend on the batch)
        reference = count_syncs(stock_trainer.train_step, batch if speed.stock_format(batch) else stock_batch)
        assert reference.counts == {"Tensor.cpu": 1, "Tensor.numpy": 1}, reference.report()   # nnU-Net 2.8's
        ours = count_syncs(trainer.train_step, batch)
        extra = {k: n - reference.counts[k] - allowed.get(k, 0) for k, n in ours.counts.items()
                 if n > reference.counts[k] + allowed.get(k, 0)}
        assert not extra, (f"{trainer_cls.__name__}.train_step (step {step}) syncs more than stock: {extra}; "
                           f"all of its counts: {ours.report()}")


# ---------------------------------------------------------------------------------- graph breaks
def _loss_cases():
    from nnunet_partial.losses.consistency import softmax_kl, softmax_mse
    from nnunet_partial.losses.cowam import (CoWAMHardLoss, RegionSoftLoss, masked_soft_cross_entropy,
                                             weighted_marginal_focal_loss)
    from nnunet_partial.losses.marginal import MarginalDCandCELoss, MarginalDiceLoss, marginal_cross_entropy
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, 6, generator=g, requires_grad=True)
    t = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=g)
    a = torch.ones(2, 4, dtype=torch.bool)
    a[0, 2] = False
    other = torch.randn(2, 4, 6, 6, 6, generator=g)
    return {
        "marginal_cross_entropy": (marginal_cross_entropy, (x, t, a)),
        "MarginalDiceLoss": (MarginalDiceLoss(), (x, t, a)),
        "MarginalDiceLoss(batch_dice)": (MarginalDiceLoss(batch_dice=True), (x, t, a)),
        "MarginalDCandCELoss": (MarginalDCandCELoss(), (x, t, a)),
        "weighted_marginal_focal_loss": (weighted_marginal_focal_loss, (x, t, a, torch.ones(4))),
        "CoWAMHardLoss": (CoWAMHardLoss([1.0] * 4), (x, t, a)),
        "masked_soft_cross_entropy": (masked_soft_cross_entropy, (x, torch.softmax(other, 1), t == 0)),
        "RegionSoftLoss": (RegionSoftLoss(), (x, other, t)),
        "softmax_mse": (softmax_mse, (x, other)),
        "softmax_kl": (softmax_kl, (x, other)),
        **_later_loss_cases(x, t, a, other, g),
    }


def _later_loss_cases(x, t, a, other, g):
    """MS-KD's, MLDS's and MultiMix's loss terms (written after the audit), on the shapes their trainers pass."""
    from nnunet_partial.losses.marginal import MarginalDCandCELoss
    from nnunet_partial.losses.mlds import (MultiLabelDeepSupervisionLoss, masked_bce_with_logits, max_pool,
                                            one_hot, pseudo_head_loss, pseudo_label_targets)
    from nnunet_partial.losses.mskd import feature_loss, logit_losses
    from nnunet_partial.losses.multimix import (pseudo_label_loss, segmentation_distribution_kl,
                                                supervised_classification_loss)
    teacher_probs = torch.softmax(torch.randn(2, 2, 2, 6, 6, 6, generator=g), 2)   # (K, B, 2, *S)
    organ_masks = teacher_probs[:, :, 1] > teacher_probs[:, :, 0]                  # (K, B, *S)
    features = torch.randn(2, 8, 3, 3, 3, generator=g, requires_grad=True)        # student (B, F, *s)
    half = torch.randn(2, 4, 3, 3, 3, generator=g, requires_grad=True)            # a low-resolution head
    pooled = max_pool(one_hot(t, 4), (2, 2, 2))
    class_logits = torch.randn(4, 3, generator=g, requires_grad=True)
    return {
        "mskd.logit_losses": (lambda p, s: sum(logit_losses(p, s, [1, 2])), (teacher_probs, x)),
        "mskd.feature_loss": (feature_loss, (torch.randn(2, 2, 8, 3, 3, 3, generator=g), features, organ_masks)),
        "mlds.MultiLabelDeepSupervisionLoss": (MultiLabelDeepSupervisionLoss(MarginalDCandCELoss(), [1.0, 0.5], True),
                                               ([x, half], [t, pooled], a)),
        "mlds.masked_bce_with_logits": (masked_bce_with_logits, (half, pooled, pooled >= 0)),
        "mlds.pseudo_label_targets": (lambda p, m, ann: pseudo_label_targets(p, m, ann, 0.5),
                                      (torch.softmax(other, 1), t, a)),
        "mlds.pseudo_head_loss": (pseudo_head_loss, (x, one_hot(t, 4), (2, 2, 2))),
        "multimix.supervised_classification_loss": (supervised_classification_loss,
                                                    (class_logits, torch.tensor([0, 2, -1, 1]))),
        "multimix.pseudo_label_loss": (lambda s, w: pseudo_label_loss(s, w, torch.ones(4, dtype=torch.bool), 0.7)[0],
                                       (class_logits, torch.randn(4, 3, generator=g))),
        "multimix.segmentation_distribution_kl": (segmentation_distribution_kl,
                                                  (x, torch.tensor([True, False]))),
    }


def test_losses_trace_without_graph_breaks():
    breaks = {}
    for name, (fn, args) in _loss_cases().items():
        explained = torch._dynamo.explain(fn)(*args)
        if explained.graph_break_count:
            breaks[name] = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert not breaks, breaks
