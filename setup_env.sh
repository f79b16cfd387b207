# Sourced by train.sh, test.sh and run_tests.sh: creates or reuses the project's environments.
#   .venv        OneFlow 0.9 on CPython 3.8-3.10 (its only binary release)
#   .venv-torch  PyTorch (its CPU wheel here is for CPython 3.11)
# `ensure_env` picks the backend from UNET_BACKEND (default oneflow, falling back to torch where
# no Python <= 3.10 exists), sets it up once (a second run only compares a hash), and sets $PYTHON.

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# A working interpreter for CPython 3.$1 .. 3.$2 (newest first), from PATH or pyenv; prints its path.
find_python() {
    local minor candidate pyenv_root
    pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    for minor in $(seq "$2" -1 "$1"); do
        for candidate in "$(command -v "python3.$minor" 2>/dev/null)" "$pyenv_root"/versions/3."$minor".*/bin/python3; do
            if [ -x "$candidate" ] && "$candidate" -c "import sys, venv; assert sys.version_info[:2] == (3, $minor)" 2>/dev/null; then
                echo "$candidate"
                return 0
            fi
        done
    done
    return 1
}

# make_venv DIR PYTHON REQUIREMENTS EXTRAS: the pinned requirements, then the package itself
# (`pip install -e .[EXTRAS]`: its console scripts, importable from anywhere); install once,
# again when a requirements file or pyproject.toml changes.
make_venv() {
    local dir=$1 python=$2 requirements=$3 extras=$4 want
    want=$(cat "$PROJECT_DIR/$requirements" "$PROJECT_DIR/requirements-common.txt" "$PROJECT_DIR/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.requirements.sha" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    echo "setup: creating $dir with $("$python" --version) from $requirements (first run only; a few minutes)"
    "$python" -m venv "$dir" || return 1
    "$dir/bin/python" -m pip install -q --disable-pip-version-check -r "$PROJECT_DIR/$requirements" \
        -e "$PROJECT_DIR[$extras]" || {
        echo "error: installing $requirements into $dir failed (see pip's message above)" >&2
        return 1
    }
    echo "$want" > "$dir/.requirements.sha"
}

ensure_oneflow_env() {
    local python
    python=$(find_python 8 10) || return 1
    # 2: a Python was found but installing failed (a full disk, no registry): no fallback hides that
    make_venv "$PROJECT_DIR/.venv" "$python" requirements-oneflow.txt oneflow,dask,napari,test || return 2
    # OneFlow's CUDA build loads cuDNN/cuBLAS even on a CPU-only machine.
    local libs
    libs=$(ls -d "$PROJECT_DIR"/.venv/lib/python3.*/site-packages/nvidia/*/lib 2>/dev/null | tr '\n' ':')
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
}

ensure_torch_env() {
    local python
    python=$(find_python 11 11 || find_python 8 13) || {
        echo "error: no CPython 3.8-3.13 found for PyTorch" >&2
        return 1
    }
    make_venv "$PROJECT_DIR/.venv-torch" "$python" requirements-torch.txt torch,dask,export,napari,test
}

ensure_env() {
    case "${UNET_BACKEND:-oneflow}" in
        oneflow)
            local status=0
            ensure_oneflow_env || status=$?
            if [ "$status" = 0 ]; then
                export UNET_BACKEND=oneflow PYTHON="$PROJECT_DIR/.venv/bin/python"
                return 0
            fi
            if [ "$status" = 2 ]; then
                return 1
            fi
            if [ -n "${UNET_BACKEND:-}" ]; then
                echo "error: UNET_BACKEND=oneflow needs CPython 3.8-3.10 (oneflow 0.9.0 has no other wheels)" >&2
                return 1
            fi
            echo "setup: no CPython 3.8-3.10 found, so OneFlow 0.9 cannot be installed: falling back to PyTorch" >&2
            ;&
        torch)
            ensure_torch_env || return 1
            export UNET_BACKEND=torch PYTHON="$PROJECT_DIR/.venv-torch/bin/python"
            ;;
        *)
            echo "error: UNET_BACKEND must be oneflow or torch, not '$UNET_BACKEND'" >&2
            return 1
            ;;
    esac
}

# True when the arguments ask for --help (then the scripts skip fetching data).
wants_help() {
    local arg
    for arg in "$@"; do
        case "$arg" in -h|--help) return 0 ;; esac
    done
    return 1
}

# The X server the napari plugin's tests draw on: Xvfb and the xcb libraries PyQt5 needs (installed
# with apt-get where missing, once).
XVFB_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0"
ensure_xvfb() {
    if ! dpkg -s $XVFB_PACKAGES >/dev/null 2>&1; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "error: the napari plugin's tests need an X server: install $XVFB_PACKAGES (as root: apt-get install -y $XVFB_PACKAGES)" >&2
            return 1
        fi
        echo "setup: installing Xvfb for the napari plugin's tests (first run only)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq $XVFB_PACKAGES >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $XVFB_PACKAGES >/dev/null; } || {
            echo "error: apt-get could not install $XVFB_PACKAGES" >&2
            return 1
        }
    fi
}
