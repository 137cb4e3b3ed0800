"""Writing one group: its results in input order -> shard tar(s), their DALI index files, and the group record."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import zlib
from typing import Dict

from common.files import sha256_file
from shards.config import ShardsConfig
from shards.output import Output
from shards.plan import Group, fingerprint
from shards.transcode import Reject, Sample, meta_json, nframes_bytes
from shards.wds import IndexedTarWriter, Member, format_index


class GroupWriter:
    """Collects a group's results in input order and writes its shard(s), index(es) and record."""

    def __init__(self, group: Group, out: Output, cfg: ShardsConfig, tmpdir: str):
        self.group, self.out, self.cfg, self.tmpdir = group, out, cfg, tmpdir
        self.results: Dict[int, Sample | Reject] = {}

    def add(self, pos: int, result: Sample | Reject) -> bool:
        """Record the result of input `pos`; True when the group is complete (call `finish`)."""
        self.results[pos] = result
        return len(self.results) == len(self.group.sources)

    def finish(self) -> dict:
        g, cfg = self.group, self.cfg
        shards, rows, rejects = [], [], []
        writer, tmp, f = None, None, None
        part = 0

        def close_shard() -> None:
            nonlocal writer, part
            writer.close()
            f.close()
            name = g.name + (f"-{part}" if part else "")
            digest, size = sha256_file(tmp), os.path.getsize(tmp)
            self.out.write(f"{name}.idx", format_index(writer.samples).encode(), self.tmpdir)
            self.out.put(f"{name}.tar", tmp)
            shards.append({"name": f"{name}.tar", "index": f"{name}.idx", "split": g.split, "bytes": size,
                           "samples": len(writer.samples), "sha256": digest})
            for row in rows[-len(writer.samples):]:
                row["shard"] = f"{name}.tar"
            writer, part = None, part + 1

        for pos in range(len(g.sources)):
            r = self.results[pos]
            if isinstance(r, Reject):
                rejects.append({"key": r.key, "split": g.split, "source": r.source, "reason": r.reason,
                                "detail": r.detail})
                continue
            comps = [(r.ext, r.video), ("json", meta_json(r.meta)), ("nframes", nframes_bytes(r.meta["nframes"]))]
            if r.meta["label_index"] is not None:
                comps.append(("cls", str(r.meta["label_index"]).encode()))
            need = sum(512 + -(-len(d) // 512) * 512 for _, d in comps)
            if writer is not None and writer.samples and \
                    closed_size(writer.bytes_written + need) > cfg.shard.max_bytes:
                close_shard()
            if writer is None:
                fd, tmp = tempfile.mkstemp(dir=self.tmpdir, suffix=".tar")
                f = os.fdopen(fd, "wb")
                writer = IndexedTarWriter(f)
            members = {m.ext: m for m in writer.write(r.key, comps)}
            rows.append(_row(g.split, len(writer.samples) - 1, r, members))
        if writer is not None:
            close_shard()
        record = {"group": g.name, "split": g.split, "fingerprint": fingerprint(cfg, g), "shards": shards,
                  "samples": rows, "rejects": rejects,
                  "source_seconds": sum(r.meta["source_duration"] for r in self.results.values()
                                        if isinstance(r, Sample)),
                  "cpu_seconds": sum(r.seconds for r in self.results.values())}
        # the record is the commit point of the group: written last, atomically
        self.out.write(g.record, json.dumps(record).encode(), self.tmpdir)
        return record


def closed_size(offset: int) -> int:
    """The size of a tar closed at `offset`: tarfile adds two zero blocks, then pads to a whole record."""
    return -(-(offset + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _row(split: str, index: int, r: Sample, m: Dict[str, Member]) -> dict:
    """The manifest row of sample `r` (shard name filled in when its shard is closed)."""
    meta = r.meta
    cls = m.get("cls")
    return {
        "key": r.key, "split": split, "shard": None, "index": index, "ext": r.ext,
        "video_offset": m[r.ext].offset, "video_size": m[r.ext].size, "video_crc32": zlib.crc32(r.video),
        "json_offset": m["json"].offset, "json_size": m["json"].size,
        "nframes_offset": m["nframes"].offset, "nframes_size": m["nframes"].size,
        "cls_offset": cls.offset if cls else -1, "cls_size": cls.size if cls else -1,
        "source": meta["source"], "source_bytes": meta["source_bytes"], "duration": meta["duration"],
        "fps": meta["fps"], "nframes": meta["nframes"], "width": meta["width"], "height": meta["height"],
        "codec": meta["codec"], "label": meta["label"], "label_index": meta["label_index"],
        "rotation": meta["rotation"], "vfr": meta["vfr"],
    }
