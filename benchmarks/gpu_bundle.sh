#!/usr/bin/env bash
# Run benchmarks/gpu_check.sh on a GPU machine that has Python 3.12 and torch but no network, no Ray
# and none of this project's other packages (the lent H200 machines: docs/PERFORMANCE.md, "GPU").
#
#   benchmarks/gpu_bundle.sh build  [DIR]   # here, with network: DIR/site.tar.xz (default .gpu/, ~40 MB)
#   source benchmarks/gpu_bundle.sh use [DIR]  # there: unpack to /tmp/site once, link loopfm, set PYTHONPATH
#
# `build` downloads cp312 manylinux wheels of ray[data,train,tune,default] 2.60.0 and pydantic at the
# versions of .venv (requirements/constraints pins), keeps only the packages the machine's image lacks
# (or has too old: protobuf, typing-extensions, aiohttp and its parts), drops what the harnesses
# never load (Ray's Java jars, RLlib, Ray LLM, source maps) and packs the rest with xz (Ray's raylet
# and GCS binaries are two thirds of it). `use` makes /tmp/pkg/loopfm a tree of links to platform/,
# actors/, models/, tune/ and serve_apps/ (the package layout of pyproject.toml, no install needed),
# so the driver and every Ray worker import this checkout.
[[ "${BASH_SOURCE[0]}" == "$0" ]] && set -euo pipefail  # not when sourced: the caller's shell keeps its options
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${2:-$repo/.gpu}"
# On the image already, at versions the harnesses work with (KINDS.md of the device tool lists the image).
present='numpy|pandas|pyarrow|python_dateutil|six|tzdata|pyyaml|psutil|certifi|idna|charset_normalizer|urllib3|requests|click|filelock|fsspec|msgpack|grpcio|py_spy|virtualenv|distlib|python_discovery|platformdirs|cryptography|cffi|pycparser'

case "${1:-}" in
build)
  mkdir -p "$dir/wheels" && rm -rf "$dir/site" && mkdir -p "$dir/site"
  "$repo/.venv/bin/pip" freeze --exclude-editable | grep -v '^torch==' > "$dir/constraints.txt"
  "$repo/.venv/bin/pip" download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 -c "$dir/constraints.txt" -d "$dir/wheels" \
    "ray[data,train,tune,default]==2.60.0" pydantic
  for w in "$dir"/wheels/*.whl; do
    name="$(basename "$w" | sed 's/-[0-9].*//')"
    [[ "$name" =~ ^($present)$ ]] || unzip -q -o "$w" -d "$dir/site"
  done
  rm -rf "$dir/site/ray/jars" "$dir/site/ray/rllib" "$dir/site/ray/llm"
  find "$dir/site" -name '*.map' -delete
  find "$dir/site" -name __pycache__ -type d -prune -exec rm -rf {} +
  tar -C "$dir/site" -cf - . | xz -T0 -6 > "$dir/site.tar.xz"
  ls -la "$dir/site.tar.xz"
  ;;
use)
  if [ ! -d /tmp/site/ray ]; then mkdir -p /tmp/site && xz -dc -T0 "$dir/site.tar.xz" | tar -C /tmp/site -xf -; fi
  rm -rf /tmp/pkg && mkdir -p /tmp/pkg/loopfm
  for entry in "$repo"/platform/*; do ln -s "$entry" "/tmp/pkg/loopfm/$(basename "$entry")"; done
  for sub in actors models tune serve_apps; do ln -s "$repo/$sub" "/tmp/pkg/loopfm/$sub"; done
  export PYTHONPATH="/tmp/site:/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}" LOOPFM_REPO="$repo"
  ;;
*)
  echo "usage: benchmarks/gpu_bundle.sh build [DIR] | source benchmarks/gpu_bundle.sh use [DIR]" >&2
  return 2 2>/dev/null || exit 2
  ;;
esac
