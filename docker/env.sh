# shellcheck shell=sh
# The names the Docker scripts and tools/mlflow_ui.sh use. Edit them here, or override one for a single
# command from the environment, e.g. `MLFLOW_PORT=5001 sh docker/run.sh`.

# Image built by docker/build.sh.
IMAGE_NAME=${IMAGE_NAME:-cv-engine}
# Container started by docker/run.sh and entered by docker/exec.sh. On a shared machine, make it personal.
CONTAINER_NAME=${CONTAINER_NAME:-cv-engine}
# MLflow UI port: published on the host's 127.0.0.1 by docker/run.sh, served by tools/mlflow_ui.sh.
MLFLOW_PORT=${MLFLOW_PORT:-5000}
