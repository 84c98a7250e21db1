#!/usr/bin/env bash
# On an offline GPU machine (python 3.12 with torch, no Flower, no Ray): put what
# scripts/pack_for_offline_gpu.sh packed in place, once, and run COMMAND with it.
#
#   bash scripts/gpu_machine.sh [PACK_DIR] -- COMMAND...     (default PACK_DIR: .gpu-pack/)
#
# Flower's wheels and Ray go to .site/ (on PYTHONPATH and PATH for COMMAND), Fashion-MNIST to
# data/fashion-mnist/ as the gz files the project reads. For example:
#   bash scripts/gpu_machine.sh -- python3 run_federated_mergenet.py --suite --preset gpu --seeds 0
set -euo pipefail

PACK=.gpu-pack
if [ "${1:-}" != "--" ] && [ "$#" -gt 0 ]; then
    PACK="$1"
    shift
fi
if [ "${1:-}" != "--" ] || [ "$#" -lt 2 ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
shift
[ -f "$PACK/ray.tar.xz" ] || { echo "error: $PACK/ray.tar.xz is missing (scripts/pack_for_offline_gpu.sh)" >&2; exit 2; }

SITE="$PWD/.site"
if [ ! -d "$SITE/ray" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$PACK"/wheels/*.whl
    tar -xJf "$PACK/ray.tar.xz" -C "$SITE"
fi
mkdir -p data/fashion-mnist
for packed in "$PACK"/data/*.xz; do
    gz="data/fashion-mnist/$(basename "$packed" .xz).gz"
    [ -f "$gz" ] || { xz -dc "$packed" | gzip -1 > "$gz.part" && mv "$gz.part" "$gz"; }
done
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
exec "$@"
