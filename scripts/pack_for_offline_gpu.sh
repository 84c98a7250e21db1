#!/usr/bin/env bash
# Pack what an offline GPU machine without Flower or Ray needs to run this project, simulation
# engine included, into one folder small enough to take along (under 64 MiB with the code).
#
#   scripts/pack_for_offline_gpu.sh [OUT_DIR]     (default OUT_DIR: .gpu-pack/, git-ignored)
#
# There:  bash scripts/gpu_machine.sh [OUT_DIR] -- COMMAND...   unpacks it once and runs COMMAND
# with Flower, Ray and real Fashion-MNIST in place (python 3.12 with torch already installed).
# OUT_DIR holds Flower's wheels (about 20 MB); Ray 2.55.1 without its jars, libraries on top of
# the core (data, train, tune, serve, rllib, llm) and the dashboard's web client, with its three
# binaries stripped of symbols (ray.tar.xz, 15 MB where the wheel is 74 MB); Ray's small
# dependencies as wheels; and Debian's Fashion-MNIST recompressed with xz (27 MB).
# PACK_PYTHON_VERSION (default 3.12, that machine's) picks the wheels' python.
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
OUT="${1:-.gpu-pack}"
FASHION=/usr/share/datasets/fashion-mnist
PY_TAG=(--only-binary=:all: --python-version "${PACK_PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
RAY=ray==2.55.1
[ -d "$FASHION" ] || { echo "error: $FASHION is missing (apt-get install dataset-fashion-mnist)" >&2; exit 2; }
for tool in xz strip; do
    command -v "$tool" >/dev/null || { echo "error: needs $tool" >&2; exit 2; }
done

mkdir -p "$OUT/wheels" "$OUT/data"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Flower and what it needs beyond such a machine's python (grpcio-health-checking must match
# its grpcio 1.84), then Ray's own dependencies.
python3 -m pip download -q --no-deps "${PY_TAG[@]}" -d "$OUT/wheels" \
    flwr==1.42.0 flwr-datasets==0.6.1 "datasets>=4,<5" dill multiprocess grpcio-health-checking==1.84.0 "cryptography>=50,<51" pycryptodome "iterators<0.0.3" \
    tomli tomli-w prompt-toolkit sqlalchemy alembic "uvicorn==0.49.*" "fastapi==0.138.*" "starlette==1.3.*" \
    greenlet mako wcwidth pydantic pydantic-core typing-inspection cffi pycparser annotated-types \
    typing-extensions==4.16.0 msgpack jsonschema jsonschema-specifications referencing rpds-py attrs

python3 -m pip download -q --no-deps "${PY_TAG[@]}" -d "$work" "$RAY"
mkdir "$work/site"
python3 -m zipfile -e "$work"/ray-*.whl "$work/site"
rm -rf "$work/site/ray/"{jars,rllib,tune,serve,data,llm,train,dashboard/client}
strip --strip-unneeded "$work/site/ray/_raylet.so" "$work/site/ray/core/src/ray/gcs/gcs_server" \
    "$work/site/ray/core/src/ray/raylet/raylet"
chmod +x "$work/site/ray/core/src/ray/gcs/gcs_server" "$work/site/ray/core/src/ray/raylet/raylet"
tar -cf - -C "$work/site" . | xz -9 -T0 > "$OUT/ray.tar.xz"

for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    gzip -dc "$FASHION/$name.gz" | xz -9 -T0 > "$OUT/data/$name.xz"
done
du -sh "$OUT"
