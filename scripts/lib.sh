# shellcheck shell=bash
# Shared by scripts/run.sh and scripts/test.sh: find the build prerequisites and, on
# Debian/Ubuntu, install the missing ones with apt-get (through sudo when not root).

# command:package pairs. cmake builds zlib-ng for pingora-core; cc and make build the
# other C dependencies (zstd, ring) and drive cmake's Makefiles; the TLS and HTTP/2
# tests drive curl.
SG_PREREQS="cc:build-essential make:build-essential cmake:cmake curl:curl"

sg_say() { printf 'shadowgate: %s\n' "$*" >&2; }

# Put rustup's cargo on PATH if it is installed but not yet in this shell.
sg_find_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        sg_say "cargo not found. Install Rust with rustup:"
        sg_say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
        return 1
    fi
}

# The packages providing the prerequisite commands that are missing, one per line.
sg_missing_packages() {
    local pair
    for pair in $SG_PREREQS; do
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
    local missing
    missing=$(sg_missing_packages)
    [ -z "$missing" ] && return 0
    # shellcheck disable=SC2086 # one word per package
    set -- $missing
    if command -v apt-get >/dev/null 2>&1 &&
        { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then
        sg_say "installing missing build tools: $*"
        sg_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            sg_as_root env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "$@" ||
            sg_say "apt-get failed"
    fi
    missing=$(sg_missing_packages)
    if [ -n "$missing" ]; then
        local pair
        for pair in $SG_PREREQS; do
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
