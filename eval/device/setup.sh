# Sourced first by every script here, on the device machine (the `device`
# tool's `run`, with `carry: [".whl"]`; `make device-wheels` fills .whl/).
# The H200 image has jax 0.11.2, Triton and the test tools but no gguf, and
# its flax / optax / orbax may differ from what `make install` resolves, so
# those travel too, in this venv's versions.
set -o pipefail
export PYTHONUNBUFFERED=1
if [ -z "${OUT:-}" ]; then echo "error: \$OUT is unset (run through the device tool)" >&2; exit 2; fi
ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no .whl/*.whl: run 'make device-wheels' here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p "$OUT/r"
# The tool brings back at most 8 files: everything under $OUT/r leaves as
# one archive, also when a step fails (each step has its own `timeout`,
# so the call ends inside the tool's limit and this trap runs).
trap 'tar -C "$OUT" -czf "$OUT/results.tgz" r && rm -rf "$OUT/r"' EXIT
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
