"""``nnunet-partial predict-class``: ``nnUNetv2_predict`` for a MultiMix model, plus the image-level class
prediction of every case in ``<output>/classification.json``.

The segmentations are nnU-Net's own (its predictor, preprocessing, sliding window, TTA and export,
unchanged). The class probabilities come from the same network calls: in eval mode the
:class:`~nnunet_partial.networks.MultiMixNetwork` records the softmax of its classification head for
every patch it sees (every sliding-window patch, every mirroring of test-time augmentation, every fold
of the ensemble), and a case's probabilities are the unweighted mean of those
(:func:`~nnunet_partial.trainers.multimix.combine_patch_probabilities`).
"""
from __future__ import annotations

import os


def run(args) -> int:
    import torch
    from nnunet_partial.trainers.multimix import CLASSIFICATION_FILE, ClassRecordingPredictor
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    folds = [f if f == "all" else int(f) for f in args.f]
    model = get_output_folder(maybe_convert_to_dataset_name(args.d), args.tr, args.p, args.c)
    predictor = ClassRecordingPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                        use_mirroring=not args.disable_tta, perform_everything_on_device=True,
                                        device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model, folds, checkpoint_name=args.chk)
    predictor.predict_from_files(args.i, args.o, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps)
    print(f"Segmentations and {os.path.join(args.o, CLASSIFICATION_FILE)} written "
          f"({len(predictor.class_probabilities)} case(s)).")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "predict-class", help="nnUNetv2_predict for a MultiMix model + per-case class probabilities (classification.json)",
        description="Runs nnU-Net's predictor exactly as nnUNetv2_predict does (same preprocessing, sliding window, "
                    "test-time mirroring, export) for a model trained with nnUNetTrainerMultiMix, and writes "
                    "<output>/classification.json: per case the class probabilities = the mean of the softmax of the "
                    "classification head over every sliding-window patch, mirroring and fold, and the predicted class.")
    p.add_argument("-i", required=True, help="input folder (nnU-Net naming: CASE_0000.nii.gz ...)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", required=True, help="configuration (2d, 3d_fullres, ...)")
    p.add_argument("-tr", default="nnUNetTrainerMultiMix", help="trainer (default nnUNetTrainerMultiMix)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step size (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring")
    p.add_argument("-npp", type=int, default=2, help="preprocessing processes (default 2)")
    p.add_argument("-nps", type=int, default=2, help="segmentation export processes (default 2)")
    p.add_argument("-device", default=None, choices=["cuda", "cpu", "mps"], help="default: cuda if available")
    p.set_defaults(func=run)
