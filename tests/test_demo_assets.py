"""The tiny model directories of vital_jax.demo_assets: what a kill midway leaves."""

import os

import pytest

from vital_jax import demo_assets
from vital_jax.data import roi
from vital_jax.models import safetensors_io


class Killed(BaseException):  # kill -9: nothing of the code under test runs after it
    pass


def test_a_tiny_siglip_cut_short_by_a_kill_leaves_no_encoder_that_looks_complete(tmp_path, monkeypatch):
    """The study and the demo reuse roi_encoder/ when its config.json exists; that file was written first, so a
    kill before the weights left a directory that failed every later run in load_roi_encoder."""
    out = str(tmp_path / "roi_encoder")

    def killed(*args, **kwargs):
        raise Killed("killed before the weights were written")

    with monkeypatch.context() as patched:
        patched.setattr(safetensors_io, "write_safetensors", killed)
        with pytest.raises(Killed):
            demo_assets.write_tiny_siglip(out)
    assert not os.path.exists(os.path.join(out, "config.json"))
    assert demo_assets.write_tiny_siglip(out) == out  # the next run writes it whole over what the kill left
    encoder, _ = roi.load_roi_encoder(out)
    assert encoder.image_size == 112 and not os.path.exists(out + ".tmp")
    empty = tmp_path / "empty"
    empty.mkdir()
    demo_assets.write_tiny_siglip(str(empty))
    roi.load_roi_encoder(str(empty))
    with pytest.raises(FileExistsError, match=f"{out} exists and is not an empty directory"):
        demo_assets.write_tiny_siglip(out)
