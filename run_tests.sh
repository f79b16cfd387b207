#!/usr/bin/env bash
# Run the test suite on both frameworks: sets up .venv (OneFlow) and .venv-torch (PyTorch) once,
# then runs pytest on OneFlow, the first-class backend, and again on PyTorch. The parity tests in
# each run drive the other framework through its environment.
# Arguments go to pytest (`bash run_tests.sh -k checkpoint`).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
UNET_BACKEND=torch
TORCH_PYTHON=
if ensure_env; then
    TORCH_PYTHON=$PYTHON
else
    echo "warning: no PyTorch environment: tests run on OneFlow only, parity tests skipped" >&2
fi
unset UNET_BACKEND PYTHON
ensure_env
echo "== tests on $UNET_BACKEND ($PYTHON)"
"$PYTHON" -m pytest tests "$@"
if [ -n "$TORCH_PYTHON" ] && [ "$PYTHON" != "$TORCH_PYTHON" ]; then
    echo "== tests on torch ($TORCH_PYTHON)"
    UNET_BACKEND=torch "$TORCH_PYTHON" -m pytest tests "$@"
fi
