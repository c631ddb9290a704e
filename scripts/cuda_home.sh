#!/usr/bin/env sh
# Prints the CUDA toolkit folder (the one holding bin/nvcc and include/) of the nvcc on PATH,
# or nothing when there is none. nvcc may be the real binary or a small wrapper script that
# execs it (as on this project's build machines).
nvcc=$(command -v nvcc) || exit 0
if [ "$(head -c 2 "$nvcc")" = "#!" ]; then
  real=$(grep -o '/[^" ]*/bin/nvcc' "$nvcc" | head -n 1)
else
  real=$(readlink -f "$nvcc")
fi
[ -n "$real" ] && dirname "$(dirname "$real")"
