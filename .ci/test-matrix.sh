#!/usr/bin/env bash
# The whole test suite on each Python version named (default: the oldest and newest
# supported), each in its own venv (.venv-X.Y). An interpreter is looked for in pyenv's
# versions, then as pythonX.Y on PATH; a version not found is reported, not fatal, but
# at least one must run. Exit status: non-zero when any version's suite failed.
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.13)

find_python() {
    local version=$1 root candidate
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    # The newest patch release pyenv has of this version.
    for candidate in $(ls -d "$root"/versions/"$version".* 2>/dev/null | sort -V -r); do
        if [ -x "$candidate/bin/python$version" ]; then
            echo "$candidate/bin/python$version"
            return 0
        fi
    done
    command -v "python$version"
}

# The venv is rebuilt when pyproject.toml changes (its dependencies).
ensure_venv() {
    local python=$1 venv=$2 stamp
    stamp="$venv/.memguard-installed-$(sha1sum pyproject.toml | cut -c1-12)"
    [ -f "$stamp" ] && return 0
    rm -rf "$venv"
    "$python" -m venv "$venv" &&
        "$venv/bin/python" -m pip install -q --upgrade pip &&
        "$venv/bin/python" -m pip install -q -e ".[all]" --group dev &&
        { "$venv/bin/python" -m pip install -q --group uwsgi ||
            echo "warning: uWSGI did not install on $python; its tests are skipped"; } &&
        touch "$stamp"
}

declare -a ran=() failed=() missing=()
declare -A took=()
for version in "${versions[@]}"; do
    python=$(find_python "$version") || { missing+=("$version"); continue; }
    echo "=== Python $version: $("$python" --version 2>&1) ($python)"
    started=$SECONDS
    if ensure_venv "$python" ".venv-$version" && ".venv-$version/bin/python" -m pytest -q; then
        ran+=("$version")
    else
        failed+=("$version")
    fi
    took[$version]=$((SECONDS - started))
done

echo "=== test matrix"
for version in "${ran[@]}"; do echo "passed:    Python $version (${took[$version]} s)"; done
for version in "${failed[@]}"; do echo "FAILED:    Python $version (${took[$version]} s)"; done
for version in "${missing[@]}"; do
    echo "not found: Python $version (neither in pyenv's versions nor python$version on PATH)"
done
if [ ${#failed[@]} -gt 0 ]; then exit 1; fi
if [ ${#ran[@]} -eq 0 ]; then echo "no Python version of the matrix was found"; exit 1; fi
