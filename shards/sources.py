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
from typing import Dict, List, Optional, Sequence

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


def list_split(spec: str, labels_from_dirs: bool = False, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> List[Source]:
    """All inputs named by `spec` (folder, glob or list file), in a deterministic order; a folder lists the files
    with one of `extensions` (videos by default)."""
    fs, path = url_to_fs(spec)
    lower = path.lower()
    if lower.endswith(LIST_EXTENSIONS):
        if not fs.isfile(path):
            raise InputError(f"list file {spec} does not exist")
        return _read_list(fs, path, spec)
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
    out = []
    for p in files:
        rel = posixpath.relpath(p, root) if root else p
        label = posixpath.basename(posixpath.dirname(rel)) or None if labels_from_dirs else None
        out.append(Source(_url(fs, p), rel, label))
    return out


def _read_list(fs, path: str, spec: str) -> List[Source]:
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
    if "path" not in table.column_names:
        raise InputError(f"list file {spec} has no 'path' column (columns: {table.column_names}); "
                         "add a header line 'path,label' (label optional)")
    paths = table.column("path").to_pylist()
    labels = table.column("label").cast(pa.string()).to_pylist() if "label" in table.column_names else [None] * len(paths)
    base = posixpath.dirname(path)
    out = []
    for i, (p, lab) in enumerate(zip(paths, labels)):
        if not p:
            raise InputError(f"list file {spec}, row {i + 2}: empty path")
        p = str(p)
        if "://" in p:
            out.append(Source(p, p.split("://", 1)[1], lab))
        elif posixpath.isabs(p):
            out.append(Source(_url(fs, p), p.lstrip("/"), lab))
        else:
            out.append(Source(_url(fs, posixpath.normpath(posixpath.join(base, p))), p, lab))
    return out


def label_map(splits: Dict[str, Sequence[Source]]) -> Dict[str, int]:
    """Class name -> index over all splits: integer labels keep their value, names are numbered sorted."""
    names = sorted({s.label for srcs in splits.values() for s in srcs if s.label is not None})
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


def check_unique_keys(split: str, sources: Sequence[Source]) -> List[str]:
    keys = [make_key(s.rel) for s in sources]
    if len(set(keys)) != len(keys):
        seen: Dict[str, str] = {}
        for k, s in zip(keys, sources):
            if k in seen:
                raise InputError(f"split {split}: {s.url} appears twice in the input (as {seen[k]} too); "
                                 "remove the duplicate row")
            seen[k] = s.url
    return keys
