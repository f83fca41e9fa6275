#!/usr/bin/env bash
# The TPU pod launcher is launch/tpu_pod.py (standard library only); see `launch/tpu_pod.sh --help`.
exec python3 "$(dirname "${BASH_SOURCE[0]}")/tpu_pod.py" "$@"
