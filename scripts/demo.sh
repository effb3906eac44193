#!/usr/bin/env bash
# `make demo`: the demo model on 127.0.0.1:8080 and the sidecar (default policy) in front of it,
# proxy on 127.0.0.1:8700 and admin on 127.0.0.1:8701. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
MODEL_PORT="${DEMO_MODEL_PORT:-8080}"
export SIDECAR_STATE_DIR="${SIDECAR_STATE_DIR:-./.sidecar}"
pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "demo stopped."
}
trap cleanup INT TERM EXIT

wait_for() {  # wait_for URL: up to 15 s
  for _ in $(seq 1 150); do
    if "$BIN/python" - "$1" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=0.5)
PY
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

SIDECAR_LOG_FORMAT=console "$BIN/sidecar" demo-model --port "$MODEL_PORT" &
pids+=($!)
wait_for "http://127.0.0.1:$MODEL_PORT/healthz"
"$BIN/sidecar" run --policy policies/default.yaml --upstream "http://127.0.0.1:$MODEL_PORT" \
  --port 8700 --admin-port 8701 --log-format console &
pids+=($!)
wait_for "http://127.0.0.1:8701/readyz"

cat <<'TXT'

  The demo model and the sidecar are running.

  Ask the model through the sidecar:
    curl -si http://127.0.0.1:8700/v1/chat/completions -H 'content-type: application/json' \
      -d '{"model":"demo","messages":[{"role":"user","content":"hi"}]}'

  Make the model fail and watch the sidecar answer for it:
    curl -si http://127.0.0.1:8700/v1/chat/completions -H 'x-demo-fault: status=503' \
      -H 'content-type: application/json' -d '{"model":"demo","messages":[]}'
    curl -si http://127.0.0.1:8700/v2/models/fraud/infer -H 'x-demo-fault: hang' \
      -H 'x-request-timeout: 1' -d '{"inputs":[]}'

  Admin: curl -s http://127.0.0.1:8701/readyz    Ctrl-C stops both.

TXT
wait -n "${pids[@]}"
