#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
T0=$(date +%s)
JAX_PLATFORMS=cuda timeout 400 python3 -m eval.bench_kernels --shapes llama2-7b llama3-8b --groups 4 --batches 1 8 --contexts 65536 131072 --bits 4 --ratios 0.5 --paths norope --backends mosaic_gpu triton --baselines cudnn pallas --compute-wgs 2 3 --also block_s=64 --timing span --name bench_kernels_h200_int4 --out $OUT/r 2>&1 | grep -v Warn | tail -50
echo "total $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf results.tgz r && rm -rf r
