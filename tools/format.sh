#!/usr/bin/env bash
# Formats the tree in place: ruff's safe fixes and ruff format over the Python files, clang-format
# over the C++/CUDA sources (ffi/, tests/cuda_emulation/, benchmarks/*.cc), with the versions
# pinned in pyproject.toml's `lint` extra (pip install ruff==... clang-format==...).
# `.ci/run` checks the same things without changing anything.
#
# Usage: tools/format.sh [--check]    (--check: report what would change, exit 1 if anything)
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
[ "${1:-}" = "--check" ] && check=1

# The C++ and CUDA files under version control (build trees and virtualenvs are not).
cxx_files() {
  git ls-files -- 'ffi/*.h' 'ffi/*.cc' 'ffi/*.cu' 'ffi/*.cuh' \
    'tests/cuda_emulation/*.h' 'tests/cuda_emulation/*.cc' 'benchmarks/*.cc' 'benchmarks/*.cu'
}

if [ "$check" = 1 ]; then
  echo "+ ruff check ." && ruff check .
  echo "+ ruff format --check ." && ruff format --check .
  echo "+ clang-format --dry-run -Werror (ffi/, tests/cuda_emulation/, benchmarks/*.cc)"
  cxx_files | xargs clang-format --dry-run -Werror
else
  ruff check --fix --exit-zero --quiet .
  ruff format .
  cxx_files | xargs clang-format -i
  # What a fix cannot do (e.g. an over-long string) is left to a person: list it, fail.
  ruff check .
fi
