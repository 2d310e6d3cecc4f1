#!/usr/bin/env bash
# One GPU call of the fidelity study (the device tool runs it in the repo root; see docs/results.md):
#   bash studies/gpu_call.sh 560 --seed 0 --arms dit,dcdit --minutes 2
#   bash studies/gpu_call.sh 560 --each dcdit-random,dcdit-cosine --seed 0 --resume   # arms side by side
# $1: seconds the study may run (the rest of the call packs results); the rest: mnist_study.py arguments.
# Carry .wheels (tensordict, beartype, pyvers, cloudpickle, mlxtend, torch-fidelity) and one half of the
# converted FID Inception weights per call (.fidw/a, then .fidw/b on the same warm machine): once both
# halves have arrived, every sample set is scored on the GPU. Results accumulate in /tmp/study on the
# machine and come back as $OUT/results.tgz (JSON, figures) and, while unscored, the samples.
set -u
limit=$1; shift
python3 -m pip install --no-deps --no-index -q .wheels/*.whl 2>&1 | grep -v "^WARNING\|already" || true
export CHUNKFORMER_CACHE=/tmp/fidcache PYTHONUNBUFFERED=1
# a machine's /tmp can outlive its lease: work older than any one lease (30 min) belongs to an earlier run
if [ -f /tmp/study/.started ] && [ -n "$(find /tmp/study/.started -mmin +45)" ]; then rm -rf /tmp/study; fi
mkdir -p /tmp/study && [ -f /tmp/study/.started ] || touch /tmp/study/.started
mkdir -p "$CHUNKFORMER_CACHE" /tmp/fidw /tmp/study/out
cp .fidw/*/* /tmp/fidw/ 2>/dev/null
weights=inception-v3-fid-2015-12-05-torch-fidelity-a16e4d89
if [ ! -f "$CHUNKFORMER_CACHE/$weights.pth" ] && [ -f /tmp/fidw/part1 ] && [ -f /tmp/fidw/part2 ]; then
  cat /tmp/fidw/part1 /tmp/fidw/part2 > /tmp/fidw/$weights.pth
  want=$(python3 -c "import json; print(json.load(open('/tmp/fidw/$weights.json'))['converted_sha1'])")
  if [ "$(sha1sum /tmp/fidw/$weights.pth | cut -d' ' -f1)" = "$want" ]; then
    mv /tmp/fidw/$weights.pth "$CHUNKFORMER_CACHE/" && cp /tmp/fidw/$weights.json "$CHUNKFORMER_CACHE/"
    echo "FID weights assembled"
  else
    echo "FID weights: sha1 mismatch, not used"
  fi
fi
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
if [ "${1:-}" = "--each" ]; then  # --each a,b,c: one process per arm, side by side on one GPU: only for
  arms=$2; shift 2               # equal-FLOPs arms, and only where they fit (one DC-DiT-S training run keeps
                                 # a GPU busy, and two padded ones can run out of its memory)
  for arm in ${arms//,/ }; do
    timeout "$limit" python3 studies/mnist_study.py --work /tmp/study --out /tmp/study/out --arms "$arm" "$@" \
      > "/tmp/study/out/log-$arm.txt" 2>&1 &
  done
  wait
  for arm in ${arms//,/ }; do echo "== $arm"; grep -v "^step .*steps/s$" "/tmp/study/out/log-$arm.txt" | tail -40; done
else
  timeout "$limit" python3 studies/mnist_study.py --work /tmp/study --out /tmp/study/out "$@" 2>&1 | grep -v "^step .*steps/s$"
fi
left=$((limit - $(date +%s) + start))
if [ -f "$CHUNKFORMER_CACHE/$weights.pth" ] && [ "$left" -gt 20 ]; then
  timeout "$left" python3 studies/score.py /tmp/study/out --work /tmp/study
fi
mkdir -p /tmp/study/out/curves  # the training logs (studies/results/curves/s<seed>-<arm>.jsonl)
for log in /tmp/study/s*/*/run/metrics.jsonl; do
  [ -f "$log" ] && arm_dir=$(dirname "$(dirname "$log")") && \
    cp "$log" "/tmp/study/out/curves/$(basename "$(dirname "$arm_dir")")-$(basename "$arm_dir").jsonl"
done
mkdir -p /tmp/study/out/runs  # end-of-training metrics (router probes): studies/results/runs/
for m in /tmp/study/s*/*/run/metrics.json; do
  [ -f "$m" ] && arm_dir=$(dirname "$(dirname "$m")") && \
    cp "$m" "/tmp/study/out/runs/$(basename "$(dirname "$arm_dir")")-$(basename "$arm_dir")-metrics.json"
done
tar czf "$OUT/results.tgz" -C /tmp/study/out .
if [ ! -f "$CHUNKFORMER_CACHE/$weights.pth" ]; then  # unscored: bring the samples back for the CPU
  (cd /tmp/study && find . -name '*.npz' -newer /tmp/fidw -print0 | tar cf - --null -T - | split -b 15m - "$OUT/npz-")
fi
ls -la "$OUT"
