#!/usr/bin/env bash
# The offline main job on the tiny kit: build stand-ins for every model and dataset, then
# run the pipeline end to end on the CPU. Everything lands under ./demo.
set -euo pipefail
PY=${PYTHON:-python}
OUT=${DEMO_DIR:-./demo}
rm -rf "$OUT"
for kind in sd15 experts prompts; do $PY -m rpo.tiny $kind "$OUT/tiny/$kind"; done
echo "demo: tiny kit in $OUT/tiny"
