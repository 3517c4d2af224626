#!/usr/bin/env bash
# The test command: set up the pinned environment, then run each test group in its own process
# (TensorFlow must not share a process with triton / torch.compile / JAX).
# Deterministic by default: Hypothesis runs its derandomized `ci` profile unless HYPOTHESIS_PROFILE is set.
# Random exploration is opt-in: HYPOTHESIS_PROFILE=dev (100 examples) or thorough (1000) bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
status=0
passed=0; failed=0; skipped=0
log=$(mktemp)
count() {  # count WORD: the number before WORD in pytest's last line
  awk -v w="$1" '{for (i = 2; i <= NF; i++) if ($i == w || $i == w ",") n += $(i - 1)} END {print n + 0}' <<<"$summary"
}
run() {  # run GROUP [ENV=VALUE ...]; tallies pytest's summary line
  local dir=$1; shift
  echo "=== tests/$dir"
  env "$@" "${PYTEST[@]}" "tests/$dir" 2>&1 | tee "$log" || status=1
  local summary; summary=$(tail -n 1 "$log")
  passed=$((passed + $(count passed)))
  failed=$((failed + $(count failed) + $(count error) + $(count errors)))
  skipped=$((skipped + $(count skipped)))
}
run spec
run conformance
run auto
run verify   # cautious verify, the pytest plugin, and the mutation tests (torch)
run docs     # every Python block in README.md and docs/ runs
run compare  # cautious compare across every installed framework
run distributed  # multi-process PyTorch (gloo), JAX (jax.distributed) and TensorFlow (multi-worker)
run research # cautious research --quick: the language-model experiment in every installed framework
for path in tests/backend_*/; do
  [ -d "$path" ] || continue
  group=$(basename "$path")
  case $group in
    backend_fused) run "$group" TRITON_INTERPRET=1 ;;  # Triton kernels on the CPU interpreter
    *) run "$group" ;;
  esac
done
echo "=== mkdocs build --strict"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "$(mktemp -d)" || status=1
echo "total: $passed passed, $failed failed, $skipped skipped"
exit $status
