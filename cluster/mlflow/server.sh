#!/usr/bin/env bash
# MLflow tracking server for puregen-dist (MLflow version: cluster/versions.yaml). Local by default:
#   bash cluster/mlflow/server.sh            -> http://127.0.0.1:5000, data under ./mlflow-server/
# Settings (environment): MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (2),
# MLFLOW_BACKEND_STORE_URI (sqlite:///$PWD/mlflow-server/mlflow.db; a PostgreSQL URI for shared servers),
# MLFLOW_ARTIFACTS_DESTINATION ($PWD/mlflow-server/artifacts, or s3://... / gs://...), and MLflow's own
# MLFLOW_SERVER_ALLOWED_HOSTS (Host headers accepted; default localhost and private IPs) and
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false here).
# Point puregen-dist at it with MLFLOW_TRACKING_URI=http://<host>:<port> (or --set base.tracking.uri=...).
set -euo pipefail

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow-server/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlflow-server/artifacts}"
# puregen-dist uses no MLflow server jobs (GenAI scorers, prompt optimisation): without them the server starts
# no job-runner processes beside its workers. Set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# Local directories for the defaults (a sqlite file and an artifact directory); URIs are left alone.
if [[ "$backend" == sqlite:///* ]]; then
    mkdir -p "$(dirname "${backend#sqlite:///}")"
fi
if [[ "$artifacts" != *://* ]]; then
    mkdir -p "$artifacts"
fi

if [[ "$host" != "127.0.0.1" && "$host" != "localhost" ]]; then
    echo "WARNING: binding to $host: MLflow has no authentication by default, so anyone who can reach" \
         "port $port can read and change every run. Keep it on a private network or behind a proxy" \
         "with authentication." >&2
fi

echo "MLflow tracking server: http://$host:$port (backend $backend, artifacts $artifacts)" >&2
# --serve-artifacts: clients upload and download artifacts through the server (proxied), so they need no
# credentials for the artifact store.
exec mlflow server \
    --host "$host" \
    --port "$port" \
    --workers "$workers" \
    --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" \
    --serve-artifacts
