#!/usr/bin/env bash
# Profile-guided release build of shadowgate and bare Pingora, into target/pgo/release.
#
#   scripts/build-pgo.sh          instrument, train, build (about 15 minutes)
#
# 1. builds both binaries instrumented (-Cprofile-generate) into target/pgo-generate;
# 2. trains them with a quick run of scripts/bench.sh (every scenario: GET at 1, 16
#    and 64 connections, mirrors, 1 MiB POST, no keep-alive, compare, and TLS with
#    HTTP/2), each process writing its profile when it exits;
# 3. merges the profiles (llvm-profdata from rustup's llvm-tools, added if missing);
# 4. builds both again with -Cprofile-use into target/pgo.
# The release profile (fat LTO, one codegen unit) applies to both builds. Paths the
# training never runs are laid out as cold code, so the training covers every kind of
# traffic the proxy serves. target/release is left as it is.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SG_NAME=build-pgo
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
sg_load_cargo_env
command -v cargo >/dev/null 2>&1 || sg_die "cargo not found; install Rust with rustup (https://rustup.rs)"

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    sg_say "adding rustup's llvm-tools (llvm-profdata, matching rustc's LLVM)"
    rustup component add llvm-tools >&2 || sg_die "rustup component add llvm-tools failed"
fi
[ -x "$profdata" ] || sg_die "$profdata not found after adding llvm-tools"

gen="$REPO/target/pgo-generate"
profiles="$gen/profiles"
rm -rf "$profiles"
mkdir -p "$profiles"

sg_say "1/4 instrumented build"
(cd "$REPO" && RUSTFLAGS="-Cprofile-generate=$profiles" CARGO_TARGET_DIR="$gen" \
    cargo build --release --bin shadowgate --example bare_pingora >&2) \
    || sg_die "instrumented build failed"
# Build scripts ran instrumented too: keep only what the training writes.
rm -rf "${profiles:?}"/*

sg_say "2/4 training: scripts/bench.sh --quick on the instrumented binaries"
LLVM_PROFILE_FILE="$profiles/%m-%p.profraw" bash "$REPO/scripts/bench.sh" --quick \
    --bin-dir "$gen/release" --out "$gen/training" >&2 || sg_die "training run failed"
compgen -G "$profiles/*.profraw" >/dev/null || sg_die "the training wrote no profile"

sg_say "3/4 merging $(find "$profiles" -name '*.profraw' | wc -l) profiles"
"$profdata" merge -o "$gen/merged.profdata" "$profiles"/*.profraw || sg_die "llvm-profdata merge failed"

sg_say "4/4 profile-guided build into target/pgo"
(cd "$REPO" && RUSTFLAGS="-Cprofile-use=$gen/merged.profdata" CARGO_TARGET_DIR="$REPO/target/pgo" \
    cargo build --release --bin shadowgate --example bare_pingora >&2) \
    || sg_die "profile-guided build failed"
sg_say "done: $REPO/target/pgo/release/shadowgate (and examples/bare_pingora)"
