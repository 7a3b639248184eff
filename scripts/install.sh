#!/usr/bin/env bash
# Installs everything the project needs into the current python3 environment ($PYTHON overrides).
# On Linux without CUDA, the CPU build torch==2.13.0+cpu goes in first, from PyTorch's CPU index (PyPI's
# Linux torch wheel is the several-GB CUDA build); TORCH_INDEX_URL replaces that index. macOS gets PyPI's
# torch==2.13.0, which is a CPU build. requirements.txt keeps a range so GPU users keep their own build.
# An externally-managed system Python (Debian 12, Ubuntu 23.04+) stops us before pip: use a virtualenv.
# Headless MuJoCo rendering needs EGL or OSMesa: installed with apt-get when we are root, else the
# command to run is printed (and tests/test_suite_dmc.py's headless-backend test skips).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# pip refuses (PEP 668) to install into a distribution's own Python outside a virtualenv; say so plainly.
# Exit status 3: externally managed and not inside a virtualenv or conda environment.
# (tests/test_install_script.py runs this whole script against a stub interpreter.)
EXTERNALLY_MANAGED_CHECK='
import os, sys, sysconfig
in_env = sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta"))
marker = os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")
sys.exit(3 if os.path.isfile(marker) and not in_env else 0)
'
case "${PIP_BREAK_SYSTEM_PACKAGES:-}" in
  1 | [Tt]rue | [Yy]es | [Oo]n) em_status=0 ;;  # the user told pip to install into it anyway
  *) em_status=0; "$PY" -c "$EXTERNALLY_MANAGED_CHECK" || em_status=$? ;;
esac
if [ "$em_status" = 3 ]; then
  cat >&2 <<EOF
[install] Stopped before installing anything: $("$PY" -c 'import sys; print(sys.executable)') is
your operating system's own Python, which is marked "externally managed" (PEP 668), so pip refuses to
install packages into it. Create a virtual environment in this repository, activate it, and rerun the
README command you ran (python3 then means the virtual environment's Python; in a new shell, activate
it again first). If venv is missing: sudo apt-get install -y python3-venv
    $PY -m venv .venv && . .venv/bin/activate
    bash scripts/install.sh && python3 -m pytest -q    # or the README's other command
EOF
  exit 1
elif [ "$em_status" != 0 ]; then
  echo "[install] could not run $PY (exit status $em_status); set PYTHON to a Python 3.10+ interpreter" >&2
  exit 1
fi

# True when PyTorch's CPU index answers within a few seconds (any HTTP reply counts; proxies are honoured).
# Without the probe, an unreachable index costs pip's five retries (and timeouts) with a warning each.
cpu_index_reachable() {
  "$PY" - "$TORCH_CPU_INDEX/torch/" <<'EOF' >/dev/null 2>&1
import ssl, sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=5)
except urllib.error.HTTPError:
    pass  # the server answered
except urllib.error.URLError as error:
    sys.exit(0 if isinstance(error.reason, ssl.SSLError) else 1)  # a TLS reply is an answer too
except Exception:
    sys.exit(1)
EOF
}

if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "[install] no CUDA found: installing torch==$TORCH_VERSION from $TORCH_INDEX_URL first"
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  elif [ "$(uname -s)" = Linux ]; then
    TORCH_SPEC="torch==$TORCH_VERSION+cpu"
    # Reachable index: use it. Otherwise first pip's configured sources (a mirror, a local wheel), then
    # the index anyway in case pip's own network settings (e.g. its proxy option) reach it.
    if cpu_index_reachable; then
      echo "[install] no CUDA found: installing the CPU build $TORCH_SPEC from $TORCH_CPU_INDEX first"
      TRIES="index"
    else
      echo "[install] no CUDA found: installing the CPU build $TORCH_SPEC first" \
        "($TORCH_CPU_INDEX did not answer: trying pip's configured sources)"
      TRIES="plain index"
    fi
    installed=""
    for try in $TRIES; do
      if [ "$try" = index ]; then
        "$PY" -m pip install --quiet "$TORCH_SPEC" --extra-index-url "$TORCH_CPU_INDEX" && installed=1
      else
        "$PY" -m pip install --quiet "$TORCH_SPEC" 2>/dev/null && installed=1
      fi
      if [ -n "$installed" ]; then break; fi
    done
    if [ -z "$installed" ]; then
      echo "[install] could not install $TORCH_SPEC. Set TORCH_INDEX_URL to an index that has it" \
        "(e.g. a mirror of $TORCH_CPU_INDEX), or install torch yourself and rerun." >&2
      exit 1
    fi
  else
    echo "[install] no CUDA found: installing torch==$TORCH_VERSION (a CPU build on this platform) first"
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
  fi
fi
"$PY" -m pip install --quiet -r requirements.txt

GL_PACKAGES="libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libosmesa6"
GL_FOUND=$(ldconfig -p 2>/dev/null | grep -cE "libEGL.so.1|libOSMesa.so" || true)
if [ "${GL_FOUND:-0}" = 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] installing headless rendering libraries: $GL_PACKAGES"
    # shellcheck disable=SC2086  # the package list is meant to split into words
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $GL_PACKAGES) >/dev/null \
      || echo "[install] apt-get failed; DMC pixel tasks need: sudo apt-get install -y $GL_PACKAGES"
  else
    echo "[install] DMC pixel tasks need headless rendering: sudo apt-get install -y $GL_PACKAGES"
  fi
fi
echo "[install] done: $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
