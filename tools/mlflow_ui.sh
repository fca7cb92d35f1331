#!/bin/sh
# MLflow UI for the project's runs: sh tools/mlflow_ui.sh [extra `mlflow server` options, e.g. --workers 4]
# (`make ui MLFLOW_ARGS="--workers 4"` passes them through make).
#
# Modest by default: one web worker and no background job runners (MLflow's defaults start 4 workers and
# job-runner processes, ~18 processes and 3 GiB for a single user's UI). Options given here come after the
# defaults, and the last value of an option wins; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings the jobs back.
#
# Serves $MLFLOW_TRACKING_URI, or else the store the engine writes to by default (<repo>/mlruns/mlflow.db,
# see engine/tracking.py), at http://127.0.0.1:$MLFLOW_PORT (default in docker/env.sh). MLFLOW_HOST changes
# the interface it listens on; docker/run.sh sets it inside the container.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd -P)
# Sets IMAGE_NAME, CONTAINER_NAME and MLFLOW_PORT. Not followed by shellcheck, so each script passes alone.
# shellcheck source=/dev/null
. "$REPO/docker/env.sh"
HOST=${MLFLOW_HOST:-127.0.0.1}
STORE=${MLFLOW_TRACKING_URI:-sqlite:///$REPO/mlruns/mlflow.db}

case $STORE in
    sqlite:///*)
        # Like the engine: artifacts beside the database, not in ./mlartifacts of the current folder.
        database=${STORE#sqlite:///}
        case $database in
            /*) ;;
            *) database="$(pwd -P)/$database" ;;
        esac
        artifacts="$(dirname "$database")/artifacts"
        mkdir -p "$artifacts"
        set -- --default-artifact-root "file://$artifacts" --artifacts-destination "file://$artifacts" "$@"
        ;;
    http://* | https://*)
        echo "error: MLFLOW_TRACKING_URI=$STORE is already a tracking server: open it in a browser," \
            "or unset MLFLOW_TRACKING_URI to serve the local store" >&2
        exit 2
        ;;
esac

if command -v mlflow >/dev/null 2>&1; then
    MLFLOW=mlflow
elif [ -x "$REPO/.venv/bin/mlflow" ]; then
    MLFLOW="$REPO/.venv/bin/mlflow"
else
    echo "error: mlflow is neither on PATH nor in $REPO/.venv/bin; run \`make ui\`, which installs it" >&2
    exit 127
fi

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION
set -- --workers 1 "$@"

# mlflow/server/fastapi_app.py imports starlette.middleware.wsgi, which warns that it is deprecated on every start:
# MLflow's to fix, nothing a user can act on. Only that warning, from that module, is silenced.
PYTHONWARNINGS="ignore:starlette.middleware.wsgi is deprecated:UserWarning:mlflow.server.fastapi_app${PYTHONWARNINGS:+,$PYTHONWARNINGS}"
export PYTHONWARNINGS

echo "MLflow UI for $STORE on http://127.0.0.1:$MLFLOW_PORT" >&2
# Once the server answers, the address of the newest run's experiment's runs list (needs a Python beside mlflow).
PYTHON="$(dirname "$(command -v "$MLFLOW")")/python"
if [ -x "$PYTHON" ] && [ -f "$REPO/tools/mlflow_ui_runs_url.py" ]; then
    "$PYTHON" "$REPO/tools/mlflow_ui_runs_url.py" "$MLFLOW_PORT" &
fi
exec "$MLFLOW" server --backend-store-uri "$STORE" --host "$HOST" --port "$MLFLOW_PORT" "$@"
