#!/usr/bin/env bash
# The device check in one command (docs/testing.md, "On a GPU"): on a machine with a GPU and no
# package index, installs the wheels carried in .whl/ (if any), runs every gpu-marked test, a
# compute-sanitizer memcheck and racecheck pass and `python -m pydeform bench --device gpu
# --quick`, each stage under its own time limit (7.5 minutes in all), and writes gpu_check.md /
# gpu_check.json (with gpu_check.log, bench.json, bench.png) to --out DIR, else $OUT, else
# ./gpu_check_out. Options: tools/gpu_check.sh --help.
set -u
cd "$(dirname "$0")/.."
exec python3 tools/gpu_check.py "$@"
