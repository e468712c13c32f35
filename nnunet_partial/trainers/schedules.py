"""Short-schedule variants of every trainer, reachable by name through the stock CLI.

nnU-Net's own pattern is one subclass per schedule (``nnUNetTrainer_5epochs``). We generate them:

- ``<Trainer>_<N>epochs``: N epochs of nnU-Net's 250 iterations (N in ``EPOCH_VARIANTS``);
- ``<Trainer>_tiny``: 2 epochs x 4 iterations, 2 validation iterations (smoke tests, CI), and no test-time
  mirroring in its final validation and predictions (8 forward passes per patch in 3d: most of a smoke test's
  time; the training's mirroring augmentation stays);
- ``<Trainer>_demo``: the schedule ``nnunet-partial demo`` trains with;
- ``<Trainer>_bench``: the schedule of the accuracy benchmark in ``scripts/``.

Each generated class is a module-level attribute of this module, so it has one stable,
picklable identity (``nnunet_partial.trainers.schedules.<name>``).
"""
from __future__ import annotations

import torch

# name suffix -> (num_epochs, iterations per epoch, validation iterations per epoch)
SHORT_SCHEDULES = {
    "tiny": (2, 4, 2),
    "demo": (12, 25, 5),
    "bench": (10, 50, 10),
}
EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250, 500)
NO_TEST_TIME_MIRRORING = {"tiny"}


def make_schedule_variant(base: type, suffix: str, num_epochs: int, iterations_per_epoch: int = 250,
                          val_iterations_per_epoch: int = 50, module: str = __name__,
                          test_time_mirroring: bool = True) -> type:
    """A subclass of ``base`` named ``f"{base.__name__}_{suffix}"`` with another schedule.

    Trainers must derive schedule-dependent quantities (ramp-up lengths, ...) from these
    attributes in ``initialize``/``on_train_start``, not in ``__init__``.
    """
    # nnU-Net records __init__'s parameter names: keep them exactly
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = num_epochs
        self.num_iterations_per_epoch = iterations_per_epoch
        self.num_val_iterations_per_epoch = val_iterations_per_epoch

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        # the checkpoint records inference_allowed_mirroring_axes: nnUNetv2_predict then skips mirroring too
        out = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
        self.inference_allowed_mirroring_axes = None
        return out

    name = f"{base.__name__}_{suffix}"
    members = {"__init__": __init__, "__module__": module, "__qualname__": name,
               "__doc__": f"{base.__name__} with {num_epochs} epochs x {iterations_per_epoch} iterations "
                          f"({val_iterations_per_epoch} validation iterations)"
                          f"{'' if test_time_mirroring else ', no test-time mirroring'}."}
    if not test_time_mirroring:
        members["configure_rotation_dummyDA_mirroring_and_inital_patch_size"] = \
            configure_rotation_dummyDA_mirroring_and_inital_patch_size
    return type(name, (base,), members)


def schedule_variants(base: type, include_epoch_variants: bool = True) -> dict:
    out = {}
    for suffix, (e, i, v) in SHORT_SCHEDULES.items():
        cls = make_schedule_variant(base, suffix, e, i, v, test_time_mirroring=suffix not in NO_TEST_TIME_MIRRORING)
        out[cls.__name__] = cls
    if include_epoch_variants:
        for n in EPOCH_VARIANTS:
            cls = make_schedule_variant(base, f"{n}epochs", n)
            out[cls.__name__] = cls
    return out
