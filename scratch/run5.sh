#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
T0=$(date +%s)
JAX_PLATFORMS=cuda timeout 200 python3 -m eval.bench_kernels --shapes llama2-7b llama3-8b --groups 4 --batches 8 1 --contexts 65536 --bits 4 --ratios 0.5 --paths norope --backends mosaic_gpu --baselines cudnn --also stages=2 --timing span --name bench_kernels_h200_int4_stages --out $OUT/r 2>&1 | grep -v Warn | tail -20
echo "bench $(( $(date +%s) - T0 )) s"
JAX_PLATFORMS=cuda,cpu timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernel_tests/test_mosaic_gpu.py -k "int4" 2>&1 | tail -30 > $OUT/r/t_int4.txt
tail -3 $OUT/r/t_int4.txt
echo "total $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf results.tgz r && rm -rf r
