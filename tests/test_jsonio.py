"""jsonio: errors that name the file (and line) for every kind of bad JSON file; durable directory renames."""

import errno

import pytest

from vital_jax import jsonio


class _Bad(ValueError):
    pass


def test_read_json_names_the_file_for_missing_malformed_and_non_utf8(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(_Bad, match=r"config\.json: not found; hint"):
        jsonio.read_json(str(path), _Bad, "hint")
    path.write_text('{"a": 1,')
    with pytest.raises(_Bad, match=r"config\.json: malformed JSON: .*line 1"):
        jsonio.read_json(str(path), _Bad)
    path.write_bytes(b'{\n "a": "caf\xe9"\n}\n')  # Latin-1, not UTF-8
    with pytest.raises(_Bad, match=r"config\.json:2: not UTF-8 text \(byte 0xe9 at column 11\)"):
        jsonio.read_json(str(path), _Bad)
    path.write_text('{"a": "caf\u00e9"}', encoding="utf-8")
    assert jsonio.read_json(str(path), _Bad) == {"a": "caf\u00e9"}


def test_fsync_directory_tolerates_only_filesystems_that_cannot_sync_a_directory(tmp_path, monkeypatch):
    jsonio.fsync_directory(str(tmp_path))
    failure = {}

    def fsync(fd):
        raise OSError(failure["errno"], "fsync failed")

    monkeypatch.setattr(jsonio.os, "fsync", fsync)
    failure["errno"] = errno.EINVAL  # a filesystem that cannot sync a directory: nothing stronger to ask
    jsonio.fsync_directory(str(tmp_path))
    failure["errno"] = errno.EIO  # a real failure is not hidden
    with pytest.raises(OSError, match="fsync failed"):
        jsonio.fsync_directory(str(tmp_path))
