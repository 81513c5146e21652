#!/usr/bin/env bash
# Rebuild lora_fast._C in place (editable installs pick it up). A lock keeps parallel builds apart.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/lora_fast_build.lock python setup.py -q build_ext --inplace "$@"
