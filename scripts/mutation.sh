#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules a false certificate or a misleading figure would come
# from: each mutant is one small change to the code (a flipped sign, an off-by-one, a dropped
# call); a mutant the tests do not notice is a bug they would let through.
#
#   bash scripts/mutation.sh [MODULE ...]        default: bounds/* evaluate.py attacks.py objectives/*
#   DIR=/tmp/m JOBS=2 TESTS="tests/test_soundness.py tests/test_bounds.py" bash scripts/mutation.sh bounds/rounding.py
#   MUTANTS="robprune_fast.bounds.ibp.x__widen_spec*" bash scripts/mutation.sh bounds/ibp.py   (only those)
#
# mutmut wants the package at the top of its tree, so this lays out a copy in $DIR (the built
# extension included: `make build` first), runs there with the mutated package first on the
# path, and prints the survivors (`mutmut show NAME` in $DIR shows one). Slow: every mutant runs
# the tests that reach its function.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${DIR:-/tmp/robprune_mutation}
JOBS=${JOBS:-1}
TESTS=${TESTS:-tests/test_bounds.py tests/test_soundness.py tests/test_evaluate.py tests/test_attacks.py \
tests/test_objectives_certified.py tests/test_nn.py tests/test_train.py}
MODULES=("$@")
[ ${#MODULES[@]} -gt 0 ] || MODULES=("bounds/*" evaluate.py attacks.py "objectives/*")
MUTMUT=${MUTMUT:-$ROOT/.venv/bin/mutmut}

rm -rf "$DIR" && mkdir -p "$DIR"
cp -r "$ROOT/python/robprune_fast" "$ROOT/tests" "$ROOT/benchmarks" "$DIR/"
ext=$(cd "$DIR" && ls robprune_fast/_C*.so 2>/dev/null | head -n 1) || true
[ -n "$ext" ] || { echo "no built extension in python/robprune_fast: run make build first" >&2; exit 1; }
{
  echo "[mutmut]"
  echo "source_paths = robprune_fast"
  echo "only_mutate ="
  for m in "${MODULES[@]}"; do echo "    robprune_fast/$m"; done
  echo "also_copy ="
  echo "    $ext"
  echo "    benchmarks/"
  echo "pytest_add_cli_args_test_selection ="
  for t in $TESTS; do echo "    $t"; done
  echo "process_isolation = forkserver"
  # mutmut 3.8.1's first test run (the one that maps tests to functions) failed here without
  # it, for no reason it would print; with it, the same tests pass and the run goes on.
  echo "debug = true"
} > "$DIR/setup.cfg"

cd "$DIR"
# The mutated tree must exist before Python starts: a PYTHONPATH entry that is missing then is
# cached as "nothing here", and the tests' own package (tests.helpers) fails to import.
mkdir -p "$DIR/mutants"
export PYTHONPATH=$DIR/mutants OMP_NUM_THREADS=1
# shellcheck disable=SC2086 (MUTANTS: names or globs, split on purpose)
"$MUTMUT" run --max-children "$JOBS" ${MUTANTS:-} || true
"$MUTMUT" results | tee "$DIR/survivors.txt"
echo "mutants: $(grep -c ': ' "$DIR/survivors.txt" || true) not killed (survived, no tests or timeout); list in $DIR/survivors.txt"
