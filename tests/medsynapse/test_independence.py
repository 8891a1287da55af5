"""MedSynapse-V and VITAL are independent methods: no module of vital_jax.medsynapse imports vital_jax.vital
(shared machinery lives in vital_jax/models, layers, freeze.py, generation.py)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECK = """
import importlib, pkgutil, sys
import vital_jax.medsynapse as pkg
names = [m.name for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "vital_jax.vital" or m.startswith("vital_jax.vital."))
assert not leaked, f"vital_jax.medsynapse imports {leaked}"
print(len(names))
"""


def test_medsynapse_modules_do_not_import_vital():
    # A fresh interpreter, so that modules other tests imported do not count; run from the checkout under test.
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) >= 3
