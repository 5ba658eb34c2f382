#!/usr/bin/env bash
# scripts/gpu_check.sh -- the GPU checks in one command, on one CUDA GPU (under 5 minutes on an H100):
#   1. the gpu-marked tests (pytest -m gpu);
#   2. that torch.cuda.set_sync_debug_mode("error") does raise on a sync here (else step 3 proves nothing);
#   3. the bench on CUDA, bf16 autocast and channels_last, for the small conv net and the tiny MLP,
#      harness against the hand-written loop, with every step but the first, the last and the logging
#      ones under sync-debug "error" (bench/data.py): a host-device sync in the step loop fails it.
# Exit status: 0 all passed; 1 a check failed; 2 no CUDA device (nothing was checked).
#
#   scripts/gpu_check.sh                  # with .venv/bin/python (a CUDA build of torch: see README)
#   PYTHON=python3 GPU_CHECK_LIMIT_S=280 scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
LIMIT_S=${GPU_CHECK_LIMIT_S:-285}  # the whole script; the bench gets what the tests leave
TESTS_LIMIT_S=${GPU_CHECK_TESTS_LIMIT_S:-100}
start=$SECONDS

fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

if [[ ! -x $PYTHON ]] && ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_check: no Python at $PYTHON: run 'make venv' (with a CUDA build of torch) or set PYTHON=" >&2
  exit 2
fi
if ! "$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) "
             "sees no GPU. Run it on a GPU machine with a CUDA build of torch, e.g. make venv "
             "TORCH_SPEC=torch==2.13.0 PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128")
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
then
  exit 2
fi

echo "== 1/3 gpu-marked tests"
rc=0
timeout "$TESTS_LIMIT_S" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider || rc=$?
case $rc in
  0) ;;
  5) echo "gpu_check: no gpu-marked tests were collected" ;;
  124) fail "the gpu-marked tests ran past ${TESTS_LIMIT_S} s" ;;
  *) fail "the gpu-marked tests (exit $rc)" ;;
esac

echo "== 2/3 sync-debug mode raises on a device-to-host sync"
"$PYTHON" - <<'PY' || fail "the sync-debug probe"
import torch

t = torch.ones(1, device="cuda")
torch.cuda.set_sync_debug_mode("error")
try:
    t.item()
except RuntimeError as exc:
    print(f"ok: {str(exc).splitlines()[0]}")
else:
    raise SystemExit('set_sync_debug_mode("error") did not raise on .item(): the sync check would prove nothing')
finally:
    torch.cuda.set_sync_debug_mode("default")
PY

echo "== 3/3 bench on CUDA: bf16 autocast, channels_last, sync check"
left=$(( LIMIT_S - (SECONDS - start) ))
(( left > 60 )) || fail "only ${left} s left of ${LIMIT_S} s for the bench"
# the bench stops starting pairs at its budget; timeout is the backstop for a hung run
timeout "$left" "$PYTHON" -m bench.run --device cuda --arch cnn,mlp --worlds 1 --amp bf16 --channels-last \
  --check-sync --n 200 --pairs 4 --warmup 1 --launcher-rounds 0 --zero-first-rounds 0 \
  --run-timeout-s 90 --budget-s $(( left - 45 )) || fail "the CUDA bench (exit $?)"
echo "gpu_check: all passed in $(( SECONDS - start )) s"
