#!/usr/bin/env bash
# Install snlp-lightning (editable) into the active Python environment; use a fresh venv.
#
#   bash install.sh          the package and its runtime dependencies
#   bash install.sh test     ... plus the test tools
#
# Why not a bare `pip install -e .`:
# 1. torch. Without a pin in the same pip command, lightning / litdata make pip resolve the newest
#    torch, which on Linux is the CUDA build with several GB of CUDA wheels. We name the torch we
#    want (default 2.13.0; a local CPU wheel where one is offered) in the same command, and pip
#    keeps it. Set SNLP_TORCH to choose another, e.g. SNLP_TORCH="torch==2.13.0" on a CUDA box
#    with the CUDA index configured.
# 2. torchvision. litdata declares a dependency on it, and pip then installs a CUDA torchvision
#    whose import fails on a CPU torch ("operator torchvision::nms does not exist"). lightning and
#    torchmetrics import torchvision when it is present, so that broken wheel breaks them too.
#    Nothing here uses torchvision: if it does not import, we remove it (pip check will then
#    mention litdata's unmet torchvision requirement; that is expected and harmless).
set -euo pipefail
cd "$(dirname "$0")"
torch_spec="${SNLP_TORCH:-torch==2.13.0}"
extras="${1:-}"
python -m pip install --disable-pip-version-check "$torch_spec" -e ".${extras:+[$extras]}"
if ! python -c "import torchvision" >/dev/null 2>&1 && python -m pip show torchvision >/dev/null 2>&1; then
    echo "install.sh: removing torchvision, whose wheel does not import on this torch (see the comment above)"
    python -m pip uninstall -y torchvision
fi
python -c "import torch, lightning, litdata, torchmetrics; print(f'install.sh: torch {torch.__version__}, lightning {lightning.__version__}, litdata {litdata.__version__}')"
