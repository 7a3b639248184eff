"""scripts/install.sh: syntax, and its stop on externally-managed Pythons, run for real on a stub $PYTHON.

The stub ($PYTHON) runs install.sh's own `-c` snippets in this Python with sysconfig's stdlib path and
sys.prefix/base_prefix faked, answers `import torch` as present, and logs and fails every `-m pip`, so
nothing is installed and install.sh stops at its first pip call. Each run takes well under a second.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'install.sh'
pytestmark = pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')

STUB = '''import json, os, sys
args = sys.argv[1:]
with open(os.environ['STUB_LOG'], 'a') as log:
    log.write(json.dumps(args) + '\\n')
if args[:2] == ['-m', 'pip']:
    sys.exit(1)
if args == ['-c', 'import torch']:  # STUB_TORCH=absent: a machine without torch yet
    sys.exit(0 if os.environ.get('STUB_TORCH', 'present') == 'present' else 1)
if args[:1] == ['-']:  # the probe of PyTorch's CPU index (read from stdin): STUB_PROBE is its exit status
    sys.exit(int(os.environ.get('STUB_PROBE', '1')))
if args[:1] == ['-c']:
    import sysconfig
    real_get_paths = sysconfig.get_paths
    sysconfig.get_paths = lambda *a, **k: dict(real_get_paths(*a, **k), stdlib=os.environ['STUB_STDLIB'])
    sys.prefix = os.environ['STUB_PREFIX']
    sys.base_prefix = os.environ['STUB_BASE_PREFIX']
    sys.argv = ['-c']
    exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})
    sys.exit(0)
sys.exit(2)
'''


def run_install(tmp_path, marker: bool, in_venv: bool, **env):
    """Runs install.sh with the stub; returns (exit code, stderr, the stub's logged argument lists)."""
    stdlib, prefix = tmp_path / 'stdlib', tmp_path / 'prefix'
    stdlib.mkdir()
    prefix.mkdir()
    if marker:
        (stdlib / 'EXTERNALLY-MANAGED').write_text('[externally-managed]\nError=use a venv\n')
    stub_py = tmp_path / 'stub.py'
    stub_py.write_text(STUB)
    stub = tmp_path / 'python'  # a wrapper, since a shebang to a long sys.executable path may not work
    stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{stub_py}" "$@"\n')
    stub.chmod(0o755)
    log = tmp_path / 'calls.jsonl'
    base_prefix = tmp_path / 'base' if in_venv else prefix
    full_env = {'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path), 'PYTHON': str(stub), 'STUB_LOG': str(log),
                'STUB_STDLIB': str(stdlib), 'STUB_PREFIX': str(prefix), 'STUB_BASE_PREFIX': str(base_prefix),
                **env}
    result = subprocess.run(['bash', str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result.returncode, result.stderr, calls


def pip_calls(calls):
    return [call for call in calls if call[:2] == ['-m', 'pip']]


def test_script_parses():
    subprocess.run(['bash', '-n', str(SCRIPT)], check=True)


def test_externally_managed_python_stops_before_pip_with_the_venv_commands(tmp_path):
    code, stderr, calls = run_install(tmp_path, marker=True, in_venv=False)
    assert code == 1
    assert pip_calls(calls) == []
    assert 'externally managed' in stderr
    assert f'{tmp_path / "python"} -m venv .venv && . .venv/bin/activate' in stderr
    assert 'bash scripts/install.sh && python3 -m pytest -q' in stderr


@pytest.mark.parametrize('marker, in_venv, env', [
    (False, False, {}),  # e.g. pyenv or python.org builds: no marker
    (True, True, {}),  # a virtualenv made from an externally-managed Python
    (True, False, {'PIP_BREAK_SYSTEM_PACKAGES': '1'}),  # the user overrides PEP 668 on purpose
], ids=['no-marker', 'venv', 'break-system-packages'])
def test_other_pythons_go_on_to_pip(tmp_path, marker, in_venv, env):
    code, stderr, calls = run_install(tmp_path, marker, in_venv, **env)
    assert code != 0 and 'externally managed' not in stderr  # the stub's failing pip stops the script
    assert pip_calls(calls) == [['-m', 'pip', 'install', '--quiet', '-r', 'requirements.txt']]


def test_a_missing_interpreter_is_reported(tmp_path):
    env = {'PATH': '/usr/bin:/bin', 'PYTHON': str(tmp_path / 'none')}
    result = subprocess.run(['bash', str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and 'set PYTHON to a Python 3.10+ interpreter' in result.stderr


CPU_INDEX = 'https://download.pytorch.org/whl/cpu'


@pytest.mark.skipif(not sys.platform.startswith('linux') or shutil.which('nvidia-smi', path='/usr/bin:/bin')
                    is not None, reason='the CPU-build path: Linux without nvidia-smi')
@pytest.mark.parametrize('probe, env, expected', [
    ('0', {}, [['torch==2.13.0+cpu', '--extra-index-url', CPU_INDEX]]),  # the index answers
    ('1', {}, [['torch==2.13.0+cpu'], ['torch==2.13.0+cpu', '--extra-index-url', CPU_INDEX]]),  # pip's own first
    ('1', {'TORCH_INDEX_URL': 'https://mirror.example/cpu'},
     [['torch==2.13.0', '--index-url', 'https://mirror.example/cpu']]),
], ids=['index-reachable', 'index-unreachable', 'torch-index-url'])
def test_without_cuda_and_torch_the_cpu_build_is_asked_for(tmp_path, probe, env, expected):
    """On Linux without CUDA, torch==2.13.0+cpu from PyTorch's CPU index (PyPI's Linux wheel is the
    CUDA build); if every try fails, the script stops naming TORCH_INDEX_URL."""
    code, stderr, calls = run_install(tmp_path, marker=False, in_venv=False, STUB_TORCH='absent',
                                      STUB_PROBE=probe, **env)
    assert code == 1
    assert pip_calls(calls) == [['-m', 'pip', 'install', '--quiet', *tail] for tail in expected]
    if 'TORCH_INDEX_URL' not in env:
        assert 'could not install torch==2.13.0+cpu. Set TORCH_INDEX_URL' in stderr
