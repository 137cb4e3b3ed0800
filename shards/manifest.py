"""The manifest of a shard set: one parquet file, written last, whose presence means the set is complete.

`manifest.parquet` holds one row per sample (key, split, shard, the offset and size of each member,
metadata); its schema metadata holds the shards table (name, bytes, sample count, sha256, index file), the
summary and the config that made the set. Rejected inputs are in `rejects.parquet` next to it.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from common.files import atomic_open, join, sha256_file, url_to_fs
from shards.wds import parse_index

MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
FORMAT_VERSION = 1
_META_KEY = b"tubelet"

SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("split", pa.string()),
    ("shard", pa.string()),
    ("index", pa.int32()),  # position of the sample in its shard
    ("ext", pa.string()),  # the video member's extension (webm, mp4)
    ("video_offset", pa.int64()), ("video_size", pa.int64()),
    ("json_offset", pa.int64()), ("json_size", pa.int64()),
    ("nframes_offset", pa.int64()), ("nframes_size", pa.int64()),
    ("cls_offset", pa.int64()), ("cls_size", pa.int64()),  # -1 when unlabelled
    ("source", pa.string()), ("source_bytes", pa.int64()),
    ("duration", pa.float64()), ("fps", pa.float64()), ("nframes", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("codec", pa.string()),
    ("label", pa.string()), ("label_index", pa.int32()),
    ("rotation", pa.int32()), ("vfr", pa.bool_()),
])
REJECT_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("source", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])


class ManifestError(ValueError):
    """A shard set is incomplete or does not match its manifest; the message names what and where."""


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


def write_table_atomic(table: pa.Table, url: str, metadata: Optional[Dict[str, Any]] = None) -> None:
    """Write parquet so a reader never sees a partial file (`common.files.atomic_open`)."""
    if metadata is not None:
        table = table.replace_schema_metadata({_META_KEY: json.dumps(metadata, sort_keys=True).encode()})
    with atomic_open(url) as f:
        pq.write_table(table, f)


def write_manifest(root: str, rows: List[Dict[str, Any]], shards: List[Dict[str, Any]],
                   rejects: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
    write_table_atomic(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), join(root, REJECTS))
    meta = dict(meta, format_version=FORMAT_VERSION, shards=shards)
    write_table_atomic(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), join(root, MANIFEST), meta)


def read_manifest(root: str) -> Manifest:
    url = join(root, MANIFEST)
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise ManifestError(f"{root} has no {MANIFEST}: it is not a finished shard set "
                            "(run `make shards` to finish it, or point at the right folder)")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ManifestError(f"{url} was not written by tubelet (no '{_META_KEY.decode()}' metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{url} has format version {meta.get('format_version')}, this tubelet reads "
                            f"{FORMAT_VERSION}: re-run `make shards` into a new folder")
    shards = meta.pop("shards")
    return Manifest(root, table.replace_schema_metadata(None), shards, meta)


def read_rejects(root: str) -> pa.Table:
    fs, path = url_to_fs(join(root, REJECTS))
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def verify(manifest: Manifest, check_hashes: bool = False) -> None:
    """Refuse a shard set whose files do not match the manifest, naming the shard and what is wrong."""

    fs, root = url_to_fs(manifest.root)
    by_shard: Dict[str, int] = {}
    for name, n in zip(*_shard_counts(manifest.samples)):
        by_shard[name] = n
    for sh in manifest.shards:
        tar = posixpath.join(root, sh["name"])
        if not fs.exists(tar):
            raise ManifestError(f"shard {sh['name']} listed in {manifest.root}/{MANIFEST} is missing")
        size = fs.size(tar)
        if size != sh["bytes"]:
            raise ManifestError(f"shard {sh['name']} has {size} bytes, the manifest says {sh['bytes']}: "
                                "it was changed or truncated; rebuild it with `make shards`")
        idx = posixpath.join(root, sh["index"])
        if not fs.exists(idx):
            raise ManifestError(f"index {sh['index']} of shard {sh['name']} is missing")
        with fs.open(idx, "r") as f:
            try:
                members = parse_index(f.read())
            except ValueError as e:
                raise ManifestError(f"index {sh['index']} of shard {sh['name']} is malformed: {e}") from None
        if len(members) != sh["samples"] or by_shard.get(sh["name"], 0) != sh["samples"]:
            raise ManifestError(f"shard {sh['name']}: index lists {len(members)} samples, manifest "
                                f"{sh['samples']}")
        for m in (m for ms in members for m in ms):
            if m.offset + m.size > size:
                raise ManifestError(f"index {sh['index']}: member {m.name} ends at {m.offset + m.size}, "
                                    f"past the end of shard {sh['name']} ({size} bytes)")
        if check_hashes:
            with fs.open(tar, "rb") as f:
                digest = sha256_file(f)
            if digest != sh["sha256"]:
                raise ManifestError(f"shard {sh['name']}: sha256 {digest[:12]}... does not match the "
                                    f"manifest's {sh['sha256'][:12]}...")


def _shard_counts(samples: pa.Table):
    import pyarrow.compute as pc

    vc = pc.value_counts(samples["shard"])
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
