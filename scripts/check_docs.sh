#!/usr/bin/env bash
# Build the docs site strictly (mkdocs.yml: strict, every link/anchor/nav warning is an error) into a throw-away
# folder: fails on broken links, missing pages or images. Needs mkdocs (in the `dev` extra).
#
# Python: $HF_SINKS_VENV's (as for scripts/setup_env.sh), else the repository's .venv, else python3 on PATH, so the
# check also runs from a fresh shell without `source .venv/bin/activate`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HF_SINKS_VENV:-.venv}"
if [ -x "$VENV/bin/python" ]; then
    PYTHON="$VENV/bin/python"
elif [ -n "${HF_SINKS_VENV:-}" ]; then
    echo "check_docs.sh: HF_SINKS_VENV=$HF_SINKS_VENV has no bin/python; create it with scripts/setup_env.sh" >&2
    exit 2
elif command -v python3 >/dev/null 2>&1; then
    PYTHON="$(command -v python3)"
else
    echo "check_docs.sh: no Python found: run scripts/setup_env.sh (creates .venv) or put python3 on PATH" >&2
    exit 2
fi
if ! "$PYTHON" -c "import mkdocs" >/dev/null 2>&1; then
    echo "check_docs.sh: mkdocs is not installed for $PYTHON. Install it with:" >&2
    echo "    $PYTHON -m pip install mkdocs        (or: $PYTHON -m pip install -e '.[dev]')" >&2
    exit 2
fi
SITE="$(mktemp -d "${TMPDIR:-/tmp}/hf_sinks_docs.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT
"$PYTHON" -m mkdocs build --strict --site-dir "$SITE"
echo "docs: strict build OK ($PYTHON)"
