#!/usr/bin/env bash
# One command for a lent GPU: the attention benchmark, then train.py for the full 300 s with the reference
# settings under each attention backend, on the Shakespeare mirror; prints the table and the summary blocks.
#
#   bash bench/gpu_run.sh                # all stages: bench fa3 flex sdpa (about 20 minutes)
#   bash bench/gpu_run.sh bench fa3      # some stages, in the order given (each train.py run takes ~7 minutes)
#
# Uses, when present, the ignored paths carried to the machine: .whl/*.whl (packages its image lacks, such as
# rustbpe for prepare.py and kernels for FA3) and .data/shakespeare (the data mirror; DATA_URL overrides).
# BENCH_ARGS passes options to bench/attention.py (--small for a CPU check of this script).
# Logs go to $OUT when set (the device tool brings that folder back), else to a new temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA_URL=${DATA_URL:-.data/shakespeare}
LOGS=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
export AUTORESEARCH_CACHE_DIR=${AUTORESEARCH_CACHE_DIR:-/tmp/autoresearch-gpu-run}  # kept for later calls

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    || exit 1
echo "logs: $LOGS"

if ! "$PYTHON" prepare.py --num-shards 4 --data-url "$DATA_URL" > "$LOGS/prepare.log" 2>&1; then
    echo "prepare.py failed:"; tail -n 20 "$LOGS/prepare.log"; exit 1
fi

for stage in ${*:-bench fa3 flex sdpa}; do
    case $stage in
        bench)
            echo "=== bench/attention.py ==="
            "$PYTHON" bench/attention.py ${BENCH_ARGS:-} 2>&1 | tee "$LOGS/attention.txt" ;;
        fa3 | flex | sdpa)
            echo "=== train.py, AUTORESEARCH_ATTENTION=$stage ==="
            log=$LOGS/train_$stage.log
            AUTORESEARCH_ATTENTION=$stage "$PYTHON" train.py > "$log" 2>&1
            rc=$?
            grep -m1 "^attention:" "$log"
            if [ $rc -eq 0 ]; then
                sed -n '/^---$/,$p' "$log"
            else  # the progress line rewrites itself with \r: split it to show the last steps
                echo "train.py exited with $rc; last lines:"; tr '\r' '\n' < "$log" | grep -v '^ *$' | tail -n 8
            fi ;;
        *)
            echo "unknown stage '$stage': expected bench, fa3, flex or sdpa"; exit 2 ;;
    esac
done
