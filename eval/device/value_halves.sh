# Device plan item 0 (NOTES.md, "Device plan for the eighteenth session"):
# v35 (MosaicConfig.value_halves) compiled, then its A/B at 50 % and 30 %,
# then end to end with choose_config taking it. One call of about 7 min:
#   run(command="bash eval/device/value_halves.sh", carry=[".whl"], timeout_s=600)
# Results come back in $OUT/results.tgz; append its r/tests.txt to
# eval/results/kernel_tests_h200.txt as the next run.
source eval/device/setup.sh
JAX_PLATFORMS=cuda,cpu timeout 280 python3 -m pytest -v -m gpu \
  tests/kernel_tests/test_mosaic_gpu_value_halves.py 2>&1 | tee "$OUT/r/tests.txt"
tests_rc=$?
echo "commit $COMMIT tests rc=$tests_rc" | tee -a "$OUT/r/tests.txt"
[ $tests_rc -eq 0 ] || exit $tests_rc   # no timing of a kernel that fails its tests
for ratio in 0.5 0.3; do
  JAX_PLATFORMS=cuda timeout 150 python3 -m eval.bench_kernels \
    --shapes llama2-7b llama3-8b --batches 1 8 --contexts 65536 \
    --ratios $ratio --bits 8 --fp8-latents --low-bit-groups 4 --groups 4 \
    --backends mosaic_gpu --baselines cudnn pallas --timing span \
    --also value_halves=true value_halves=true,stages=4 \
    --name bench_kernels_h200_v35_ab_$ratio --out "$OUT/r" 2>&1 | tail -25
done
# The e2e run with choose_config taking v35 where the whole tile does not fit.
JAX_PLATFORMS=cuda timeout 150 python3 -c '
import runpy, sys
from pallas_kernels.latent_attention import _mosaic_config
_mosaic_config.CHOOSE_VALUE_HALVES = True
sys.argv = ["bench_e2e", "--variants", "base", "palu30_fp8", "--batches", "1",
            "--contexts", "65536", "--name", "bench_e2e_h200_v35_30fp8",
            "--out", sys.argv[1]]
runpy.run_module("eval.bench_e2e", run_name="__main__")' "$OUT/r" 2>&1 | tail -15
