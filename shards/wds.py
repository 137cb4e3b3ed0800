"""WebDataset tar shards and DALI index files.

A shard is a plain ustar archive: each sample is a run of consecutive members `<key>.<ext>`. Members are
written with fixed owner, mode and mtime so the same samples give the same bytes. The DALI index (what
`wds2idx` writes) is computed while writing, from the offsets `tarfile` reports.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, List, Sequence, Tuple

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Member:
    ext: str
    offset: int  # where the member's data starts in the tar (a multiple of 512)
    size: int
    name: str


class IndexedTarWriter:
    """Writes samples into one tar stream and records each member's data offset for the index. (Not webdataset's
    `ShardWriter`, which rolls over files and records no offsets.)"""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: List[List[Member]] = []

    def write(self, key: str, components: Sequence[Tuple[str, bytes]]) -> List[Member]:
        members = []
        for ext, data in components:
            name = f"{key}.{ext}"
            if " " in name or len(name) > 99:
                raise ValueError(f"tar member name {name!r} must be shorter than 100 characters, without spaces")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            # a short ustar name needs exactly one 512-byte header block before the data
            members.append(Member(ext, header + tarfile.BLOCKSIZE, len(data), name))
        self.samples.append(members)
        return members

    @property
    def bytes_written(self) -> int:
        return self._tar.offset

    def close(self) -> None:
        self._tar.close()


def format_index(samples: Sequence[Sequence[Member]]) -> str:
    """The index file text, byte for byte what DALI's `wds2idx` writes for the same tar."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> List[List[Member]]:
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty index")
    version, _, count = lines[0].partition(" ")
    if version != INDEX_VERSION or not count.isdigit():
        raise ValueError(f"index header {lines[0]!r} is not '{INDEX_VERSION} <count>'")
    samples = []
    for line in lines[1:]:
        parts = line.split(" ")
        if len(parts) % 4:
            raise ValueError(f"index line {line[:80]!r} is not groups of 'ext offset size name'")
        samples.append([Member(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                        for i in range(0, len(parts), 4)])
    if len(samples) != int(count):
        raise ValueError(f"index header says {count} samples, found {len(samples)}")
    return samples
