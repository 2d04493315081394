#!/bin/sh
# Rebuild the embedded default dataset (this folder) from PTB-XL sample records.
# usage: sh ecgcl_jax/default_data/rebuild.sh [DATA]   DATA = folder holding ptbxl_sample/ (default ../shared/data
# beside the repository). Set PYTHON to choose the interpreter (default: python).
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${1:-$HERE/../../../shared/data}
cd "$DATA"
${PYTHON:-python} -m ecgcl_jax.data prepare ptbxl_sample --out "$HERE" \
    --labels ptbxl_sample/records.csv --label-column normal --compress --workers 1 --force
