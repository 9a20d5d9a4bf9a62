#!/usr/bin/env bash
# LMCache on the device machine (issue 8), in one go, ~3-5 min:
#   1. LMCache 0.5.6 and what our connector imports of it, from the wheels in .whl_lmcache/ (the
#      image has neither lmcache nor pyzmq, and no network), into a private site dir;
#   2. what of LMCache's native code loads against this torch (lmcache_env.txt);
#   3. the `gpu`-marked lmcache tests (a bf16 CUDA cache through the connector, two engines on the
#      GPU handing a prefill over through a real LMCache server);
#   4. TTFT of a repeated 8,192-token prompt on the Llama-3.1-8B shape (random bf16 weights):
#      recomputed, loaded through `tiered`, loaded through `lmcache` (chunk 16 = one block, as
#      `tiered` moves blocks; chunk 256 = LMCache's default), and one PNG comparing them.
# Run from the repository root with .whl_lmcache carried along. Results under $OUT (the device
# tool's folder) or ./out: at most 8 files; the summary is printed last. TTFT_MODEL, TTFT_TOKENS,
# TTFT_DEVICE and TTFT_DTYPE shrink step 4 for a dry run on a CPU (preset:tiny-llama, 400, cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
SITE=${LMCACHE_SITE:-/tmp/site}
MODEL=${TTFT_MODEL:-preset:llama-3.1-8b}
TOKENS=${TTFT_TOKENS:-8192}
mkdir -p "$OUT/tier_ttft"
LOG="$OUT/gpu_lmcache.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 LMCACHE_TRACK_USAGE=false  # no network there anyway; LMCache would try to report usage
say() { echo "$*" | tee -a "$LOG"; }

# ---- 1. install ------------------------------------------------------------------------------------
ls .whl_lmcache/*.whl > /dev/null 2>&1 || { say "no wheels in .whl_lmcache/: carry ['.whl_lmcache']"; exit 2; }
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
     .whl_lmcache/*.whl >> "$LOG" 2>&1; then
  # No pip in the image: these wheels have no scripts or data, so installing one is unpacking it.
  say "pip install failed; unpacking the wheels instead"
  for w in .whl_lmcache/*.whl; do python3 -m zipfile -e "$w" "$SITE" >> "$LOG" 2>&1; done
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# `import lmcache` imports numba only to JIT CacheGen's codec kernels at import time, which our
# connector never runs; numba needs llvmlite's 42 MB wheel, more than what travels here. So,
# where the image has no numba, an identity `njit` stands in (CacheGen would then be pure Python).
if ! python3 -c "import numba" > /dev/null 2>&1; then
  mkdir -p "$SITE/numba"
  cat > "$SITE/numba/__init__.py" <<'EOF'
"""Stand-in for numba written by scripts/gpu_lmcache.sh: njit/jit return the function unchanged."""


def njit(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda f: f


jit = njit
prange = range
EOF
  say "numba: not in the image; the identity-njit stand-in is in $SITE/numba"
fi

# ---- 2. what loads ---------------------------------------------------------------------------------
python3 - > "$OUT/lmcache_env.txt" 2>&1 <<'EOF'
import importlib, platform, traceback
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for mod in ("lmcache", "lmcache.lmcache_native", "lmcache.cuda_ops", "zmq", "lmcache.v1.cache_engine"):
    try:
        m = importlib.import_module(mod)
        print(f"import {mod}: ok {getattr(m, '__version__', '')}")
    except Exception as e:  # the exact error is what docs/connectors.md quotes
        print(f"import {mod}: FAILED {type(e).__name__}: {e}")
try:
    from lmcache import device_ops
    print("lmcache device ops:", type(device_ops).__name__)
except Exception:
    traceback.print_exc()
EOF
cat "$OUT/lmcache_env.txt" >> "$LOG"

# ---- 3. gpu tests -----------------------------------------------------------------------------------
timeout -k 10 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rs \
  tests/test_lmcache.py tests/test_lmcache_disagg.py >> "$LOG" 2>&1
say "gpu tests exit $?: $(grep -E '(passed|failed|error|skipped)' "$LOG" | tail -1)"

# ---- 4. TTFT of a repeated 8k-token prompt ----------------------------------------------------------
for conn in "tiered" "lmcache --chunk-size 16" "lmcache --chunk-size 256"; do
  # shellcheck disable=SC2086
  timeout -k 10 110 python3 -m kvfabric.cli bench tier-ttft --model "$MODEL" --dtype "${TTFT_DTYPE:-bfloat16}" \
    --device "${TTFT_DEVICE:-auto}" --tokens "$TOKENS" --repeats 3 --connector $conn --out "$OUT/tier_ttft" \
    >> "$LOG" 2>&1 || say "tier-ttft --connector $conn: exit $? (see gpu_lmcache.log)"
done
python3 -m kvfabric.cli bench tier-ttft --compare "$OUT"/tier_ttft/tier_ttft_*.json --out "$OUT/tier_ttft" \
  >> "$LOG" 2>&1

# ---- summary ----------------------------------------------------------------------------------------------
echo "==== summary (files under $OUT) ===="
grep -E "^import |^lmcache device ops" "$OUT/lmcache_env.txt"
grep -E "^gpu tests exit" "$LOG"
grep -E "^(tiered|lmcache-chunk[0-9]+): " "$LOG"
