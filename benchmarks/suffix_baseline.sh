#!/usr/bin/env bash
# Builds SuffixDecoding (Snowflake's ArcticInference, the "suffix" method in vLLM) for the drafting
# replay's baseline (benchmarks/replay.py --method suffix). Only its CPU suffix tree is built: the
# sdist's csrc/suffix_decoding (nanobind) and its Python cache, unchanged, into
# $LASER_CACHE/arctic (PYTHONPATH it, or let laser.replay find it there). Idempotent.
set -euo pipefail
PY="${PY:-python3}"
CACHE="${LASER_CACHE:-$HOME/.cache/laser}"
VERSION=0.3.0
DEST="$CACHE/arctic"
if [ -f "$DEST/.built-$VERSION" ]; then exit 0; fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SHA256=7f22e3e1b1071c6061c0d6951be17c0fb50b08d06d6e543144c8f52faba60a36  # the sdist on PyPI
"$PY" -m pip download -q --no-deps "arctic-inference==$VERSION" -d "$WORK"  # the sdist only: no wheels exist
echo "$SHA256  $WORK/arctic_inference-$VERSION.tar.gz" | sha256sum -c --quiet
tar -xzf "$WORK/arctic_inference-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/arctic_inference-$VERSION"
cmake -S "$SRC/csrc/suffix_decoding" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" > "$WORK/cmake.log"
cmake --build "$WORK/build" > "$WORK/build.log"
rm -rf "$DEST" && mkdir -p "$DEST/arctic_inference/suffix_decoding"
touch "$DEST/arctic_inference/__init__.py"  # the package's own __init__ imports vLLM plugins
cp "$SRC/arctic_inference/suffix_decoding/"{__init__,cache}.py "$DEST/arctic_inference/suffix_decoding/"
cp "$WORK"/build/_C*.so "$DEST/arctic_inference/suffix_decoding/"
cp "$SRC/LICENSE" "$DEST/" 2>/dev/null || true
touch "$DEST/.built-$VERSION"
