#!/bin/bash
# Build, here, the wheels the lent GPU machine lacks (../shared/DEVICE.md): nnU-Net's stack at the versions this
# machine has (what CI tests), for CPython 3.12 manylinux, plus this project; SimpleITK's wheel is repacked as
# .whl/simpleitk.tar.xz to fit the 64 MiB a device call may carry. Then: `run` with carry [".whl"] and
# scripts/device_suite.sh as the command.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
P="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for pkg in blosc2 ndindex connected-components-3d pydantic-core SimpleITK; do       # compiled
    pip download -q --no-deps --only-binary=:all: $P -d .whl "$pkg==$(version $pkg)"
done
for pkg in nnunetv2 dynamic_network_architectures acvl_utils batchgenerators batchgeneratorsv2 nibabel graphviz \
           yacs pydantic annotated-types typing-inspection MedPy; do                     # pure Python
    pip wheel -q --no-deps -w .whl "$pkg==$(version $pkg)"
done
pip wheel -q --no-deps -w .whl .                                                        # this project
# SimpleITK: unpacked and xz-compressed (its wheel alone is ~50 MB)
shopt -s nullglob nocaseglob
sitk=(.whl/simpleitk-*.whl)
tmp=$(mktemp -d) && python -m zipfile -e "${sitk[0]}" "$tmp" && tar -cJf .whl/simpleitk.tar.xz -C "$tmp" . && rm -rf "$tmp" "${sitk[0]}"
du -sh .whl && ls .whl
