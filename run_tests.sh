#!/usr/bin/env bash
# Run the test suite on both frameworks: sets up .venv (OneFlow) and .venv-torch (PyTorch) once,
# then runs pytest on OneFlow, the first-class backend, and again on PyTorch. The parity tests in
# each run drive the other framework through its environment. Then, as a step of their own, the
# napari plugin's tests (tests/napari_plugin) on each framework, in a shown viewer under Xvfb.
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
ONEFLOW_PYTHON=$PYTHON
echo "== tests on $UNET_BACKEND ($PYTHON)"
"$PYTHON" -m pytest tests --ignore=tests/napari_plugin -p no:napari "$@"
if [ -n "$TORCH_PYTHON" ] && [ "$PYTHON" != "$TORCH_PYTHON" ]; then
    echo "== tests on torch ($TORCH_PYTHON)"
    UNET_BACKEND=torch "$TORCH_PYTHON" -m pytest tests --ignore=tests/napari_plugin -p no:napari "$@"
fi

# pytest's status 5: the arguments selected none of the plugin's tests
gui_tests() {
    echo "== napari plugin tests on $1 ($2, under Xvfb)"
    UNET_BACKEND=$1 xvfb-run -a -s "-screen 0 1600x1200x24" "$2" -m pytest tests/napari_plugin "${@:3}" || [ $? = 5 ]
}
ensure_xvfb
gui_tests "$UNET_BACKEND" "$ONEFLOW_PYTHON" "$@"
if [ -n "$TORCH_PYTHON" ] && [ "$ONEFLOW_PYTHON" != "$TORCH_PYTHON" ]; then
    gui_tests torch "$TORCH_PYTHON" "$@"
fi
