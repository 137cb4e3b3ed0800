"""The shard-set format both stages use: an index of shards that every rank reads, and per-sample rows read by shard.

A set's files besides its shards (`<name>.tar`) and DALI index files (`<name>.idx`):
- `samples.arrow`: one row per sample (key, split, shard, the offset, size and CRC-32 of each member, metadata),
  an Arrow IPC file (uncompressed: read zero-copy) holding one record batch per shard, in the order of `manifest.parquet`.
- `manifest.parquet`, written last (its presence means the set is complete): one row per shard (name, index file,
  split, bytes, sample count, sha256, its first row and its record batch in `samples.arrow`); its schema metadata
  holds the summary, the classes, the kind and the config that made the set.
- `rejects.parquet`: the rejected inputs with their reasons.

Why (format 3; format 2 held every sample in `manifest.parquet`): at 22M samples every rank read 2 GB and kept
GiBs of it before its first batch. A rank now reads O(shards) at start: `manifest.parquet` (22M samples in
1,000-sample shards: 22,000 rows, about a MB) and the footer of `samples.arrow` (24 bytes a shard), then each
shard's rows only when it reads that shard (one record batch: one ranged read, memory-mapped when local,
`pipeline/split_index.py`); a column needed for every sample at once (labels) is read by itself. Arrow IPC, not
parquet, for the rows: a parquet row group per shard costs a footer of about 2 kB per shard (26 column chunks),
one row group of many shards a read of all of them for one. The merge writes `samples.arrow` group by group
(`ManifestWriter`: memory O(group)). `tubelet-upgrade` rewrites a format-2 set in place (`shards/upgrade.py`);
opening one fails with that command.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from common.files import atomic_open, is_local, join, publish, sha256_file, temp_path, url_to_fs
from shards.wds import parse_index

MANIFEST = "manifest.parquet"  # the shards of the set, written last
SAMPLES = "samples.arrow"  # the samples: an Arrow IPC file, one record batch per shard
REJECTS = "rejects.parquet"
FORMAT_VERSION = 3  # 2: per-sample video_crc32; 3: the shards in manifest.parquet, the samples in samples.arrow
ROWS_VERSION = 2  # the format of a group record's rows (in its fingerprint): unchanged by format 3
_META_KEY = b"tubelet"

SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("split", pa.string()),
    ("shard", pa.string()),
    ("index", pa.int32()),  # position of the sample in its shard
    ("ext", pa.string()),  # the video member's extension (webm, mp4)
    ("video_offset", pa.int64()), ("video_size", pa.int64()),
    ("video_crc32", pa.int64()),  # zlib.crc32 of the video member's bytes: checked on every read
    ("json_offset", pa.int64()), ("json_size", pa.int64()),
    ("nframes_offset", pa.int64()), ("nframes_size", pa.int64()),
    ("cls_offset", pa.int64()), ("cls_size", pa.int64()),  # -1 when unlabelled
    ("source", pa.string()), ("source_bytes", pa.int64()),
    ("duration", pa.float64()), ("fps", pa.float64()), ("nframes", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("codec", pa.string()),
    ("label", pa.string()), ("label_index", pa.int32()),
    ("rotation", pa.int32()), ("vfr", pa.bool_()),
])
SHARD_SCHEMA = pa.schema([
    ("name", pa.string()), ("index", pa.string()), ("split", pa.string()),
    ("bytes", pa.int64()), ("samples", pa.int64()), ("sha256", pa.string()),
    ("row", pa.int64()),  # its first row in samples.arrow
    ("batch", pa.int32()),  # its record batch in samples.arrow
])
REJECT_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("source", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])


class ManifestError(ValueError):
    """A shard set is incomplete or does not match its manifest; the message names what and where."""


class CorruptSample(ManifestError):
    """A sample's bytes do not match the checksum the manifest recorded for them."""

    def __init__(self, root: str, shard: str, key: str):
        super().__init__(f"sample {key} in shard {shard} of {root} is corrupt (its bytes do not match the "
                         "manifest's CRC-32); rebuild the set with `make shards` (it finds and rewrites damaged "
                         "shards)")
        self.root, self.shard, self.key = root, shard, key


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def safe_name(name: Any, where: str) -> str:
    """`name` if it is a plain file name inside a shard set (no folders, no `..`), else a ManifestError: names in
    a manifest are data, and must never make a reader or a cache touch a file outside the set."""
    if not (isinstance(name, str) and _SAFE_NAME.fullmatch(name) and ".." not in name):
        raise ManifestError(f"{where} names {name!r}: shard and index names must be plain file names inside the "
                            "set; this manifest was not written by tubelet, or was tampered with")
    return name


@dataclass
class Manifest:
    root: str
    samples: pa.Table
    shards: List[Dict[str, Any]]  # name, split, bytes, samples, sha256, index
    meta: Dict[str, Any]

    def split(self, name: str) -> pa.Table:
        import pyarrow.compute as pc

        t = self.samples.filter(pc.equal(self.samples["split"], name))
        if t.num_rows == 0:
            have = sorted(set(self.samples["split"].to_pylist()))
            raise ManifestError(f"{self.root}: no samples in split {name!r} (splits: {have})")
        return t

    @property
    def classes(self) -> List[str]:
        return list(self.meta.get("classes", []))

    @property
    def kind(self) -> str:
        """video or image (sets made before images are video)."""
        return str(self.meta.get("kind", "video"))

    @property
    def transcode(self) -> Dict[str, Any]:
        """The transcode settings the set was made with (frame_step, keyframe_interval, align, codec ...)."""
        return dict(self.meta.get("config", {}).get("transcode", {}))


def write_table_atomic(table: pa.Table, url: str, metadata: Optional[Dict[str, Any]] = None) -> None:
    """Write parquet so a reader never sees a partial file (`common.files.atomic_open`)."""
    if metadata is not None:
        table = table.replace_schema_metadata({_META_KEY: json.dumps(metadata, sort_keys=True).encode()})
    with atomic_open(url) as f:
        pq.write_table(table, f)


class ManifestWriter:
    """Writes a set's `samples.arrow` group by group, then its `manifest.parquet` (`close`): memory O(group +
    shards), whatever the number of samples. `add(shards, rows)` takes one group's shards (in order) and its rows
    (each shard's contiguous, in that order). Nothing is published unless `close` is reached: an exception
    (`abort`) leaves the folder as it was, a manifest of an earlier run included."""

    def __init__(self, root: str):
        self.root = root
        self._tmp = temp_path(join(root, SAMPLES))  # local (beside a local set): published by `close`
        # uncompressed: a shard's rows are then read zero-copy (0.1 ms a shard, memory-mapped; zstd: 2 ms, which a
        # global order pays for most rows of a step), at about 250 bytes a sample (5 GB for 22M samples, next to
        # ~9 TB of shards; a rank reads a shard's 250 kB with its 200 MB)
        self._writer = pa.ipc.new_file(self._tmp, SAMPLE_SCHEMA)
        self._open = True
        self._rows = 0
        self.shards: List[Dict[str, Any]] = []

    def add(self, shards: Sequence[Dict[str, Any]], rows: Any) -> None:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
        table = table.select(SAMPLE_SCHEMA.names).cast(SAMPLE_SCHEMA)
        if sum(int(sh["samples"]) for sh in shards) != table.num_rows:
            raise ManifestError(f"{self.root}: shards {[sh['name'] for sh in shards][:3]} count "
                                f"{sum(int(sh['samples']) for sh in shards)} samples, their rows {table.num_rows}")
        at = 0
        for sh in shards:
            n = int(sh["samples"])
            part = table.slice(at, n)
            if n and part.column("shard")[0].as_py() != sh["name"]:
                raise ManifestError(f"{self.root}: the rows of shard {sh['name']} are not where its record says")
            self._writer.write_batch(part.combine_chunks().to_batches(max_chunksize=max(1, n))[0] if n else
                                     pa.RecordBatch.from_pylist([], schema=SAMPLE_SCHEMA))
            self.shards.append({**{k: sh[k] for k in ("name", "index", "split", "bytes", "samples", "sha256")},
                                "row": self._rows, "batch": len(self.shards)})
            self._rows += n
            at += n

    @property
    def num_rows(self) -> int:
        return self._rows

    def close(self, rejects: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
        """Publish samples.arrow and rejects.parquet, then manifest.parquet (the set's commit point). Safe to call
        again after a storage error (a retry): each file is published whole or not at all."""
        if self._open:
            self._writer.close()
            self._open = False
        if os.path.exists(self._tmp):
            publish(self._tmp, join(self.root, SAMPLES))
        write_table_atomic(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), join(self.root, REJECTS))
        meta = dict(meta, format_version=FORMAT_VERSION, rows=self._rows)
        write_table_atomic(pa.Table.from_pylist(self.shards, schema=SHARD_SCHEMA), join(self.root, MANIFEST), meta)

    def abort(self) -> None:
        """Publish nothing; the temp file of samples.arrow is removed."""
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


def write_manifest(root: str, rows: List[Dict[str, Any]], shards: List[Dict[str, Any]],
                   rejects: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
    """The whole set at once (tests, small sets); `ManifestWriter` streams."""
    w = ManifestWriter(root)
    try:
        w.add(shards, rows)
    except BaseException:
        w.abort()
        raise
    w.close(rejects, meta)


@dataclass
class SetIndex:
    """What every rank reads at start: the shards table (O(shards)) and the set's metadata."""

    root: str
    shards: pa.Table  # SHARD_SCHEMA
    meta: Dict[str, Any]


def read_set_index(root: str, local_copy: Optional[str] = None) -> SetIndex:
    """The set's `manifest.parquet` (names checked; columns as pyarrow arrays, no Python object per shard);
    `local_copy`: a node-local copy of it to read instead (`pipeline.cache.node_copy`). A set of an earlier format
    fails with the one command that upgrades it (its schema is read first: a format-2 manifest is not read whole)."""
    url = join(root, MANIFEST)
    if local_copy is not None:
        with open(local_copy, "rb") as f:
            meta = _meta_of(pq.read_schema(f), url)
            f.seek(0)
            table = pq.read_table(f)
    else:
        fs, path = url_to_fs(url)
        if not fs.exists(path):
            raise ManifestError(f"{root} has no {MANIFEST}: it is not a finished shard set "
                                "(run `make shards` to finish it, or point at the right folder)")
        with fs.open(path, "rb") as f:
            meta = _meta_of(pq.read_schema(f), url)
            f.seek(0)
            table = pq.read_table(f)
    table = table.replace_schema_metadata(None)
    for col in ("name", "index"):
        for name in table.column(col).to_pylist():
            safe_name(name, url)
    return SetIndex(root, table, meta)


def _meta_of(schema: pa.Schema, url: str) -> Dict[str, Any]:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ManifestError(f"{url} was not written by tubelet (no '{_META_KEY.decode()}' metadata)")
    meta = json.loads(raw)
    version = meta.get("format_version")
    if version == 2:
        root = posixpath.dirname(url.rstrip("/"))
        raise ManifestError(f"{url} is in format 2 (every sample in the manifest), this tubelet reads {FORMAT_VERSION}:"
                            f" upgrade the set in place with `tubelet-upgrade root={root}`")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{url} has format version {version}, this tubelet reads "
                            f"{FORMAT_VERSION}: re-run `make shards` into a new folder")
    return meta


def read_manifest(root: str) -> Manifest:
    """The whole set, every sample included: for tools, verification and tests, never a rank's start."""
    index = read_set_index(root)
    url = join(root, SAMPLES)
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise ManifestError(f"{root} has a {MANIFEST} but no {SAMPLES}: the set is damaged; rebuild it with "
                            "`make shards`")
    with fs.open(path, "rb") as f:
        table = pa.ipc.open_file(f).read_all()
    for name in table.column("shard").unique().to_pylist():
        safe_name(name, url)
    meta = dict(index.meta)
    meta.pop("rows", None)
    return Manifest(root, table.replace_schema_metadata(None), index.shards.to_pylist(), meta)


def read_rejects(root: str) -> pa.Table:
    fs, path = url_to_fs(join(root, REJECTS))
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def verify(root: str, check_hashes: bool = False) -> SetIndex:
    """Refuse a shard set whose files do not match its manifest: one ManifestError listing every bad shard (its
    tar, its index file, and its rows in samples.arrow). Streamed: the shards table, then each shard's record
    batch's row count and shard name (only that column is read), never every sample's row at once."""
    index = read_set_index(root)
    shards = index.shards.to_pylist()  # O(shards)
    problems = _check_rows(root, shards)
    fs, path = url_to_fs(root)
    if is_local(fs) or check_hashes:
        problems += check_shards(fs, path, shards, check_hashes)
    else:  # an object store: one listing (a request per 1,000 files), not four requests per shard and rank
        problems += _check_listing(fs, path, shards)
    if problems:
        raise ManifestError(f"{len(problems)} of {len(shards)} shards of {root} do not match its "
                            f"{MANIFEST}; rebuild them with `make shards` (it finds and rewrites damaged "
                            "shards):\n" + "\n".join(f"  shard {name}: {what}" for name, what in problems))
    return index


def _check_rows(root: str, shards: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(shard, what is wrong) for each shard whose record batch in samples.arrow does not hold its samples."""
    url = join(root, SAMPLES)
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise ManifestError(f"{root} has a {MANIFEST} but no {SAMPLES}: the set is damaged; rebuild it with "
                            "`make shards`")
    # read, not memory-mapped: every batch's shard column is read once, and mapped pages would stay resident
    source = pa.OSFile(path) if is_local(fs) else fs.open(path, "rb")
    try:
        names = pa.ipc.open_file(source).schema.names
        reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=[names.index("shard")]))
        problems = []
        if reader.num_record_batches != len(shards):
            problems.append((SAMPLES, f"holds {reader.num_record_batches} record batches for {len(shards)} shards"))
        for sh in shards:
            if not 0 <= sh["batch"] < reader.num_record_batches:
                problems.append((sh["name"], f"its rows (record batch {sh['batch']}) are not in {SAMPLES}"))
                continue
            b = reader.get_batch(sh["batch"])
            if b.num_rows != sh["samples"] or (b.num_rows and b.column(0)[0].as_py() != sh["name"]):
                problems.append((sh["name"], f"record batch {sh['batch']} of {SAMPLES} holds {b.num_rows} rows"
                                 f"{' of ' + repr(b.column(0)[0].as_py()) if b.num_rows else ''}, not its "
                                 f"{sh['samples']} samples"))
        return problems
    finally:
        source.close()


def _check_listing(fs, root: str, shards: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """check_shards' names and sizes from one listing of a remote set (index files: present)."""
    sizes = {posixpath.relpath(path, root): info.get("size") for path, info in
             fs.find(root, detail=True).items()}
    problems = []
    for sh in shards:
        size = sizes.get(sh["name"])
        if size is None:
            problems.append((sh["name"], "missing"))
        elif size != sh["bytes"]:
            problems.append((sh["name"], f"{size} bytes, the manifest says {sh['bytes']} (changed or truncated)"))
        elif sh["index"] not in sizes:
            problems.append((sh["name"], f"its index {sh['index']} is missing"))
    return problems


def check_shards(fs, root: str, shards: Sequence[Dict[str, Any]], check_hashes: bool) -> List[Tuple[str, str]]:
    """(shard name, what is wrong) for every shard (tar + index) that does not match its record (name, bytes,
    samples, sha256, index); [] when all do. Hashes are computed on a few threads (hashlib releases the GIL)."""
    def one(sh: Dict[str, Any]) -> Optional[str]:
        tar, idx = posixpath.join(root, sh["name"]), posixpath.join(root, sh["index"])
        if not fs.exists(tar):
            return "missing"
        size = fs.size(tar)
        if size != sh["bytes"]:
            return f"{size} bytes, the manifest says {sh['bytes']} (changed or truncated)"
        if not fs.exists(idx):
            return f"its index {sh['index']} is missing"
        with fs.open(idx, "r") as f:
            try:
                members = parse_index(f.read())
            except ValueError as e:
                return f"its index {sh['index']} is malformed: {e}"
        if len(members) != sh["samples"]:
            return f"its index lists {len(members)} samples, the manifest {sh['samples']}"
        end = max((m.offset + m.size for ms in members for m in ms), default=0)
        if end > size:
            return f"its index {sh['index']} points past the end of the shard ({size} bytes)"
        if check_hashes:
            with fs.open(tar, "rb") as f:
                digest = sha256_file(f)
            if digest != sh["sha256"]:
                return f"sha256 {digest[:12]}... is not the manifest's {sh['sha256'][:12]}..."
        return None

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return [(sh["name"], p) for sh, p in zip(shards, pool.map(one, shards)) if p is not None]
