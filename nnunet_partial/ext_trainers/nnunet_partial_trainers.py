"""The folder of this file is what ``nnUNet_extTrainer`` points at (``nnunet-partial env``).

nnU-Net imports modules of that folder as top-level modules and drops them from sys.modules
afterwards, so this module only re-exports: each trainer class keeps its one identity in
``nnunet_partial.trainers``.
"""
from nnunet_partial.trainers import TRAINER_NAMES, get_trainer

for _name in TRAINER_NAMES:
    globals()[_name] = get_trainer(_name)
