#!/bin/bash
# The benchmark suite on the lent GPU machine (../shared/DEVICE.md), as one prepared command:
#   here:   scripts/device_wheels.sh                 (the wheels that machine lacks, into .whl/)
#   there:  run(command="bash scripts/device_suite.sh --scenarios few-labels hard-anatomy semi --seeds 0 1 2",
#               carry=[".whl"], timeout_s=600)
# Arguments go to scripts/benchmark_suite.py (default: its scenarios and trainers, 3d_fullres, seed 0). Many small runs
# share the GPU at once (JOBS, default 12); the suite stops after LIMIT seconds (default 500) so that what finished
# comes back: results.json, report.txt, figures and the logs of failed commands, under $OUT. Figures are made with
# torch.compile on (nnU-Net's default on CUDA, what users get). Knobs for a dry run elsewhere: DEVICE=cpu,
# SKIP_INSTALL=1 (use the installed packages), WORKDIR.
set -uo pipefail
OUT=${OUT:?set OUT to the folder whose files come back}
JOBS=${JOBS:-12} LIMIT=${LIMIT:-500} DEVICE=${DEVICE:-cuda} WORKDIR=${WORKDIR:-/tmp/device_suite}
export PYTHONUNBUFFERED=1
if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        tar -xJf .whl/simpleitk.tar.xz -C /tmp/site || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
# a missing package shows up here, in seconds, not after the first training
python3 -c "import SimpleITK, nnunetv2.run.run_training, nnunet_partial.trainers" || exit 1
[ "$DEVICE" = cuda ] && export nnUNet_compile=${nnUNet_compile:-true}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/machine.txt"
mkdir -p "$WORKDIR"

collect() {   # what comes back: small files only (checkpoints and datasets stay there)
    cp -f "$WORKDIR"/results.json "$WORKDIR"/report.txt "$WORKDIR"/*.png "$OUT"/ 2>/dev/null
    grep -l "Traceback\|Error" "$WORKDIR"/runs/*/*/logs/*.log 2>/dev/null | head -20 |
        while read -r log; do cp -f "$log" "$OUT/failed_$(echo "$log" | md5sum | cut -c1-8)_$(basename "$log")"; done
    return 0
}
( while sleep 30; do collect; done ) &
saver=$!
timeout --signal=INT "$LIMIT" python3 scripts/benchmark_suite.py --workdir "$WORKDIR" --device "$DEVICE" --jobs "$JOBS" \
    -c 3d_fullres "$@" 2>&1 | tee "$OUT/suite.log"
rc=$?
kill $saver 2>/dev/null
# after a timeout the report of what finished
[ "$rc" -ne 0 ] && python3 scripts/benchmark_suite.py --workdir "$WORKDIR" --device "$DEVICE" -c 3d_fullres "$@" \
    --report-only > "$OUT/report_partial.txt" 2>&1
collect
exit $rc
