#!/usr/bin/env bash
# The GPU checks behind BENCHMARKS.md's GPU figures, one script for one short
# run on a CUDA machine that already has jax[cuda], flax, optax, orbax,
# torch and transformers (nothing is installed; the package runs from this
# checkout). Logs go to $OUT (default ./gpu-out).
#
#   bash docs/gpu/check.sh                  # every part: env forms decode tests train long memory lora8k
#   bash docs/gpu/check.sh "decode tests"   # some parts, in the order given
#
# FORMS_ARGS passes options to docs/gpu/int8_forms.py (e.g. "--rows 1");
# TESTS replaces the test files (default: tests/ops, with its tests marked gpu,
# and the parity tests; run with float32 matmuls at full precision:
# XLA:GPU would use TF32).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# transformers runs in the same process after ours: leave it room on the card
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
parts=${1:-env forms decode tests train long memory lora8k}
SJ="python3 -m starcoder_jax.cli"

for part in $parts; do
  echo "=== $part $(date -u +%T)"
  case $part in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers as t
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__,
      'transformers', t.__version__, jax.devices())" ;;
    forms)
      timeout 150 python3 docs/gpu/int8_forms.py ${FORMS_ARGS:-} 2>&1 | tee "$OUT/forms.txt" ;;
    decode)
      timeout 240 $SJ bench --dtype bfloat16 --quantize none,int8 --batch-sizes 1,8 --repeats 5 \
        --decode-steps 32 --compare-transformers --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt" ;;
    tests)
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 -m pytest -x -q -p no:cacheprovider \
        ${TESTS:-tests/ops tests/model/test_model_parity.py} 2>&1 | tee "$OUT/tests.txt" ;;
    train)
      timeout 180 $SJ bench --train --dtype bfloat16 --train-batch 4 --train-seq-len 1024 --repeats 5 \
        --compare-transformers --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt" ;;
    long)
      # 8k context: prefill at 512 and 8192 against transformers (SDPA, bfloat16); the
      # starcoderbase-1b train step at 2048 (against transformers) and 8192 tokens (full
      # remat), with MFU and the allocator's peak
      for t in 512 8192; do
        timeout 150 $SJ bench --dtype bfloat16 --prompt-len $t --batch-sizes 1 --decode-steps 4 --repeats 3 \
          --compare-transformers --json "$OUT/prefill_$t.json" 2>&1 | tee "$OUT/prefill_$t.txt"
      done
      timeout 200 $SJ bench --train --dtype bfloat16 --train-batch 1 --train-seq-len 2048 --repeats 3 \
        --compare-transformers --json "$OUT/train_2048.json" 2>&1 | tee "$OUT/train_2048.txt"
      timeout 200 $SJ bench --train --dtype bfloat16 --train-batch 1 --train-seq-len 8192 --remat full \
        --repeats 3 --json "$OUT/train_8192.json" 2>&1 | tee "$OUT/train_8192.txt" ;;
    memory)
      # XLA's analysis of the same 8192-token step (compiled on this GPU, not run)
      timeout 200 $SJ bench --train --memory --dtype bfloat16 --train-batch 1 --train-seq-len 8192 \
        --remat full --json "$OUT/memory_8192.json" 2>&1 | tee "$OUT/memory_8192.txt" ;;
    lora8k)
      # configs/finetune/starcoderbase-1b-lora-8k.yaml (random base, stdlib data): the allocator's
      # peak beside the compiled report's (compiled here), and tokens/s
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 300 python3 docs/gpu/lora8k.py --steps 12 \
        --out "$OUT/lora8k-run" 2>&1 | tee "$OUT/lora8k.txt" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
echo "=== done $(date -u +%T)"
