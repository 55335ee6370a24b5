#!/usr/bin/env bash
# The sampler on an accelerator, as docs/benchmarks.md reports it: the gemma2-2b shape in bf16
# with random weights, prompt 64; uniform rows, then the ragged Think workload (a lengths file
# from ../shared/peers/ragged_lengths.py, e.g. --rows 1024: 16 rows a slot, as a real round
# has many) with 64 slots in file order and longest first.
# Usage: bash docs/accelerator_check.sh LENGTHS.json   (from the repository root)
set -euo pipefail
lengths=${1:?usage: accelerator_check.sh LENGTHS.json}
bench() {
  echo "== tpt bench sample $*"
  timeout 240 python -m tpt_jax.cli bench sample --shape gemma2-2b --dtype bfloat16 --prompt 64 "$@"
}
python -c "import jax; print(jax.__version__, jax.devices())"
bench --batch 64 --new 256 --repeats 3
for attention in dense paged; do
  bench --batch 64 --lengths "$lengths" --attention $attention
  bench --batch 64 --lengths "$lengths" --longest-first --attention $attention
done
if [ "$(python -c 'import jax; print(jax.default_backend())')" = gpu ]; then
  bench --batch 64 --lengths "$lengths" --attention pallas || echo "== pallas: failed (above)"
fi
