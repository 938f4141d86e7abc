# Issue 21 (multi-GPU run) on the largest lent kind, one part a call:
#   run(command="bash eval/device/sharded.sh 70b", carry=[".whl"],
#       kind="nvidia-h200-x8", timeout_s=600)
# Parts (each well inside one call's 10 minutes; all write one file,
# bench_sharded_h200x<N>.{json,md,png}, with --append, which the next part
# needs back here first: copy it into eval/results before the next call):
#   70b         dense and Palu 50 % per head (bf16), model=2/4/8, B1 and B16,
#               16K/64K/128K (what does not fit a device is skipped)
#   70b-lowbit  the same with float8 and int4 (a scale per token) latents
#   7b          Llama-2-7B, the four variants, model=1/2/4/8
#   compress    calibration + decomposition of the 7B shape, data=1/2/4/8
# G-LRD-4 has 2 latent groups on the 70B shape (8 KV heads), which do not
# divide model=4 or 8: per-head latents (_g1) split over every mesh.
source eval/device/setup.sh
export NCCL_NVLS_ENABLE=0     # NVLink multicast stays off (KINDS.md)
N=$(nvidia-smi -L | wc -l)
meshes() { local m=""; for n in "$@"; do [ "$n" -le "$N" ] && m="$m model=$n"; done; echo $m; }
cp eval/results/bench_sharded_h200x${N}.json eval/results/bench_sharded_compress_h200x${N}.json "$OUT/r/" 2>/dev/null
common="--out $OUT/r --append --steps 32 --repeats 2"
case "${1:-}" in
  70b) timeout 560 python3 -m eval.bench_sharded --model llama2-70b \
         --variants base palu50_g1 --batches 1 16 \
         --contexts 16384 65536 131072 --meshes $(meshes 2 4 8) $common ;;
  70b-lowbit) timeout 560 python3 -m eval.bench_sharded --model llama2-70b \
         --variants palu50_fp8_g1 palu50_int4_g1 --scale-per-token \
         --batches 1 16 --contexts 16384 65536 131072 \
         --meshes $(meshes 2 4 8) $common ;;
  7b) timeout 560 python3 -m eval.bench_sharded --model llama2-7b \
         --variants base palu50_g1 palu50_fp8_g1 palu50_int4_g1 \
         --scale-per-token --batches 1 16 --contexts 16384 65536 131072 \
         --meshes $(meshes 1 2 4 8) $common ;;
  compress) timeout 560 python3 -m eval.bench_sharded --task compress \
         --model llama2-7b --calib-windows 64 --calib-seqlen 2048 \
         --meshes $(for n in 1 2 4 8; do [ $n -le $N ] && echo data=$n; done) \
         --out "$OUT/r" --append ;;
  *) echo "usage: bash eval/device/sharded.sh 70b|70b-lowbit|7b|compress" >&2
     exit 2 ;;
esac
