"""`python -m conversion.demo`, run as the README's users run it."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_rerun_replaces_only_its_own_folders(tmp_path):
    """A rerun (its flax/ already there) replaces the demo's folders and leaves the rest of --workdir alone."""
    (tmp_path / "flax").mkdir()
    (tmp_path / "flax" / "stale.txt").write_text("from an earlier run")
    (tmp_path / "notes.txt").write_text("the user's")
    res = subprocess.run([sys.executable, "-m", "conversion.demo", f"--workdir={tmp_path}"], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 0 and "conversion demo passed" in res.stdout, res.stdout + res.stderr
    assert (tmp_path / "notes.txt").read_text() == "the user's"
    assert not (tmp_path / "flax" / "stale.txt").exists() and (tmp_path / "export" / "model.safetensors").exists()
