#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
T0=$(date +%s)
JAX_PLATFORMS=cuda,cpu timeout 200 python3 -m eval.profile_kernel --bits 4 --norope --groups 4 --batches 8 1 --context 65536 --name profile_int4_v15 --out $OUT/r 2>&1 | grep -v Warn | grep "variant\|Error" | cut -c1-900
echo "profile $(( $(date +%s) - T0 )) s"
JAX_PLATFORMS=cuda timeout 300 python3 -m eval.bench_kernels --shapes llama3-8b --groups 4 --batches 1 8 --contexts 65536 131072 --bits 16 8 4 --fp8-latents --ratios 0.5 --paths norope --backends mosaic_gpu triton --baselines cudnn pallas --timing span --name bench_kernels_h200_int4_l3 --out $OUT/r 2>&1 | grep -v Warn | tail -30
echo "total $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf results.tgz r && rm -rf r
