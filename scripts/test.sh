#!/usr/bin/env bash
# The test command: set up the pinned environment, then run each test group in its own process
# (TensorFlow must not share a process with triton / torch.compile / JAX).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
status=0
run() {  # run GROUP [ENV=VALUE ...]
  local dir=$1; shift
  echo "=== tests/$dir"
  env "$@" "${PYTEST[@]}" "tests/$dir" || status=1
}
run spec
run conformance
run auto
run verify  # cautious verify, the pytest plugin, and the mutation tests (torch)
for path in tests/backend_*/; do
  [ -d "$path" ] || continue
  group=$(basename "$path")
  case $group in
    backend_fused) run "$group" TRITON_INTERPRET=1 ;;  # Triton kernels on the CPU interpreter
    *) run "$group" ;;
  esac
done
exit $status
