"""``nnUNet_compile=true`` with the multi-network trainers: compiled students, plain EMA twins that
still track them, and checkpoints free of ``torch.compile``'s ``_orig_mod.`` prefix.

nnU-Net never compiles on CPU (``_do_i_compile`` says no there), so a subclass says yes: nnU-Net's
``initialize`` then compiles the student, and CoWAM its second student, exactly as on CUDA. The
network is shrunk to three stages of 4/8/16 features to keep compiling cheap. Two backends: ``eager``
(TorchDynamo's graph capture only; the wrapper and its state_dict keys are what is tested, no C++
compiler needed) and ``inductor`` (the default backend; skipped, with the reason, where it cannot
build here).
"""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from torch._dynamo import OptimizedModule

from nnunet_helpers import load_trainer
from nnunet_partial.trainers import TRAINERS, get_trainer
from nnunet_partial.trainers.candidates import CHECKPOINT_KEY
from nnunet_partial.trainers.common import unwrap
from test_ddp import MULTI_NETWORK_TRAINERS, assert_same, ddp_dataset, twins  # noqa: F401  (ddp_dataset: fixture)

TINY_PLANS = "nnUNetPlansCompileTiny"
# the student each twin averages, where it is not self.network
TWIN_STUDENTS = {"ema1": "network", "ema2": "network2"}


def _inductor_unavailable() -> str:
    """Why inductor cannot compile on this machine ('' when it can)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4))
    except Exception as e:   # no C++ compiler, missing headers, ...: any of them means skip
        return f"torch.compile's inductor backend cannot build here: {type(e).__name__}: {str(e)[:200]}"
    return ""


@pytest.fixture(scope="module")
def tiny_plans(ddp_dataset):
    """The dataset's plans with a three-stage 4/8/16-feature network and batch 4, under another plans name."""
    with open(os.path.join(ddp_dataset.preprocessed, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = TINY_PLANS
    config = plans["configurations"]["2d"]
    config["batch_size"] = 4
    arch = config["architecture"]["arch_kwargs"]
    # three stages: the fewest with a deep-supervision output besides the lowest (whose weight is 0)
    arch.update(n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=arch["kernel_sizes"][:3],
                strides=arch["strides"][:3], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    with open(os.path.join(ddp_dataset.preprocessed, f"{TINY_PLANS}.json"), "w") as f:
        json.dump(plans, f)
    return ddp_dataset


def _compiled(trainer_name: str) -> type:
    return type(f"{trainer_name}_compiled", (get_trainer(f"{trainer_name}_tiny"),), {"_do_i_compile": lambda self: True})


def _load(trainer_name: str, dataset):
    return load_trainer(_compiled(trainer_name), dataset.name, "2d", plans_identifier=TINY_PLANS)


def _keys(obj, prefix=""):
    """Every string key of a nested checkpoint, with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                yield f"{prefix}/{k}", k
            yield from _keys(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _keys(v, f"{prefix}/{i}")


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("trainer_name", [
    pytest.param(n, marks=pytest.mark.skipif(n not in TRAINERS, reason=f"{n} has not landed yet"))
    for n in MULTI_NETWORK_TRAINERS])
def test_compiled_students(trainer_name, backend, tiny_plans, monkeypatch, tmp_path):
    if backend == "inductor":
        reason = _inductor_unavailable()
        if reason:
            pytest.skip(reason)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()   # compile afresh: the graph counter below must see this test's graphs

    trainer = _load(trainer_name, tiny_plans)
    students = {n: m for n, m in vars(trainer).items() if isinstance(m, OptimizedModule)}
    assert "network" in students, "nnU-Net's initialize did not compile the student"
    if trainer_name == "nnUNetTrainerCoWAM":
        assert set(students) == {"network", "network2"}
    ema = twins(trainer)
    assert ema
    for name, twin in ema.items():   # twins are plain copies of the unwrapped student
        assert not isinstance(twin.module, OptimizedModule)
        student = unwrap(getattr(trainer, TWIN_STUDENTS.get(name, "network")))
        assert twin.module.state_dict().keys() == student.state_dict().keys()

    trainer.set_deep_supervision_enabled(True)
    trainer.on_train_epoch_start()
    loader, _ = trainer.get_dataloaders()
    for step in range(2):
        before = {n: {k: v.detach().clone() for k, v in t.module.named_parameters()} for n, t in ema.items()}
        decay = {n: t.decay_for_next_update() for n, t in ema.items()}
        trainer.train_step(next(loader))
        for name, twin in ema.items():   # E_t = d E_(t-1) + (1 - d) θ_t, θ read through the compiled wrapper
            student = dict(unwrap(getattr(trainer, TWIN_STUDENTS.get(name, "network"))).named_parameters())
            for k, v in twin.module.named_parameters():
                expected = decay[name] * before[name][k] + (1 - decay[name]) * student[k].detach()
                torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}, step {step}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "the students never ran compiled"

    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    leaked = [p for p, k in _keys(checkpoint) if "_orig_mod" in k or k.startswith("module.")]
    assert not leaked, leaked[:5]
    # what nnUNetv2_predict does: a plain network, strict load
    plain = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                               trainer.num_input_channels, trainer.label_manager.num_segmentation_heads,
                                               enable_deep_supervision=False)
    plain.load_state_dict(checkpoint["network_weights"])
    exported = checkpoint[CHECKPOINT_KEY]["exported_candidate"]
    assert_same(checkpoint["network_weights"], unwrap(trainer.candidate_networks()[exported]).state_dict())

    # and a compiled trainer resumes from it
    resumed = _load(trainer_name, tiny_plans)
    resumed.load_checkpoint(path)
    assert_same(unwrap(resumed.network).state_dict(), unwrap(trainer.network).state_dict())
    for name, twin in twins(resumed).items():
        assert_same(twin.module.state_dict(), ema[name].module.state_dict())
