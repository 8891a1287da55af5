"""What a dataset build read, recorded beside its outputs, so that a rerun can tell a resume from a different build.

`OUT_DIR/build_inputs.json` holds
  config  every build-config field that shapes the outputs, flattened ("phantoms.count": 12). Left out: out_dir
          and on_change, the settings of the sources not in use, the source folders' paths (their files count,
          not where they lie), the ROI stage (it recomputes everything on every run) and teacher settings that
          only change how the teacher is reached (workers, key variable, timeout, retries, backoff).
  files   for each source folder (by config field), {relative path: {size, mtime_ns, sha256}} of its files
          (hidden ones skipped). A file whose size and mtime are unchanged keeps its recorded hash, as git's
          index does, so checking a resumed build reads no file; a touched but identical file is no change.
A rerun whose inputs differ is a different build: `differences` says how, and the builder refuses it or, with
config.on_change = "rebuild", moves the old outputs into out_dir/replaced-<UTC time>/ first.
"""

from __future__ import annotations

import hashlib
import json
import os

from vital_jax.data import teacher
from vital_jax.jsonio import atomic_write, file_sha256, read_json

INPUTS_FILE = "build_inputs.json"
VERSION = 1
SOURCES = ("phantoms", "biomedparse", "msd", "dicom")
# Config fields holding source folders, per source.
FOLDERS = {"biomedparse": ("biomedparse.image_dir", "biomedparse.mask_dir"), "msd": ("msd.task_dir",),
           "dicom": ("dicom.root",)}
_RECURSIVE = {"msd.task_dir", "dicom.root"}
# Fields that do not change what is built.
_IGNORED = {"out_dir", "on_change", "teacher.workers", "teacher.api_key_env", "teacher.timeout_s",
            "teacher.max_retries", "teacher.backoff_s", "teacher.max_requests", "teacher.dry_run"}
# The API teacher's sampling: what it answers, not what the offline teacher does.
_API_ONLY = {"teacher.temperature", "teacher.max_tokens"}
# Fields added after build_inputs.json files were written, with the value the build behaved as before them: a
# recorded build without the field is the same build when the field has that value.
_ADDED = {"teacher.temperature": 0.2, "teacher.max_tokens": 0}
_IGNORED_SECTIONS = ("roi",)
_SHOWN = 3  # file names shown per kind of change


class InputsError(ValueError):
    """build_inputs.json cannot be read; the message names it and says what to do."""


def read(out_dir: str) -> dict | None:
    """The recorded inputs of the build in `out_dir`, or None when it has none; InputsError naming the file when
    it is not UTF-8 JSON holding an object (a truncated write, an edit)."""
    path = os.path.join(out_dir, INPUTS_FILE)
    if not os.path.exists(path):
        return None
    hint = (f"; it records the inputs {out_dir} was built from: delete it to reuse the folder's outputs as they "
            "are (unchecked against this config), or build into an empty out_dir")
    try:
        recorded = read_json(path, InputsError)
    except InputsError as e:
        raise InputsError(f"{e}{hint}") from e
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(k, {}), dict) for k in ("config", "files")):
        raise InputsError(f"{path}: expected a JSON object with objects \"config\" and \"files\"{hint}")
    return recorded


def write(out_dir: str, inputs: dict) -> None:
    """Record `inputs` in `out_dir` (atomically: temporary file, fsync, rename)."""
    atomic_write(os.path.join(out_dir, INPUTS_FILE), lambda f: json.dump(inputs, f, indent=1, sort_keys=True))


def fingerprint(config, previous: dict | None = None) -> dict:
    """The inputs of a build under `config` (module docstring); hashes of files unchanged since `previous` (the
    recorded inputs) are taken from it."""
    flat = _flatten(json.loads(json.dumps(config.to_dict(), default=list)))
    skipped = _IGNORED | set(FOLDERS.get(config.source, ())) | (_API_ONLY if config.teacher.kind != "api" else set())
    sections = tuple(s for s in SOURCES if s != config.source) + _IGNORED_SECTIONS
    kept = {k: v for k, v in flat.items() if k not in skipped and not k.startswith(tuple(s + "." for s in sections))}
    url = kept.get("teacher.base_url")
    if isinstance(url, str) and url and teacher.redact_url(url) != url:
        # Credentials in the URL (userinfo, query) are never written; their digest still tells a change apart.
        kept["teacher.base_url"] = f"{teacher.redact_url(url)} (sha256 {hashlib.sha256(url.encode()).hexdigest()[:16]})"
    known = (previous or {}).get("files", {})
    files = {field: _files(flat[field], field in _RECURSIVE, known.get(field, {}))
             for field in FOLDERS.get(config.source, ()) if flat.get(field)}
    return {"version": VERSION, "config": kept, "files": files}


def differences(previous: dict, current: dict) -> list[str]:
    """One line per change from the `previous` inputs to the `current` ones (empty: the same build)."""
    if previous.get("version") != current["version"]:
        return [f"{INPUTS_FILE} version {previous.get('version')} -> {current['version']}"]
    out = []
    before, after = previous.get("config", {}), current["config"]
    keys = set(before) | set(after)
    if before.get("source") != after.get("source"):  # the change of source says it; not each of its settings
        keys = {k for k in keys if not k.startswith(tuple(s + "." for s in SOURCES))}
    keys = {k for k in keys if not (k in _ADDED and k not in before and after.get(k) == _ADDED[k])}
    for key in sorted(keys):
        if before.get(key, "<unset>") != after.get(key, "<unset>"):
            out.append(f"config.{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    old_files, new_files = previous.get("files", {}), current["files"]
    for field in sorted(set(old_files) | set(new_files)):
        old, new = old_files.get(field, {}), new_files.get(field, {})
        changed = sorted(p for p in set(old) & set(new)
                         if (old[p]["size"], old[p]["sha256"]) != (new[p]["size"], new[p]["sha256"]))
        parts = [f"{len(names)} {kind} ({', '.join(names[:_SHOWN])}{', ...' if len(names) > _SHOWN else ''})"
                 for kind, names in (("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new))),
                                     ("changed", changed)) if names]
        if parts:
            out.append(f"files of config.{field}: " + ", ".join(parts))
    return out


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _files(folder: str, recursive: bool, known: dict) -> dict:
    """{relative path: {size, mtime_ns, sha256}} of the files in `folder` ({} when it does not exist)."""
    paths = []
    if recursive:
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(root, n) for n in names if not n.startswith(".")]
    elif os.path.isdir(folder):
        paths = [os.path.join(folder, n) for n in os.listdir(folder) if not n.startswith(".")]
    out = {}
    for path in sorted(p for p in paths if os.path.isfile(p)):
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        stat = os.stat(path)
        entry = known.get(rel)
        if entry and (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            out[rel] = entry
        else:
            out[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
    return out

