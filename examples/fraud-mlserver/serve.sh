#!/usr/bin/env bash
# Starts MLServer with the fraud model (models/) from its own virtualenv (setup.sh), in the
# foreground; Ctrl-C or SIGTERM stops it.
#
#   examples/fraud-mlserver/serve.sh                 # HTTP on 127.0.0.1:8080
#   examples/fraud-mlserver/serve.sh --http-port 9080 --grpc-port 9081
#
# HTTP (KServe V2 REST) is what the sidecar talks to. MLServer always starts its gRPC server too;
# by default it binds a free port (0), so it never collides with anything. MLServer's own metrics
# server is off (`metrics_endpoint: null` in models/settings.json): the sidecar exports metrics.
# The server settings are in models/settings.json, the model's in models/fraud/model-settings.json;
# ports come from here (MLSERVER_HTTP_PORT / MLSERVER_GRPC_PORT), so keep them out of settings.json,
# whose values would win over the environment.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${MLSERVER_VENV:-$here/.venv-mlserver}"
models="$here/models"
http_port="${MLSERVER_HTTP_PORT:-8080}"
grpc_port="${MLSERVER_GRPC_PORT:-0}"

usage() { echo "usage: $0 [--http-port N] [--grpc-port N] [--models DIR]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --http-port) http_port="${2:?}"; shift 2 ;;
    --grpc-port) grpc_port="${2:?}"; shift 2 ;;
    --models) models="${2:?}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done

[ -x "$venv/bin/mlserver" ] || { echo "no MLServer in $venv: run $here/setup.sh first" >&2; exit 1; }
[ -f "$models/fraud/model.joblib" ] || {
  echo "no model in $models/fraud: run $venv/bin/python $here/train.py first" >&2; exit 1; }

export MLSERVER_HTTP_PORT="$http_port" MLSERVER_GRPC_PORT="$grpc_port"
# One row per request gains nothing from OpenMP threads in scikit-learn's predict, and on a busy
# machine their spin-waiting turns a 10ms answer into a 1s one: one thread.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$venv/bin/mlserver" start "$models"
