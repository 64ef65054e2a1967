#!/usr/bin/env bash
# The accelerator checks of issue #9 as ONE script for a session that has a GPU (sized for ~8 minutes on an H100):
#   1. bench/throughput.py: ImageNet-64 ADM (296M parameters), bfloat16, batch 64 per device, ict and edm:
#      images/s, compile time, peak memory (memory_analysis), XLA FLOPs and MFU against the H100/H200 bf16 peak.
#   2. bench/vs_pytorch.py on the GPU: the same iCT step on diffusers' UNet2DModel (bf16 autocast), run
#      alternately with cmjax's; equivalence (float32, dropout 0) on the reduced ImageNet-64 ADM first.
#   3. bfloat16 numerics: the iCT loss and gradient in bf16 against float32 on the same weights and inputs.
# Each writes bench/results/<name>_<device>.md (copied to $OUT when that is set).
#
# The device image has jax, flax, optax, torch, safetensors, huggingface_hub but not ml_collections, clu,
# diffusers or tensorflow. Before the device call, on the CPU machine, in the repo root:
#     bench/gpu_checks.sh prepare        # downloads the missing pure-Python wheels into .whl/ (git-ignored)
# then run it there with carry [".whl"]:
#     bench/gpu_checks.sh
# tensorflow / tensorflow_datasets are only imported by the data pipeline, which the benches never call; the
# script puts import-only stand-ins for them on PYTHONPATH (any use of them would fail loudly).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for pkg in ml_collections==1.1.0 clu==0.0.12 diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$pkg"
  done
  ls -la .whl
  exit 0
fi

PY=${PYTHON:-python3}
if [[ -d .whl ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
STUBS=/tmp/cmjax_stubs
for mod in tensorflow tensorflow_datasets; do
  $PY -c "import $mod" 2>/dev/null && continue
  mkdir -p "$STUBS/$mod"
  cat > "$STUBS/$mod/__init__.py" <<'EOF'
"""Import-only stand-in (bench/gpu_checks.sh): the benches never read data; any real use fails here."""
class _Stub:
    def __getattr__(self, name):
        return _Stub()
    def __call__(self, *args, **kwargs):
        raise RuntimeError("tensorflow stand-in called: the data pipeline is not available in bench/gpu_checks.sh")
    def __mro_entries__(self, bases):
        return (object,)
def __getattr__(name):
    return _Stub()
EOF
done
export PYTHONPATH=$STUBS:.:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
DEV=$($PY -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))" | tr -cd 'A-Za-z0-9_.-')
echo "device: $DEV"
OUTDIR=bench/results
BATCH=${BATCH:-64}

# 1. throughput (bf16, realistic per-device batch)
timeout 240 $PY bench/throughput.py --model imagenet64_adm --methods ict,edm --dtype bfloat16 --batch "$BATCH" \
  --steps 10 --repeats 3 --output "$OUTDIR/throughput_imagenet64_adm_bf16_$DEV.md" || echo "throughput failed: $?"

# 2. and 3. vs PyTorch (JAX gets under half the GPU memory, PyTorch the rest) and bf16 numerics
timeout 240 $PY bench/vs_pytorch.py --model imagenet64_adm --dtype bfloat16 --batch "$BATCH" --steps 5 --repeats 5 \
  --equivalence_model imagenet64_adm_small --numerics --output "$OUTDIR/vs_pytorch_imagenet64_adm_bf16_$DEV.md" \
  || echo "vs_pytorch failed: $?"

if [[ -n "${OUT:-}" ]]; then cp "$OUTDIR"/*_"$DEV".md "$OUT"/ 2>/dev/null || true; fi
