#!/bin/bash
# call 1: compiled int4 tests, then the no-RoPE/fp8 compiled tests, then the Llama-2 no-RoPE bench
COMMIT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
T0=$(date +%s)
JAX_PLATFORMS=cuda,cpu timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernel_tests/test_mosaic_gpu.py -k "int4" -x 2>&1 | tail -40 > $OUT/r/t_int4.txt
echo "int4 tests $(( $(date +%s) - T0 )) s"; tail -3 $OUT/r/t_int4.txt
if grep -q " passed" $OUT/r/t_int4.txt && ! grep -q "failed\|error" $OUT/r/t_int4.txt; then
  JAX_PLATFORMS=cuda timeout 200 python3 -m eval.bench_kernels --shapes llama2-7b --groups 4 --batches 1 8 --contexts 65536 131072 --bits 16 8 4 --fp8-latents --ratios 0.5 --paths norope --backends mosaic_gpu triton --baselines cudnn pallas --timing span --name bench_kernels_h200_int4_l2 --out $OUT/r 2>&1 | grep -v Warn | tail -30
fi
echo "after bench $(( $(date +%s) - T0 )) s"
JAX_PLATFORMS=cuda,cpu timeout $(( 560 - ($(date +%s) - T0) )) python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernel_tests/test_mosaic_gpu.py -k "norope or fp8_scores" 2>&1 | tail -30 > $OUT/r/t_norope.txt
tail -5 $OUT/r/t_norope.txt
echo "total $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf results.tgz r && rm -rf r
