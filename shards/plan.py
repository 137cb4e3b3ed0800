"""Planning a `make shards` run: every split's inputs, in listing order, cut into groups of `shard.max_samples`.

Group g of split s becomes shard `s-{g:06d}.tar` (spilling into `s-{g:06d}-{p}.tar` past `shard.max_bytes`) and
is finished when its record `_parts/s-{g:06d}.json` exists. The plan is deterministic and identical in every
partition; a group's fingerprint says what its output depends on, so a rerun with other inputs or settings is
refused instead of mixing two datasets in one folder.

The inputs are listed once per output folder and read by range (`_parts/inputs/listing.arrow`): at 22M inputs, every
partition job listing every input (a bucket listing of 22M objects or a 2 GB list file, and a Python object per
input) would cost each job minutes and GiBs. The listing holds one record batch per group (split, url, rel,
label, key); `listing.json`, written after it (its presence means the listing is complete), says what it
was made from, which batches each split's groups are and the class map. A partition job reads its own groups'
batches only; the merge streams them, a window at a time. It is made by the first run that finds none, or by
`make shards list_only=true` before N partition jobs start (else each of them lists the inputs once itself).

A listing is a snapshot: a rerun uses it while the inputs, kind, labels_from_dirs and max_samples are the ones it
was made from, and lists again when they are not. Files added to an input folder later are not seen: delete
`_parts/inputs/` to list again (finished groups whose inputs moved are then refused by their fingerprints).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from common.config import to_dict
from common.files import publish, temp_path
from shards.config import ShardsConfig
from shards.manifest import ROWS_VERSION
from shards.images import IMAGE_EXTENSIONS
from shards.sources import VIDEO_EXTENSIONS, InputError, Source, label_map_of, make_key, split_chunks

if TYPE_CHECKING:
    from shards.output import Output

log = logging.getLogger(__name__)

PARTS = "_parts"  # the folder of group records in a shard set
LISTING = f"{PARTS}/inputs/listing.arrow"  # the inputs, one record batch per group
LISTING_META = f"{PARTS}/inputs/listing.json"  # written last: what the listing was made from, its groups, the classes
LISTING_VERSION = 1
_LISTING_SCHEMA = pa.schema([("split", pa.string()), ("url", pa.string()), ("rel", pa.string()),
                             ("label", pa.string()), ("key", pa.string())])


@dataclass
class Group:
    split: str
    index: int
    sources: List[Source]
    keys: List[str]
    label_index: List[Optional[int]]  # class index of each source (numbered over all splits)

    @property
    def name(self) -> str:
        return group_name(self.split, self.index)

    @property
    def record(self) -> str:
        """The group's record, relative to the shard set: written last, its presence means the group is done."""
        return f"{PARTS}/{self.name}.json"


def group_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


class Plan:
    """The groups of a run, from its listing: every group's split and index (O(groups)); a group's inputs are
    read when it is asked for (`group`, `groups`)."""

    def __init__(self, out: "Output", meta: Dict[str, Any]):
        self.out, self.meta = out, meta
        self.labels: Dict[str, int] = dict(meta["labels"])
        # batch b of the listing is group slots[b] = (split, index in the split)
        self.slots: List[Tuple[str, int]] = [(split, g) for split, s in sorted(meta["splits"].items())
                                             for g in range(s["groups"])]
        self.num_inputs = sum(s["inputs"] for s in meta["splits"].values())
        self._reader: Optional[pa.ipc.RecordBatchFileReader] = None

    def __len__(self) -> int:
        return len(self.slots)

    def name(self, b: int) -> str:
        return group_name(*self.slots[b])

    def group(self, b: int) -> Group:
        """Group `b` (in listing order), its inputs read from the listing (one record batch)."""
        if self._reader is None:
            url = self.out.url_of(LISTING)
            # read, not memory-mapped: the merge reads every group once, and mapped pages would stay resident
            source = pa.OSFile(url) if self.out.local else self.out.fs.open(url, "rb", block_size=1 << 16)
            self._reader = pa.ipc.open_file(source)
            if self._reader.num_record_batches != len(self.slots):
                raise InputError(f"{url} holds {self._reader.num_record_batches} groups, "
                                 f"{self.out.url_of(LISTING_META)} says {len(self.slots)}: the listing is damaged; "
                                 f"delete {PARTS}/inputs/ to list the inputs again")
        batch = self.out.retry.call(lambda: self._reader.get_batch(b), f"reading {self.out.url_of(LISTING)}")
        split, index = self.slots[b]
        cols = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
        if batch.num_rows == 0 or cols["split"][0] != split:
            raise InputError(f"group {b} of {self.out.url_of(LISTING)} is not {group_name(split, index)}: the listing"
                             f" is damaged; delete {PARTS}/inputs/ to list the inputs again")
        sources = [Source(u, r, lab) for u, r, lab in zip(cols["url"], cols["rel"], cols["label"])]
        return Group(split, index, sources, cols["key"],
                     [self.labels[lab] if lab is not None else None for lab in cols["label"]])

    def groups(self, batches: Optional[Iterable[int]] = None) -> Iterator[Group]:
        for b in range(len(self.slots)) if batches is None else batches:
            yield self.group(b)


def plan(cfg: ShardsConfig, out: "Output") -> Plan:
    """The run's plan from the listing in `out` (made now when there is none, or it was made from other inputs
    or settings); deterministic, identical in every partition."""
    spec = _spec(cfg)
    if out.exists(LISTING_META):
        meta = out.read_json(LISTING_META)
        if meta.get("spec") == spec and out.exists(LISTING):
            return Plan(out, meta)
        log.info("the inputs were listed for other settings (%s); listing them again", out.url_of(LISTING_META))
    elif cfg.partition.count > 1:
        log.warning(f"partition {cfg.partition.index}/{cfg.partition.count} lists every input itself: run the same "
                    "command with list_only=true once before starting the partition jobs, and each reads only its "
                    "own groups from that listing")
    return Plan(out, write_listing(cfg, out, spec))


def _spec(cfg: ShardsConfig) -> Dict[str, Any]:
    return {"inputs": dict(sorted(cfg.inputs.items())), "labels_from_dirs": cfg.labels_from_dirs, "kind": cfg.kind,
            "max_samples": cfg.shard.max_samples, "version": LISTING_VERSION}


def write_listing(cfg: ShardsConfig, out: "Output", spec: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """List every split's inputs into `out`'s listing, a group at a time (a Python object per input only for
    the group in hand); keys are checked unique per split through 64-bit hashes (8 bytes an input). Returns the
    listing's metadata (what `listing.json` holds)."""
    extensions = IMAGE_EXTENSIONS if cfg.kind == "image" else VIDEO_EXTENSIONS
    n = cfg.shard.max_samples
    out.fs.makedirs(posixpath.dirname(out.url_of(LISTING)), exist_ok=True)
    tmp = temp_path(out.url_of(LISTING))
    splits: Dict[str, Dict[str, int]] = {}
    labels: set = set()
    try:
        with pa.ipc.new_file(tmp, _LISTING_SCHEMA) as writer:
            for split, spec_s in sorted(cfg.inputs.items()):
                hashes, count = [], 0
                for chunk in split_chunks(spec_s, cfg.labels_from_dirs, extensions, n):
                    keys = [make_key(s.rel) for s in chunk]
                    hashes.append(np.fromiter(map(_key_hash, keys), np.uint64, len(keys)))
                    labels.update(s.label for s in chunk if s.label is not None)
                    writer.write_batch(pa.record_batch([[split] * len(chunk), [s.url for s in chunk],
                                                        [s.rel for s in chunk], [s.label for s in chunk], keys],
                                                       schema=_LISTING_SCHEMA))
                    count += len(chunk)
                if not count:
                    raise InputError(f"inputs.{split}={spec_s} names no {'image' if cfg.kind == 'image' else 'video'}"
                                     " files")
                _check_unique(split, spec_s, cfg, extensions, np.concatenate(hashes))
                splits[split] = {"inputs": count, "groups": -(-count // n)}
        meta = {"spec": spec or _spec(cfg), "splits": splits, "labels": label_map_of(labels)}
        out.retry.call(lambda: publish(tmp, out.url_of(LISTING)), f"writing {out.url_of(LISTING)}")
    finally:
        with contextlib.suppress(FileNotFoundError):  # published (moved) or the run failed
            os.unlink(tmp)
    out.write(LISTING_META, json.dumps(meta, sort_keys=True).encode(), None)
    log.info("listed %d inputs in %d groups: %s", sum(s["inputs"] for s in splits.values()),
             sum(s["groups"] for s in splits.values()), out.url_of(LISTING))
    return meta


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _check_unique(split: str, spec: str, cfg: ShardsConfig, extensions, hashes: np.ndarray) -> None:
    """An InputError naming both inputs when two of a split have the same key; the listing is read a second time
    only when two hashes collide."""
    s = np.sort(hashes)
    dup = s[1:][s[1:] == s[:-1]]
    if not len(dup):
        return
    dup = set(dup.tolist())
    seen: Dict[str, str] = {}
    for chunk in split_chunks(spec, cfg.labels_from_dirs, extensions, cfg.shard.max_samples):
        for src in chunk:
            k = make_key(src.rel)
            if _key_hash(k) not in dup:
                continue
            if k in seen:
                raise InputError(f"split {split}: {src.url} appears twice in the input (as {seen[k]} too); "
                                 "remove the duplicate row")
            seen[k] = src.url


def fingerprint(cfg: ShardsConfig, group: Group) -> str:
    """What a group's output depends on: its inputs, their class indices, the transcode/filter settings, and the
    manifest format its record's rows are written in."""
    h = hashlib.sha256()
    settings = [to_dict(cfg.transcode), to_dict(cfg.filter), cfg.shard.max_bytes, ROWS_VERSION]
    if cfg.kind == "image":  # video sets keep the fingerprints they had before images
        settings += ["image", to_dict(cfg.image)]
    h.update(json.dumps(settings, sort_keys=True).encode())
    for s, k, i in zip(group.sources, group.keys, group.label_index):
        h.update(f"\0{s.url}\0{s.label}\0{i}\0{k}".encode())
    return h.hexdigest()
