"""The bytes of a WebM sample that one clip needs: the clusters from the keyframe at or before the clip's first
frame through the cluster holding its last, behind the file's header (a WebM of its own, whose frame 0 is that
keyframe).

Why: DALI's CPU video decoder builds no frame index for in-memory videos, so it cannot seek: for a clip starting
at frame s it decodes frames 0..s first (measured with DALI 2.4.0: +0.34 ms per skipped 448x256 VP9 frame, so a
clip near the end of a 10 s video costs 2.3x one at its start). Handed the clip's GOPs alone, the decoder starts on
the keyframe, which is where a seeking decoder starts too. The GPU decoder does seek; it gets fewer bytes to index.

How: `make shards` writes WebM (FFmpeg's Matroska muxer) whose clusters begin on keyframes. `layout` reads the
EBML structure once per sample (element headers only: no payload is parsed) and refuses, returning None, anything
it does not fully understand: Block groups, laced blocks, more than one track, unknown-size clusters, an element
it does not expect, or a block count other than the sample's frame count. Then the whole sample is decoded as
before; a slice is never a guess. Each cluster's timestamp is rebased to the slice's first (same width, in
place), so the slice starts at time 0 like any file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_SEGMENT, _CLUSTER, _INFO, _TRACKS, _TRACK_ENTRY = 0x18538067, 0x1F43B675, 0x1549A966, 0x1654AE6B, 0xAE
_TIMESTAMP, _SIMPLE_BLOCK = 0xE7, 0xA3
_SKIPPED = {0x114D9B74, 0xEC, 0x1C53BB6B, 0x1254C367, 0x1043A770, 0xBF}  # SeekHead Void Cues Tags Chapters CRC-32
_IN_CLUSTER = {0xEC, 0xBF}  # Void and CRC-32 may sit between blocks
_UNKNOWN_SIZE = object()


class _Unsupported(Exception):
    pass


def _vint(d: bytes, p: int, keep_marker: bool = False) -> Tuple[int, int]:
    """An EBML variable-length integer at `p`: (value, length). IDs keep their length marker, sizes do not."""
    if p >= len(d):
        raise _Unsupported("truncated")
    b = d[p]
    n = 9 - b.bit_length() if b else 9
    if n > 8 or p + n > len(d):
        raise _Unsupported("bad vint")
    v = b if keep_marker else b & (0xFF >> n)
    for i in range(1, n):
        v = (v << 8) | d[p + i]
    return v, n


def _element(d: bytes, p: int):
    """(id, start of the element, start of its body, end of its body or _UNKNOWN_SIZE)."""
    eid, n1 = _vint(d, p, keep_marker=True)
    size, n2 = _vint(d, p + n1)
    body = p + n1 + n2
    if size == (1 << (7 * n2)) - 1:
        return eid, p, body, _UNKNOWN_SIZE
    if body + size > len(d):
        raise _Unsupported("element past the end")
    return eid, p, body, body + size


@dataclass(frozen=True)
class Cluster:
    start: int  # byte offsets in the sample: the cluster element [start, end)
    end: int
    timestamp: Tuple[int, int]  # where its Timestamp value sits: [begin, end)
    first_frame: int  # index of its first block among all the video's frames
    frames: int
    keyframe: bool  # its first block is a keyframe: a slice may begin here


@dataclass(frozen=True)
class Layout:
    header: bytes  # EBML header + a Segment of unknown size + Info + Tracks
    clusters: List[Cluster]


def layout(data: bytes, nframes: int) -> Optional[Layout]:
    """The sample's clusters, or None when `data` is not a WebM this module can cut exactly (then decode it
    whole). `nframes`: the sample's frame count from the index, which the blocks must add up to."""
    if not data.startswith(EBML_MAGIC):
        return None
    try:
        return _layout(data, nframes)
    except _Unsupported:
        return None


def _layout(d: bytes, nframes: int) -> Layout:
    eid, _, _, ebml_end = _element(d, 0)
    if ebml_end is _UNKNOWN_SIZE:
        raise _Unsupported("EBML header of unknown size")
    eid, _, p, seg_end = _element(d, ebml_end)
    if eid != _SEGMENT:
        raise _Unsupported("no Segment")
    seg_end = len(d) if seg_end is _UNKNOWN_SIZE else seg_end
    header = [d[:ebml_end], b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff"]  # Segment, size unknown
    clusters: List[Cluster] = []
    frame, track, last_ts = 0, None, 0
    while p < seg_end:
        eid, start, body, end = _element(d, p)
        if end is _UNKNOWN_SIZE:
            raise _Unsupported("element of unknown size")
        if eid == _CLUSTER:
            ts, first, key, n = None, frame, False, 0
            q = body
            while q < end:
                cid, _, cbody, cend = _element(d, q)
                if cend is _UNKNOWN_SIZE:
                    raise _Unsupported("cluster child of unknown size")
                if cid == _TIMESTAMP and ts is None and n == 0:
                    ts = (cbody, cend)
                elif cid == _SIMPLE_BLOCK:
                    tnum, tl = _vint(d, cbody)
                    if cbody + tl + 3 > cend:
                        raise _Unsupported("short block")
                    flags = d[cbody + tl + 2]
                    if flags & 0x06:  # laced: several frames in one block
                        raise _Unsupported("laced block")
                    if track is None:
                        track = tnum
                    elif tnum != track:
                        raise _Unsupported("more than one track")
                    if n == 0:
                        key = bool(flags & 0x80)
                    n += 1
                elif cid not in _IN_CLUSTER:
                    raise _Unsupported(f"cluster element {cid:#x}")
                q = cend
            if ts is None or not 1 <= ts[1] - ts[0] <= 8:
                raise _Unsupported("cluster without a timestamp")
            t = int.from_bytes(d[ts[0]:ts[1]], "big")
            if t < last_ts:
                raise _Unsupported("cluster timestamps go back")
            last_ts = t
            if n:
                clusters.append(Cluster(start, end, ts, first, n, key))
                frame += n
        elif eid in (_INFO, _TRACKS):
            if eid == _TRACKS and _count(d, body, end, _TRACK_ENTRY) != 1:
                raise _Unsupported("more than one track")
            header.append(d[start:end])
        elif eid not in _SKIPPED:
            raise _Unsupported(f"segment element {eid:#x}")
        p = end
    if frame != nframes or not clusters or not clusters[0].keyframe:
        raise _Unsupported("frame count")
    return Layout(b"".join(header), clusters)


def _count(d: bytes, p: int, end: int, eid: int) -> int:
    n = 0
    while p < end:
        cid, _, _, cend = _element(d, p)
        if cend is _UNKNOWN_SIZE:
            raise _Unsupported("element of unknown size")
        n += cid == eid
        p = cend
    return n


def clip_slice(data: bytes, lay: Layout, first: int, last: int) -> Tuple[bytes, int]:
    """The part of `data` that decodes frames `first`..`last` (video frame indices): (bytes, index of the
    slice's frame 0 in the video). The whole `data` (and 0) when the slice would be all of it."""
    cs = lay.clusters
    i = max((k for k, c in enumerate(cs) if c.keyframe and c.first_frame <= first), default=0)
    j = max(k for k, c in enumerate(cs) if c.first_frame <= last)
    if i == 0 and j == len(cs) - 1:
        return data, 0
    t0 = int.from_bytes(data[cs[i].timestamp[0]:cs[i].timestamp[1]], "big")
    parts = [lay.header]
    for c in cs[i:j + 1]:
        a, b = c.timestamp
        ts = int.from_bytes(data[a:b], "big") - t0
        parts += [data[c.start:a], ts.to_bytes(b - a, "big"), data[b:c.end]]
    return b"".join(parts), cs[i].first_frame
