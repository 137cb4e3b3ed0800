"""Listing the input videos of a dataset split: a folder, a glob, or a list file, local or any fsspec URL.

The listing is deterministic (folders and globs are sorted; list files keep their order), and gives every
video a key that is unique and safe for tar member names and DALI's index (no spaces, dots or slashes).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from common.files import is_local, url_to_fs

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".flv",
    ".wmv", ".ogv", ".3gp", ".gif",
)
LIST_EXTENSIONS = (".csv", ".parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
KEY_STEM_CHARS = 48


class InputError(ValueError):
    """An input spec or list file is unusable; the message names it and says what to do."""


@dataclass(frozen=True)
class Source:
    url: str  # full URL or local path, as fsspec opens it
    rel: str  # path relative to the input root (what the key is made from)
    label: Optional[str]  # raw label text, or None


def make_key(rel: str) -> str:
    """A unique, safe sample key: a readable slug of the relative path plus a hash of the full path.

    >>> make_key("class a/clip 1.mp4")
    'class_a_clip_1-...'
    """
    stem = rel.rsplit(".", 1)[0] if "." in posixpath.basename(rel) else rel
    slug = _UNSAFE.sub("_", stem).strip("_")[-KEY_STEM_CHARS:] or "video"
    return f"{slug}-{hashlib.sha1(rel.encode()).hexdigest()[:12]}"


def _url(fs, path: str) -> str:
    """The URL fsspec opens `path` of `fs` with (a plain path for local files)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def split_chunks(spec: str, labels_from_dirs: bool, extensions: Sequence[str] = VIDEO_EXTENSIONS,
                 size: int = 1 << 16) -> Iterator[List[Source]]:
    """All inputs named by `spec` (folder, glob or list file), in a deterministic order, `size` at a time; a folder
    lists the files with one of `extensions` (videos by default). A Python object per input only for the chunk in
    hand (a list file of 22M rows is held as Arrow columns, a folder's listing as the path strings fsspec
    returns)."""
    fs, path = url_to_fs(spec)
    lower = path.lower()
    if lower.endswith(LIST_EXTENSIONS):
        if not fs.isfile(path):
            raise InputError(f"list file {spec} does not exist")
        yield from _read_list(fs, path, spec, size)
        return
    if _GLOB_CHARS.search(path):
        files = sorted(p for p in fs.glob(path) if fs.isfile(p))
        root = path[: _GLOB_CHARS.search(path).start()].rsplit("/", 1)[0]
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.lower().endswith(tuple(extensions)))
        root = path.rstrip("/")
    elif fs.isfile(path):
        files, root = [path], posixpath.dirname(path)
    else:
        raise InputError(f"input {spec} is neither a folder, a glob, a list file (.csv/.parquet) nor a file")
    for at in range(0, len(files), size):
        out = []
        for p in files[at:at + size]:
            rel = posixpath.relpath(p, root) if root else p
            label = posixpath.basename(posixpath.dirname(rel)) or None if labels_from_dirs else None
            out.append(Source(_url(fs, p), rel, label))
        yield out


def _read_list(fs, path: str, spec: str, size: int) -> Iterator[List[Source]]:
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        if path.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            table = pacsv.read_csv(
                io.BytesIO(data),
                convert_options=pacsv.ConvertOptions(column_types={"path": pa.string(), "label": pa.string()}),
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"list file {spec} could not be read: {e}") from None
    del data
    if "path" not in table.column_names:
        raise InputError(f"list file {spec} has no 'path' column (columns: {table.column_names}); "
                         "add a header line 'path,label' (label optional)")
    paths = table.column("path")
    labels = table.column("label").cast(pa.string()) if "label" in table.column_names else None
    base = posixpath.dirname(path)
    for at in range(0, len(paths), size):
        chunk = paths.slice(at, size).to_pylist()
        chunk_labels = labels.slice(at, size).to_pylist() if labels is not None else [None] * len(chunk)
        out = []
        for i, (p, lab) in enumerate(zip(chunk, chunk_labels), start=at):
            if not p:
                raise InputError(f"list file {spec}, row {i + 2}: empty path")
            p = str(p)
            if "://" in p:
                out.append(Source(p, p.split("://", 1)[1], lab))
            elif posixpath.isabs(p):
                out.append(Source(_url(fs, p), p.lstrip("/"), lab))
            else:
                out.append(Source(_url(fs, posixpath.normpath(posixpath.join(base, p))), p, lab))
        yield out


def label_map_of(names: Iterable[str]) -> Dict[str, int]:
    """Class name -> index over all splits' distinct label names: integer labels keep their value, names are
    numbered sorted."""
    names = sorted(names)
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}
