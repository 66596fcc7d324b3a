#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: install the compresskit wheel carried in
# $WHEELS (default .whl; build it beforehand with `pip wheel --no-deps -w .whl .`), run the
# `cuda`-marked tests against it, then bench/gpu.py. Builds nothing. Logs and results go to $OUT.
#
#   bash bench/gpu.sh                # about 9 minutes: tests at most $TEST_SECONDS (100), the OBS sweep's
#                                    # graphs off/on at most $SWEEP_SECONDS (40), bench $BUDGET (400)
#
# Both run with `python3 -P`, so the installed wheel is imported, not this tree (the JSON records
# compresskit's file). pytest exit code 5 (no `cuda` tests collected yet) is tolerated; test modules
# that import packages the GPU image lacks are reported as collection errors and skipped.
set -u
OUT=${OUT:-/tmp/compresskit-gpu}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s)

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/compresskit-*.whl >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
(cd /tmp && python3 -P -c "import compresskit, compresskit_plugins, torch; print('compresskit', compresskit.__version__, \
compresskit.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())") | tee "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv >>"$OUT/install.log" 2>&1

timeout -k 5 "${TEST_SECONDS:-100}" python3 -P -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors tests >"$OUT/pytest.log" 2>&1
rc=$?
case $rc in
    0) echo "cuda tests: passed" ;;
    5) echo "cuda tests: none collected (exit 5)" ;;
    124|137) echo "cuda tests: stopped at ${TEST_SECONDS:-100} s" ;;
    *) echo "cuda tests: failures or collection errors (exit $rc), see pytest.log" ;;
esac
tail -n 15 "$OUT/pytest.log"

# the OBS sweep per column with its CUDA graphs off and on (a few seconds; one short table)
timeout -k 5 "${SWEEP_SECONDS:-40}" python3 -P bench/obs_sweep.py --cuda-only --repeat 2 >"$OUT/obs_sweep.log" 2>&1
tail -n 12 "$OUT/obs_sweep.log"

python3 -P bench/gpu.py --json "$OUT/gpu.json" --budget "${BUDGET:-400}" "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 60
echo "total $(( $(date +%s) - start )) s; results in $OUT (gpu.json, gpu.md, gpu.log, bench.log, obs_sweep.log, pytest.log, install.log)"
