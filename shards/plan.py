"""Planning a `make shards` run: every split's inputs, in listing order, cut into groups of `shard.max_samples`.

Group g of split s becomes shard `s-{g:06d}.tar` (spilling into `s-{g:06d}-{p}.tar` past `shard.max_bytes`) and
is finished when its record `_parts/s-{g:06d}.json` exists. The plan is deterministic and identical in every
partition; a group's fingerprint says what its output depends on, so a rerun with other inputs or settings is
refused instead of mixing two datasets in one folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from common.config import to_dict
from shards.config import ShardsConfig
from shards.manifest import ROWS_VERSION
from shards.images import IMAGE_EXTENSIONS
from shards.sources import VIDEO_EXTENSIONS, InputError, Source, check_unique_keys, label_map, list_split

PARTS = "_parts"  # the folder of group records in a shard set


@dataclass
class Group:
    split: str
    index: int
    sources: List[Source]
    keys: List[str]
    label_index: List[Optional[int]]  # class index of each source (numbered over all splits)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def record(self) -> str:
        """The group's record, relative to the shard set: written last, its presence means the group is done."""
        return f"{PARTS}/{self.name}.json"


def plan(cfg: ShardsConfig) -> Tuple[List[Group], Dict[str, int]]:
    """List every split's inputs and cut them into groups (deterministic, identical in every partition)."""
    extensions = IMAGE_EXTENSIONS if cfg.kind == "image" else VIDEO_EXTENSIONS
    listed = {split: list_split(spec, cfg.labels_from_dirs, extensions) for split, spec in sorted(cfg.inputs.items())}
    labels = label_map(listed)
    groups = []
    for split, sources in listed.items():
        if not sources:
            raise InputError(f"inputs.{split}={cfg.inputs[split]} names no video files")
        keys = check_unique_keys(split, sources)
        n = cfg.shard.max_samples
        index = [labels[s.label] if s.label is not None else None for s in sources]
        for g in range(0, len(sources), n):
            groups.append(Group(split, g // n, sources[g:g + n], keys[g:g + n], index[g:g + n]))
    return groups, labels


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
