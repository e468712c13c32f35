"""All nnunet-partial trainers and their short-schedule variants.

To add a trainer: import it here and append it to ``BASE_TRAINERS``; its schedule variants and
the ``nnUNet_extTrainer`` module pick it up from there.
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_partial.trainers import schedules as _schedules
from nnunet_partial.trainers.partial import (nnUNetTrainerPartial, nnUNetTrainerPartialBatch16,
                                             nnUNetTrainerPartialBatch16Foreground, nnUNetTrainerPartialStockSampling)
from nnunet_partial.trainers.partial_ema import nnUNetTrainerPartialEMA, nnUNetTrainerPartialEMABatch16
from nnunet_partial.trainers.cowam import nnUNetTrainerCoWAM
from nnunet_partial.trainers.mean_teacher import (nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacherNoConsistency,
                                                  nnUNetTrainerMeanTeacherStrongConsistency)
from nnunet_partial.trainers.cowam_pseudo import nnUNetTrainerCoWAMPseudo
from nnunet_partial.trainers.mlds import (nnUNetTrainerMLDS, nnUNetTrainerMLDSMeanTaught,
                                         nnUNetTrainerMLDSMeanTaughtNoPseudo, nnUNetTrainerMLDSSelfTaught)
from nnunet_partial.trainers.mskd import nnUNetTrainerMSKD, nnUNetTrainerMSKDNoGroundTruth
from nnunet_partial.trainers.multimix import (nnUNetTrainerMultiMix, nnUNetTrainerMultiMixNoBridge,
                                             nnUNetTrainerMultiMixNoPseudo)

BASE_TRAINERS = [
    nnUNetTrainerPartial,
    nnUNetTrainerPartialEMA,
    nnUNetTrainerCoWAM,
    nnUNetTrainerMeanTeacher,
    nnUNetTrainerCoWAMPseudo,
    nnUNetTrainerMLDS,
    nnUNetTrainerMLDSSelfTaught,
    nnUNetTrainerMLDSMeanTaught,
    nnUNetTrainerMSKD,
]

# Trainers that need dataset metadata beyond annotated_labels (image-level class labels), which the shared
# test datasets of BASE_TRAINERS (host-sync, speed) lack: registered, with schedule variants, but not there.
CLASS_LABEL_TRAINERS = [
    nnUNetTrainerMultiMix,
    nnUNetTrainerMultiMixNoBridge,
    nnUNetTrainerMultiMixNoPseudo,
]

# One trainer per distinct train step (variants and ablations share their base's): what the speed script times
# and tests/test_host_sync.py counts by default.
DISTINCT_STEP_TRAINERS = BASE_TRAINERS + [nnUNetTrainerMultiMix]

# Benchmark ablations: a base trainer with one part switched off by a class attribute (its train step is the
# base's, covered there).
ABLATION_TRAINERS = [
    nnUNetTrainerPartialStockSampling,
    nnUNetTrainerPartialBatch16,
    nnUNetTrainerPartialBatch16Foreground,
    nnUNetTrainerPartialEMABatch16,
    nnUNetTrainerMeanTeacherNoConsistency,
    nnUNetTrainerMeanTeacherStrongConsistency,
    nnUNetTrainerMLDSMeanTaughtNoPseudo,
    nnUNetTrainerMSKDNoGroundTruth,
]

# name -> class, for every trainer and variant we offer. Stock nnUNetTrainer gets our short
# schedules too (the naive baseline at the same budget); its `_Nepochs` variants ship with nnU-Net.
TRAINERS = {cls.__name__: cls for cls in BASE_TRAINERS + CLASS_LABEL_TRAINERS + ABLATION_TRAINERS}
for _base in [nnUNetTrainer] + BASE_TRAINERS + CLASS_LABEL_TRAINERS + ABLATION_TRAINERS:
    TRAINERS.update(_schedules.schedule_variants(_base, include_epoch_variants=_base is not nnUNetTrainer))
for _name, _cls in TRAINERS.items():
    if _cls.__module__ == _schedules.__name__:
        setattr(_schedules, _name, _cls)  # the stable, picklable home of generated variants
TRAINER_NAMES = sorted(TRAINERS)


def get_trainer(name: str) -> type:
    try:
        return TRAINERS[name]
    except KeyError:
        raise KeyError(f"no nnunet-partial trainer named {name!r}; known: {TRAINER_NAMES}") from None


def _is(trainer, base: type) -> bool:
    cls = TRAINERS.get(trainer) if isinstance(trainer, str) else trainer
    return cls is not None and issubclass(cls, base)


def needs_pseudo_labels(trainer) -> bool:
    """Trains on the pseudo-labelled dataset D̂ of ``nnunet-partial pseudolabel`` (full CoWAM and its variants);
    ``trainer``: a class or a name (a name that is not ours: False)."""
    return _is(trainer, nnUNetTrainerCoWAMPseudo)


def needs_teachers(trainer) -> bool:
    """Distils the registered teachers of ``nnunet-partial teachers`` (MS-KD and its variants)."""
    return _is(trainer, nnUNetTrainerMSKD)
