#!/usr/bin/env bash
# Run the test suite: sets up both environments once (.venv with OneFlow, .venv-torch with
# PyTorch), then runs pytest on OneFlow, the first-class backend. The tests that compare the two
# frameworks drive PyTorch through .venv-torch. Arguments go to pytest (`bash run_tests.sh -k data`).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
UNET_BACKEND=torch
ensure_env || echo "warning: no PyTorch environment: the OneFlow/PyTorch parity tests will be skipped" >&2
unset UNET_BACKEND PYTHON
ensure_env
exec "$PYTHON" -m pytest tests "$@"
