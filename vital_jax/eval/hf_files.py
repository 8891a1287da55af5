"""Benchmark splits downloaded from the Hugging Face Hub: local parquet shards and `save_to_disk` arrow shards.

Read with pyarrow alone. `datasets` is not needed and not used: its offline `load_dataset` on a local folder goes
through builder resolution, fsspec and huggingface_hub for what is here a scan of a few tables, and a
`save_to_disk` shard is an Arrow IPC stream that pyarrow opens directly. Nothing here touches the network.

The files of a split, first layout that matches (shards in name order):

    data/{split}-*.parquet           push_to_hub (flaviagiammarino/vqa-rad, flaviagiammarino/path-vqa, ...)
    {split}-*.parquet  data/{split}.parquet  {split}.parquet
    default/{split}/*.parquet  {split}/*.parquet     the Hub's parquet conversion (refs/convert/parquet)
    {split}/*.arrow                  DatasetDict.save_to_disk

"val" also finds "validation", "validate" and "valid" (and each of those the others). Column names are matched
after `column_key` (lower case, spaces and hyphens as underscores), so "Choice A", "choice a" and "choice_a" are
one column. Images stored in a table (the Hub's Image feature, a struct of bytes and path) are decoded once to
check them and written unchanged to a content-addressed cache, so that a `BenchmarkExample.image` stays a path.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
from typing import Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vital_jax.data import images
from vital_jax.eval.errors import BenchmarkError
from vital_jax.jsonio import atomic_write

LAYOUTS = ("data/{split}-*.parquet", "{split}-*.parquet", "data/{split}.parquet", "{split}.parquet",
           "default/{split}/*.parquet", "{split}/*.parquet", "{split}/*.arrow")
_VALIDATION = ("val", "validation", "validate", "valid")
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp"}


def split_names(split: str) -> tuple[str, ...]:
    """The names a split may have on the Hub, `split` first."""
    if split in _VALIDATION:
        return (split,) + tuple(s for s in _VALIDATION if s != split)
    return (split,)


def split_files(data_dir: str, split: str) -> list[str]:
    """The parquet or arrow files of `split` under data_dir (see the module docstring), [] when there are none."""
    for name in split_names(split):
        for layout in LAYOUTS:
            pattern = os.path.join(glob.escape(data_dir), layout.format(split=glob.escape(name)))
            paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if paths:
                return paths
    return []


def layouts_text(split: str) -> str:
    """The layouts searched for `split`, for error messages."""
    return ", ".join(layout.format(split=split) for layout in LAYOUTS)


def column_key(name: str) -> str:
    """"Choice A", "choice a", "choice_a" and "Choice-A" are all "choice_a"."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def column_error(path: str, names: Sequence[str], missing: Sequence[str]) -> BenchmarkError:
    return BenchmarkError(f"{path}: missing column(s) {'; '.join(missing)} -- the file has columns "
                          f"{', '.join(names) or '(none)'} (map others with columns={{name: column}})")


def resolve_columns(path: str, names: Sequence[str], required: Mapping[str, Sequence[str]],
                    optional: Mapping[str, Sequence[str]] = (),
                    overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """{canonical name: the file's column} for each canonical name whose aliases (or override) the file has.

    A required name the file lacks is a BenchmarkError naming the file, every missing name with the columns it
    accepts, and the columns the file has.
    """
    by_key: dict[str, str] = {}
    for name in names:
        by_key.setdefault(column_key(name), name)
    found, missing = {}, []
    for canonical, aliases in {**dict(optional), **dict(required)}.items():
        if overrides and canonical in overrides:
            aliases = (overrides[canonical],)
        column = next((by_key[column_key(a)] for a in aliases if column_key(a) in by_key), None)
        if column is not None:
            found[canonical] = column
        elif canonical in required:
            missing.append(f"{canonical} (one of: {', '.join(aliases)})")
    if missing:
        raise column_error(path, names, missing)
    return found


def read_table(path: str, batch_size: int = 256) -> tuple[list[str], Iterator[dict]]:
    """(column names, rows as dicts) of a parquet file or an Arrow IPC file (stream or file format); rows are
    read a batch at a time, so a split whose images do not fit in memory still loads."""
    try:
        if path.endswith(".parquet"):
            parquet = pq.ParquetFile(path)
            batches = parquet.iter_batches(batch_size=batch_size)
            names = parquet.schema_arrow.names
        else:
            source = pa.memory_map(path)
            try:
                reader = pa.ipc.open_stream(source)  # what save_to_disk writes
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
                if isinstance(reader, pa.ipc.RecordBatchFileReader) else iter(reader)
            names = reader.schema.names
    except (pa.ArrowException, OSError) as e:
        raise BenchmarkError(f"{path}: not a readable {'parquet' if path.endswith('.parquet') else 'arrow'} "
                             f"file ({e})") from e
    return list(names), _rows(path, batches)


def _rows(path: str, batches) -> Iterator[dict]:
    try:
        for batch in batches:
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise BenchmarkError(f"{path}: unreadable data ({e})") from e
    except UnicodeDecodeError as e:   # a string column holding bytes that are not UTF-8
        raise BenchmarkError(f"{path}: a text cell is not UTF-8 ({e})") from e


def split_image(label: str, value) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an image cell: the Hub's Image struct {bytes, path}, raw bytes, a path string, or a list
    holding one of those (a list of several images is an error)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise BenchmarkError(f"{label}: expected one image, the row has {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise BenchmarkError(f"{label}: the image struct's bytes are a {type(data).__name__}, not bytes")
        if path is not None and not isinstance(path, str):
            raise BenchmarkError(f"{label}: the image struct's path is a {type(path).__name__}, not a string")
        return (bytes(data) if data else None), (path or None)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    raise BenchmarkError(f"{label}: image cell must be an image struct, bytes or a path, got {type(value).__name__}")


def default_image_cache() -> str:
    """$VITAL_JAX_CACHE/benchmark_images, by default ~/.cache/vital_jax/benchmark_images."""
    root = os.environ.get("VITAL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vital_jax")
    return os.path.join(root, "benchmark_images")


class ImageCache:
    """Writes image bytes to `<cache_dir>/<sha256[:2]>/<sha256>.<ext>` (unchanged, so identical images are stored
    once and a second load writes nothing) and returns the path.

    With `verify`, each distinct image is fully decoded first: corrupt or truncated bytes are a BenchmarkError
    naming the row. Without it only the header is read (for the extension).
    """

    def __init__(self, cache_dir: str | None = None, verify: bool = True):
        self.cache_dir = cache_dir or default_image_cache()
        self.verify = verify
        self._paths: dict[str, str] = {}

    def store(self, label: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._paths:
            return self._paths[digest]
        try:
            with Image.open(io.BytesIO(data)) as image:
                kind = image.format or "bin"
                if self.verify:
                    image.load()
                size, mode = (image.height, image.width), image.mode
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise BenchmarkError(f"{label}: image bytes cannot be decoded ({type(e).__name__}: {e})") from e
        try:   # what the release route's loader checks too, named by row here rather than by cache file later
            images.check_mode(mode, "image")
            images.check_size(*size, "image")
        except images.ImageError as e:
            raise BenchmarkError(f"{label}: {e}") from e
        path = os.path.join(self.cache_dir, digest[:2], digest + _EXTENSIONS.get(kind, "." + kind.lower()))
        # A cached file is named by its bytes' digest; one of another size was cut short (a crash before this
        # write-then-rename existed, a full disk) and is written again rather than trusted.
        if not os.path.isfile(path) or os.path.getsize(path) != len(data):
            # Write then rename, so that a concurrent or interrupted load never leaves half an image at `path`.
            atomic_write(path, lambda f: f.write(data), binary=True)
        self._paths[digest] = path
        return path
