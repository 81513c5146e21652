#!/usr/bin/env bash
# Run the test suite against dependency versions other than the pinned ones, in a scratch venv.
#
#   scripts/check_versions.sh latest [pytest args]   # the newest release of every dependency (not part of CI:
#                                                   # run it before moving constraints.txt, and now and then)
#   scripts/check_versions.sh oldest [pytest args]   # the oldest torch and Triton that pyproject.toml declares,
#                                                   # everything else as pinned in constraints.txt
#
# Environment: VENV (default /tmp/lora_fast-<mode>), TORCH_SPEC (default: "torch" for latest; the declared minimum
# for oldest). Extra pip options (an index for a CPU-only torch build, say) go in PIP_TORCH_ARGS.
# The summary line of pytest is the result; the full log is $VENV/check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: $0 latest|oldest [pytest args]}
shift
VENV=${VENV:-/tmp/lora_fast-$mode}

# the declared minimums, read from pyproject.toml so they cannot drift from what users are told
min_of() { python3 - "$1" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
name = sys.argv[1]
for d in deps:
    m = re.match(rf"{name}\s*>=\s*([0-9.]+)", d)
    if m:
        print(m.group(1))
PY
}

rm -rf "$VENV"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel pybind11
case "$mode" in
  latest)
    python -m pip install -q ${PIP_TORCH_ARGS:-} --upgrade "${TORCH_SPEC:-torch}"
    python -m pip install -q --upgrade --upgrade-strategy eager triton
    python -m pip install -q --upgrade --upgrade-strategy eager --no-build-isolation -e ".[dev]"
    ;;
  oldest)
    torch_min=$(min_of torch); triton_min=$(min_of triton)
    python -m pip install -q ${PIP_TORCH_ARGS:-} "${TORCH_SPEC:-torch==$torch_min}" "triton==$triton_min"
    # the rest as pinned, without the pins of torch/triton (and numpy, whose pin may need a newer torch)
    grep -vE '^(torch|triton|numpy)==' constraints.txt > "$VENV/constraints-rest.txt"
    python -m pip install -q -c "$VENV/constraints-rest.txt" --no-build-isolation -e ".[dev]"
    ;;
  *) echo "unknown mode $mode (latest|oldest)" >&2; exit 2 ;;
esac
python -m pip freeze --exclude-editable | grep -iE '^(torch|triton|numpy|diffusers|transformers|peft|safetensors|accelerate)=' \
  | tee "$VENV/versions.txt"
set +e
python -m pytest -q -p no:cacheprovider "$@" > "$VENV/check.log" 2>&1
rc=$?
set -e
grep -E '^(FAILED|ERROR) ' "$VENV/check.log" | head -50
tail -1 "$VENV/check.log"
echo "log: $VENV/check.log (exit $rc)"
exit $rc
