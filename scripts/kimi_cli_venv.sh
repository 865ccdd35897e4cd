#!/usr/bin/env bash
# Create (once) a separate virtualenv holding Moonshot's kimi-cli, for the
# OpenAI-compat client tests. kimi-cli pins openai<2.15, which clashes with the
# main venv, so it lives in its own venv.
#
#   scripts/kimi_cli_venv.sh            # -> prints the path of the `kimi` executable
#
# Env:
#   KIMI_CLI_VENV    venv directory (default: <repo>/.venv-kimi-cli)
#   KIMI_CLI_PYTHON  interpreter to build it with (default: python3.13; needs >= 3.12)
#   KIMI_CLI_VERSION kimi-cli version (default: 1.49.0; 1.52.0 is a deprecation stub)
#
# Idempotent: a stamp file inside the venv records version + interpreter; a
# second run with the same settings only re-checks `kimi --version`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KIMI_CLI_VENV:-$repo_root/.venv-kimi-cli}"
version="${KIMI_CLI_VERSION:-1.49.0}"
stamp="$venv/.kimi-cli-stamp"

log() { echo "kimi_cli_venv: $*" >&2; }

# A pyenv shim can exist on PATH yet fail ("command not found" for the
# selected pyenv version), so test that the interpreter really runs.
works() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
    local name="$1" cand root
    if command -v "$name" >/dev/null 2>&1 && works "$name"; then
        command -v "$name"
        return 0
    fi
    # pyenv-installed but not the active version: use the real binary.
    root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    for cand in "$root"/versions/*/bin/"$name"; do
        if [ -x "$cand" ] && works "$cand"; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

if [ -n "${KIMI_CLI_PYTHON:-}" ]; then
    python="$(find_python "$KIMI_CLI_PYTHON")" || {
        log "KIMI_CLI_PYTHON=$KIMI_CLI_PYTHON does not run or is older than 3.12"
        exit 1
    }
elif python="$(find_python python3.13)"; then
    :
elif python="$(find_python python3.12)"; then
    log "WARNING: python3.13 not found, falling back to $python"
    log "WARNING: CPython 3.12.1 crashes kimi-cli at start-up (TypeError: super(type, obj)); use 3.13 if you can"
else
    log "no python3.13 (or python3.12) found; set KIMI_CLI_PYTHON"
    exit 1
fi

want="kimi-cli==$version python=$("$python" -c 'import sys; print(sys.version.split()[0])')"
kimi="$venv/bin/kimi"

# Keep kimi's state out of $HOME (~/.kimi) during the checks below.
tmp_share="$(mktemp -d)"
trap 'rm -rf "$tmp_share"' EXIT

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$kimi" ]; then
    :  # already installed and verified
else
    log "creating $venv with $python ($want)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    # The local mirror makes pip print one "Location ... is ignored" warning per
    # package; keep the output in a log and show it only on failure.
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kimi-cli==$version" >"$venv/pip-install.log" 2>&1; then
        log "pip install kimi-cli==$version failed; last lines of $venv/pip-install.log:"
        grep -v 'is ignored: it is neither a file nor a directory' "$venv/pip-install.log" | tail -n 30 >&2
        exit 1
    fi
    # `kimi --version` passes even where a real run crashes (CPython 3.12.1
    # fails while importing kimi_cli.app), so import what print mode loads once,
    # before writing the stamp (~2 s).
    if ! out="$(KIMI_SHARE_DIR="$tmp_share" "$venv/bin/python" -c 'import kimi_cli.app, kimi_cli.ui.print' 2>&1)"; then
        log "kimi-cli installed but cannot start with this interpreter ($want):"
        echo "$out" | tail -n 5 >&2
        log "use Python 3.13 (KIMI_CLI_PYTHON=python3.13)"
        exit 1
    fi
    printf '%s\n' "$want" >"$stamp"
fi

# Cheap check on every run (~0.2 s).
if ! out="$(KIMI_SHARE_DIR="$tmp_share" KIMI_CLI_NO_AUTO_UPDATE=1 "$kimi" --version 2>&1)"; then
    log "'$kimi --version' failed:"
    echo "$out" >&2
    rm -f "$stamp"
    exit 1
fi
case "$out" in
    *"$version"*) ;;
    *) log "unexpected version output: $out"; rm -f "$stamp"; exit 1 ;;
esac

echo "$kimi"
