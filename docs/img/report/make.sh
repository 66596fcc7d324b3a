#!/usr/bin/env bash
# Regenerates the pictures on docs/howto/pictures.md: GBLM and Wanda at 50 % unstructured on the
# packaged SmolLM2-135M with the calibration defaults of `compresskit prune` (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
.venv/bin/compresskit prune --metric gblm --sparsity 0.5 --no-progress --output "$out/gblm" --report
.venv/bin/compresskit prune --metric wanda --sparsity 0.5 --no-progress --output "$out/wanda"
.venv/bin/compresskit report "$out/gblm" "$out/wanda"
cp "$out/gblm/report/layers.png" docs/img/report/layers.png
cp "$out/gblm/report/mask_15_self_attn_o_proj.png" docs/img/report/mask.png
cp "$out/gblm/report-vs-wanda/overlap.png" docs/img/report/overlap.png
cp "$out/gblm/report-vs-wanda/diff_15_self_attn_o_proj.png" docs/img/report/diff.png
