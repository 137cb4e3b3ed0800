"""Rewrite a shard set of format 2 (every sample in `manifest.parquet`) in place into format 3 (`shards/manifest.py`):
`python -m shards.upgrade root=DIR` (or tubelet-upgrade). The shards, index files and rejects are kept as they are.

Atomic: `samples.arrow` is written first (a new file, nothing reads it yet), then `manifest.parquet` is replaced
by the one-row-per-shard manifest in one rename (an object store's put), so until the end the old manifest is
there, and a reader sees either the old set or the new one. A killed upgrade is run again. An offline, one-off
job: it holds the old manifest in memory once (the merge of a new set streams).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.cli import main_for
from common.config import check
from common.files import join, url_to_fs
from shards.manifest import _META_KEY, FORMAT_VERSION, MANIFEST, SAMPLE_SCHEMA, ManifestError, ManifestWriter, \
    read_rejects, safe_name


@dataclass
class UpgradeConfig:
    root: str = "data/shards/sample"  # shard set folder or URL (its manifest.parquet of format 2)

    def validate(self) -> None:
        check(bool(self.root), "root", "must name a shard set folder or URL")


def upgrade(root: str) -> int:
    """Rewrite the format-2 set at `root` into format 3; returns its number of samples. A set already in format 3
    is left as it is (0)."""
    url = join(root, MANIFEST)
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise ManifestError(f"{root} has no {MANIFEST}: nothing to upgrade")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ManifestError(f"{url} was not written by tubelet (no '{_META_KEY.decode()}' metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") == FORMAT_VERSION:
        return 0
    if meta.get("format_version") != 2:
        raise ManifestError(f"{url} has format version {meta.get('format_version')}: only format 2 is upgraded in "
                            "place; re-run `make shards` into a new folder")
    shards = meta.pop("shards")
    for sh in shards:
        safe_name(sh.get("name"), url)
        safe_name(sh.get("index"), url)
    table = table.replace_schema_metadata(None).select(SAMPLE_SCHEMA.names)
    # rows shard after shard, in the shards table's order, each shard's by its index in the shard
    position = pc.index_in(table["shard"], value_set=pa.array([sh["name"] for sh in shards]))
    if position.null_count:
        raise ManifestError(f"{url} has rows of shards its shards table does not list: rebuild it with `make shards`")
    table = table.take(pc.sort_indices(pa.table({"p": position, "i": table["index"]}),
                                       sort_keys=[("p", "ascending"), ("i", "ascending")]))
    counts = dict(zip(*[c.to_pylist() for c in pc.value_counts(table["shard"]).flatten()]))
    for sh in shards:
        if counts.get(sh["name"], 0) != sh["samples"]:
            raise ManifestError(f"{url}: shard {sh['name']} has {counts.get(sh['name'], 0)} rows, its record says "
                                f"{sh['samples']}: rebuild the set with `make shards`")
    writer = ManifestWriter(root)
    try:
        at = 0
        for sh in shards:
            writer.add([sh], table.slice(at, sh["samples"]))
            at += sh["samples"]
    except BaseException:
        writer.abort()
        raise
    rejects = read_rejects(root).to_pylist()
    writer.close(rejects, {k: v for k, v in meta.items() if k != "format_version"})
    return writer.num_rows


def run(cfg: UpgradeConfig) -> None:
    n = upgrade(cfg.root)
    print(f"{cfg.root}: upgraded to format {FORMAT_VERSION} ({n} samples)" if n else
          f"{cfg.root}: already in format {FORMAT_VERSION}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(UpgradeConfig, run, argv, prog="tubelet-upgrade", doc=__doc__, errors={ManifestError: 2})


if __name__ == "__main__":
    sys.exit(main())
