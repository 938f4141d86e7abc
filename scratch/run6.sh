#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
T0=$(date +%s)
JAX_PLATFORMS=cuda,cpu timeout 110 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernel_tests/test_mosaic_gpu.py -k "int4 and (default or relayout)" 2>&1 | tail -30 > $OUT/r/t_int4.txt
echo "int4 tests $(( $(date +%s) - T0 )) s"; tail -3 $OUT/r/t_int4.txt
JAX_PLATFORMS=cuda timeout 100 python3 -m eval.bench_kernels --shapes llama2-7b llama3-8b --groups 4 --batches 8 1 --contexts 65536 --bits 4 --ratios 0.5 --paths norope --backends mosaic_gpu --baselines cudnn --also int4_permuted=false --timing span --name bench_kernels_h200_int4_permuted --out $OUT/r 2>&1 | grep -v Warn | tail -20
echo "total $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf results.tgz r && rm -rf r
