#!/usr/bin/env bash
# Installs samwatch and every dependency into ./.venv (needs Python 3.11+ and pip access).
#   ./install.sh          the daemon
#   ./install.sh --test   the daemon and the test tools
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch and torchvision only work as a matching pair.
pip install -q torch==2.14.1 torchvision==0.29.1
# sam2 ships as an sdist whose build imports torch: build it against the torch above, CPU only
# (its CUDA extension is optional and only speeds up hole filling).
if ! .venv/bin/python -c "import sam2" 2>/dev/null; then
  SAM2_BUILD_CUDA=0 pip install -q --no-build-isolation "sam2>=1.1"
fi
pip install -q -e ".${extras}"
echo "samwatch installed: $(.venv/bin/samwatch --version)"
