#!/usr/bin/env bash
# README command 2: install missing prerequisites, then check formatting, lints and tests.
# Exits non-zero if any of them fails (all three run, so one report shows every problem).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

sg_ensure_prerequisites || exit 1
sg_ensure_components rustfmt clippy || exit 1

failed=()
run() {
    sg_say "running: $*"
    "$@" || failed+=("$*")
}
run cargo fmt --check
run cargo clippy --all-targets -- -D warnings
run cargo test --all-targets

if [ ${#failed[@]} -gt 0 ]; then
    sg_say "FAILED: ${failed[*]}"
    exit 1
fi
sg_say "all checks passed"
