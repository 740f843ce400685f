#!/usr/bin/env bash
# The benchmark as bench/README.md reports it: the seed-size LSTM and GRU with random weights,
# then, when `make serve` has trained and exported them, the shakespeare models as well.
# Extra arguments go to both runs (e.g. --quick, --server-option max_queue_delay_ms=1).
# Results: bench/results/latest.{json,md,png} and bench/results/shakespeare/latest.*; the first
# run's report also replaces the marked section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

rnnserve=.venv/bin/rnnserve
if [ ! -x "$rnnserve" ]; then
  echo "bench/run.sh: $rnnserve is missing; run 'make test' or 'make serve' first" >&2
  exit 2
fi

"$rnnserve" bench --out bench/results --document docs/benchmarks.md "$@"

repository=${REPOSITORY:-model_repository}
if [ -d "$repository/shakespeare-lstm" ] && [ -d "$repository/shakespeare-gru" ]; then
  "$rnnserve" bench --repository "$repository" --model shakespeare-lstm --model shakespeare-gru \
    --out bench/results/shakespeare "$@"
else
  echo "bench/run.sh: no shakespeare models in $repository ('make serve' makes them); skipped that run"
fi
