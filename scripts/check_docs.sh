#!/usr/bin/env bash
# Build the docs site strictly (mkdocs.yml: strict, every link/anchor/nav warning is an error) into a throw-away
# folder: fails on broken links, missing pages or images. Needs mkdocs (in the `dev` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="$(mktemp -d "${TMPDIR:-/tmp}/hf_sinks_docs.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT
python -m mkdocs build --strict --site-dir "$SITE"
echo "docs: strict build OK"
