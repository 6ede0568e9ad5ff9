#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# hsae-train's demo on a shared machine: the same short run (--synthetic, TOKENS tokens,
# default 1M) alone and beside one busy process (a shell loop), under each OpenMP setting:
# hsae-train's default (passive wait, tools/hsae_train/wait_policy.cpp), libgomp's own
# default (OMP_WAIT_POLICY=ACTIVE is what libgomp does unset: spin, then sleep), a short spin
# (GOMP_SPINCOUNT=10000) and one thread. Wall seconds per run; bench/RESULTS.md has them.
#
#   bench/oversubscription.sh build/default/tools/hsae-train
set -euo pipefail
bin=${1:?usage: oversubscription.sh <hsae-train>}
tokens=${TOKENS:-1000000}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() {  # label, then environment assignments
  local label=$1
  shift
  local t0 t1
  t0=$(date +%s.%N)
  env "$@" "$bin" --synthetic --tokens "$tokens" --out "$out/sae" --log-every 100000 > "$out/log" 2>&1 ||
    { echo "$label: hsae-train failed"; tail -3 "$out/log"; exit 1; }
  t1=$(date +%s.%N)
  printf "%-45s %6.1f s\n" "$label" "$(echo "$t1 - $t0" | bc)"
}
for cfg in "hsae-train default (passive):" "libgomp spin (ACTIVE):OMP_WAIT_POLICY=ACTIVE" \
           "short spin:GOMP_SPINCOUNT=10000" "one thread:OMP_NUM_THREADS=1"; do
  name=${cfg%%:*}
  envs=${cfg#*:}
  run "alone, $name" $envs
  (while :; do :; done) &
  hog=$!
  run "beside 1 busy process, $name" $envs
  kill "$hog"
  wait "$hog" 2> /dev/null || true
done
