#!/usr/bin/env bash
# Installs everything the project needs into the current python3 environment.
# On a machine without CUDA, the CPU build torch==2.13.0 goes in first (a plain `torch` requirement
# would pull a several-GB CUDA build); requirements.txt keeps a range so GPU users keep their own build.
# Headless MuJoCo rendering needs EGL or OSMesa: installed with apt-get when we are root, else the
# command to run is printed.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] no CUDA found: installing the CPU build torch==2.13.0 first"
  "$PY" -m pip install --quiet torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"$PY" -m pip install --quiet -r requirements.txt

GL_PACKAGES="libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libosmesa6"
GL_FOUND=$(ldconfig -p 2>/dev/null | grep -cE "libEGL.so.1|libOSMesa.so" || true)
if [ "${GL_FOUND:-0}" = 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] installing headless rendering libraries: $GL_PACKAGES"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $GL_PACKAGES) >/dev/null \
      || echo "[install] apt-get failed; DMC pixel tasks need: sudo apt-get install -y $GL_PACKAGES"
  else
    echo "[install] DMC pixel tasks need headless rendering: sudo apt-get install -y $GL_PACKAGES"
  fi
fi
echo "[install] done: $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
