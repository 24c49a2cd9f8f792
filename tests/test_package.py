"""The package itself: what `import csdlab` needs, says, and costs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_missing_spikingjelly_says_how_to_install_it():
    # None in sys.modules makes `import spikingjelly` fail as if it were not installed
    proc = _python("import sys; sys.modules['spikingjelly'] = None; import csdlab")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: csdlab needs SpikingJelly 2.0.0, which is not installed")
    assert "`pip install --no-deps spikingjelly==2.0.0`" in last


def test_import_is_light_and_models_register_on_first_use():
    """`train.py --help` should not wait for timm: importing csdlab (and its CLI module) does not
    load it; `csdlab.models` registers the csdformer_* names when asked for."""
    proc = _python("import sys, csdlab, csdlab.cli; print('timm' in sys.modules, 'wandb' in sys.modules); "
                   "import timm; csdlab.models; print(sorted(timm.list_models('csdformer*'))[:2])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False False", "['csdformer_2_384', 'csdformer_4_256']"]
