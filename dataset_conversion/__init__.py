"""Convert public releases (LiTS, KiTS19/21/23, Medical Segmentation Decathlon) into nnU-Net v2 raw
datasets and merge several of them into one partial-label dataset (``annotated_labels``).

Commands (see ``docs/conversion.md``)::

    nnunet-partial convert lits SRC -d ID
    nnunet-partial convert kits SRC -d ID --version {19,21,23}
    nnunet-partial convert msd  SRC [-d ID]
    nnunet-partial merge SPEC.yaml

Every command works case by case (bounded memory), validates each case (geometry of image and label,
label values, unreadable / missing / truncated files), writes into a hidden temporary folder next to
the target and renames it into place only when every case succeeded. Bad input raises
:class:`dataset_conversion.common.ConversionError` naming the case and the problem.
"""
from dataset_conversion.common import ConversionError  # noqa: F401
