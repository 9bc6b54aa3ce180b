# shellcheck shell=bash
# Shared by the scripts in this folder: messages, a port probe, and the build prerequisites
# (found, and on Debian/Ubuntu the missing ones installed with apt-get, through sudo when
# not root). A script sets SG_NAME before sourcing this file to prefix its messages with it.

# command:package pairs. cmake builds zlib-ng for pingora-core; cc and make build the
# other C dependencies (zstd, ring) and drive cmake's Makefiles; the TLS and HTTP/2
# tests drive curl and openssl s_client.
SG_PREREQS="cc:build-essential make:build-essential cmake:cmake curl:curl openssl:openssl"

SG_NAME=${SG_NAME:-shadowgate}

sg_say() { printf '%s: %s\n' "$SG_NAME" "$*" >&2; }

# Say what went wrong and end the script.
sg_die() {
    sg_say "error: $*"
    exit 1
}

# True when something accepts TCP connections on HOST:PORT.
sg_listening() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

# Put rustup's cargo on PATH if it is installed but not yet in this shell.
sg_load_cargo_env() {
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
}

# Like sg_load_cargo_env, and say how to install Rust when cargo is not there.
sg_find_cargo() {
    sg_load_cargo_env
    if ! command -v cargo >/dev/null 2>&1; then
        sg_say "cargo not found. Install Rust with rustup:"
        sg_say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
        return 1
    fi
}

# The packages providing the missing commands of command:package pairs (default:
# $SG_PREREQS), one per line.
sg_missing_packages() {
    # shellcheck disable=SC2086 # one word per pair
    [ $# -gt 0 ] || set -- $SG_PREREQS
    local pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || echo "${pair#*:}"
    done | sort -u
}

# Run a command as root: directly, or through sudo.
sg_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        return 1
    fi
}

# Make sure cargo and the C build tools are there; install missing tools when possible.
sg_ensure_prerequisites() {
    sg_find_cargo || return 1
    sg_ensure_tools
}

# Make sure the commands of command:package pairs (default: $SG_PREREQS) are there:
# install the missing ones when possible (never with SG_NO_INSTALL=1), else name them
# and return 1.
sg_ensure_tools() {
    # shellcheck disable=SC2086 # one word per pair
    [ $# -gt 0 ] || set -- $SG_PREREQS
    local pairs=("$@") missing
    missing=$(sg_missing_packages "${pairs[@]}")
    [ -z "$missing" ] && return 0
    # shellcheck disable=SC2086 # one word per package
    set -- $missing
    if [ "${SG_NO_INSTALL:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1 &&
        { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then
        sg_say "installing missing tools: $*"
        { sg_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            sg_as_root env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "$@"; } >&2 ||
            sg_say "apt-get failed"
    fi
    missing=$(sg_missing_packages "${pairs[@]}")
    if [ -n "$missing" ]; then
        local pair
        for pair in "${pairs[@]}"; do
            command -v "${pair%%:*}" >/dev/null 2>&1 ||
                sg_say "missing: ${pair%%:*} (Debian/Ubuntu package ${pair#*:})"
        done
        # shellcheck disable=SC2086 # one word per package
        set -- $missing
        sg_say "install them, e.g.: sudo apt-get install $*"
        return 1
    fi
}

# Make sure the rustup components (e.g. rustfmt, clippy) are installed.
sg_ensure_components() {
    local component missing=()
    for component in "$@"; do
        case $component in
        rustfmt) cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt) ;;
        clippy) cargo clippy --version >/dev/null 2>&1 || missing+=(clippy) ;;
        esac
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v rustup >/dev/null 2>&1; then
        sg_say "missing Rust components: ${missing[*]}; rustup is not installed to add them"
        return 1
    fi
    sg_say "installing Rust components: ${missing[*]}"
    rustup component add "${missing[@]}"
}
