#!/usr/bin/env bash
# Submit a puregen-dist command to a Ray cluster as a Ray job, from a checkout of this repository:
#
#   export RAY_ADDRESS=http://127.0.0.1:8265                    # the cluster's dashboard (local or port-forwarded)
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray/puregen_auth_token   # the token the cluster runs with
#   export PUREGEN_ROOT=/mnt/shared/puregen                     # a directory every node mounts (store, Tune, outputs)
#   export MLFLOW_TRACKING_URI=http://<mlflow-host>:5000        # a tracking server every node reaches
#   cluster/submit.sh [ray job submit options] -- puregen-dist sweep sweeps/quickstart.yaml [--set ...]
#
# The repository is uploaded as the job's working directory (.gitignore and .rayignore keep data, stores, outputs
# and MLflow databases out). The job gets the code revision as PUREGEN_GIT_REVISION (a job's working directory
# has no .git) and, when they are set here, PUREGEN_ROOT, MLFLOW_TRACKING_URI and PUREGEN_DIST_PLUGINS. Options
# before "--" go to `ray job submit` (--submission-id, --no-wait, --entrypoint-num-cpus, ...); follow the job with
# `ray job logs -f <id>`, stop it with `ray job stop <id>`, and resubmit the same command to finish what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$revision" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then
  revision="$revision-dirty"
fi
runtime_env="$(PUREGEN_GIT_REVISION="$revision" python3 -c '
import json, os
names = ("PUREGEN_GIT_REVISION", "PUREGEN_ROOT", "MLFLOW_TRACKING_URI", "PUREGEN_DIST_PLUGINS")
print(json.dumps({"env_vars": {"PYTHONUNBUFFERED": "1", **{n: os.environ[n] for n in names if os.environ.get(n)}}}))
')"
exec ray job submit --working-dir . --runtime-env-json "$runtime_env" "$@"
