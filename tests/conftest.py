"""Session fixtures: an isolated nnU-Net environment and small synthetic datasets, planned and
preprocessed by the real nnUNetv2_plan_and_preprocess once per test session."""
from __future__ import annotations

import os

import pytest

# Before anything imports nnU-Net: nnunetv2.configuration reads nnUNet_def_n_proc once, at import
# (8 worker processes by default), and the tests run nnU-Net's commands in this process too.
CPU_SETTINGS = {"nnUNet_n_proc_DA": "0", "nnUNet_compile": "false", "nnUNet_def_n_proc": "2"}
os.environ.update(CPU_SETTINGS)

from nnunet_helpers import PreprocessedDataset, plan_and_preprocess  # noqa: E402


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory):
    """nnUNet_raw/preprocessed/results in a temp dir, our trainers registered, CPU-friendly settings.

    Sets os.environ for the whole session (nnU-Net reads these at call time) and returns a copy
    for subprocesses.
    """
    from nnunet_partial.commands.env import ext_trainer_value

    base = tmp_path_factory.mktemp("nnunet")
    values = {
        "nnUNet_raw": str(base / "raw"),
        "nnUNet_preprocessed": str(base / "preprocessed"),
        "nnUNet_results": str(base / "results"),
        "nnUNet_extTrainer": ext_trainer_value(""),
        **CPU_SETTINGS,
    }
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(values[k], exist_ok=True)
    os.environ.update(values)
    return dict(os.environ)


_CACHE: dict = {}


@pytest.fixture(scope="session")
def make_dataset(nnunet_env):
    """Factory: ``make_dataset(dataset_id, configurations=("3d_fullres",), **write_partial_dataset_kwargs)``.

    Writes a synthetic dataset into nnUNet_raw, plans and preprocesses it once per session.
    """
    from nnunet_partial.synthetic import write_partial_dataset

    def factory(dataset_id: int, configurations=("3d_fullres",), name: str = "Synthetic", **kwargs):
        if dataset_id in _CACHE:
            return _CACHE[dataset_id]
        raw = write_partial_dataset(nnunet_env["nnUNet_raw"], dataset_id, name=name, **kwargs)
        plan_and_preprocess(dataset_id, configurations, env=nnunet_env)
        full_name = os.path.basename(raw)
        ds = PreprocessedDataset(dataset_id, full_name, raw, os.path.join(nnunet_env["nnUNet_preprocessed"], full_name))
        _CACHE[dataset_id] = ds
        return ds

    return factory


@pytest.fixture(scope="session")
def partial_dataset(make_dataset):
    """Dataset 501: four single-organ sources x 3 cases + 1 fully labelled case; 3d_fullres and 2d."""
    return make_dataset(501, configurations=("3d_fullres", "2d"), name="SyntheticPartial", cases_per_source=3, n_full=1)
