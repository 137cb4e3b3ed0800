"""The project's sampling: which samples each rank reads at each step, and every random choice per sample.

Everything here is a pure function of (seed, epoch, position), where position is a sample's place in the
epoch's global order. A loader's whole state is therefore (epoch, position): resuming rebuilds the exact
stream, with any number of data workers, and with another number of ranks the rest of the epoch is still
served exactly once. DALI's own checkpointing cannot do this (its video decoder refuses checkpointing).

Order, two kinds (`data.shuffle`):
- global: a permutation of the whole dataset per epoch, evaluated per position (`PermutedOrder`: no array of
  the set's size). Every rank reads from every shard: right for a local set, wrong for a remote one far larger
  than a node's disk.
- window (the default for remote sets): the shards are permuted per epoch and their samples, in that order, cut
  into `partitions` equal ranges (the canonical nodes); each range is shuffled within windows of about
  `window` shards' samples, and the ranges are interleaved: position g is sample g // C of partition g % C.
  When the number of nodes N divides C, node n takes the positions g = n (mod N) of every step, so it reads
  only the partitions p = n (mod N): about 1/N of the shards, each about once per epoch, a window at a time.
  The order depends on (seed, epoch, C, window), never on the number of ranks, so exact and elastic resume hold.
Both orders are built from per-shard sample counts only (rows numbered shard after shard); a row's geometry is
looked up when a step draws it, so a plan of 22M samples holds arrays of its shards, never of its samples.
Steps: each step takes the next `world_size * batch_size` positions (a prefix of the epoch's order is always
what has been consumed); rank r takes a contiguous slice of them (window order: of its node's share). The last
step of an epoch may be short: its samples are spread evenly over the ranks (sizes differ by at most one), so
every sample is seen once and every rank takes the same number of steps. Only when that last step holds fewer
samples than there are ranks, a rank repeats one of them, flagged `padded`.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.image_masks import ImageMaskConfig, sample_image_masks
from pipeline.masks import sample_masks

log = logging.getLogger(__name__)
# 2: the global order a per-position permutation (PermutedOrder), window order over shards in manifest order
ORDER_VERSION = 2
# stream ids keep the random draws of different purposes independent
_ORDER, _SAMPLE, _MASKS, _WINDOW = 0, 1, 2, 3


def rng_for(seed: int, epoch: int, position: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, position, stream]))


@dataclass(frozen=True)
class ClipRecord:
    """How one clip was sampled from a video: enough to reproduce it exactly (the reference loader does)."""

    start: int  # first frame
    crop: Tuple[int, int, int, int]  # y0, x0, h, w in decoded-video pixels
    flip: bool
    view: int = 0  # evaluation: which (clip, crop) view of the video


@dataclass
class BatchPlan:
    epoch: int
    step: int
    position: int  # global position of the first sample of this step (all ranks)
    next_position: int  # where the epoch continues after this step
    rows: List[int]  # manifest rows read by this rank, in batch order
    records: List[ClipRecord]
    padded: List[bool] = field(default_factory=list)
    mask_seed: Tuple[int, int, int] = (0, 0, 0)


class PermutedOrder:
    """The global order of one epoch: a pseudo-random permutation of [0, n) evaluated per position, no array of n.

    A balanced Feistel network (6 rounds, splitmix64 round function keyed from (seed, epoch)) permutes the smallest
    domain of an even number of bits holding n, and cycle-walking maps it back into [0, n) (on average under 4
    passes): a bijection, so every position of an epoch names a distinct row. `map` evaluates many positions at
    once (numpy); `order[g]` one."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        half = max(1, (max(1, n - 1).bit_length() + 1) // 2)
        self._half, self._mask = np.uint64(half), np.uint64((1 << half) - 1)
        self._keys = np.random.SeedSequence([seed, epoch, 0, _ORDER]).generate_state(self.ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half, mask = self._half, self._mask
        for k in self._keys:
            left, right = x >> half, x & mask
            z = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)  # splitmix64's finaliser as the round function
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z ^= z >> np.uint64(31)
            x = (right << half) | (left ^ (z & mask))
        return x

    def map(self, positions) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = self._encrypt(np.asarray(positions, np.uint64))
            out = x >= self.n
            while out.any():
                x[out] = self._encrypt(x[out])
                out = x >= self.n
        return x.astype(np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> int:
        return int(self.map([g])[0])


class WindowOrder:
    """The window order of one epoch (module docstring), computed lazily: memory O(shards + one window), so a
    set of tens of millions of samples costs no per-sample array. `order[g]` is the row at position g; rows are
    numbered shard after shard (`counts`: the rows of each shard, in order)."""

    def __init__(self, counts: np.ndarray, seed: int, epoch: int, partitions: int, window: int):
        counts = np.asarray(counts, np.int64)
        n, nshards = int(counts.sum()), len(counts)
        self.n, self.partitions = n, max(1, min(partitions, n or 1))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # each shard's first row
        perm = rng_for(seed, epoch, 0, _WINDOW).permutation(nshards)
        self._seq_first = first[perm]  # for shard-permuted sequence index j: its shard's first row
        self._seq_cum = np.concatenate([[0], np.cumsum(counts[perm])])
        base, extra = divmod(n, self.partitions)  # partitions p < extra hold one sample more
        self._lens = np.array([base + (p < extra) for p in range(self.partitions)], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._lens)[:-1]])
        self.window = max(1, int(round(window * n / max(1, nshards))))  # samples per window
        self._seed, self._epoch = seed, epoch
        self._perms: "OrderedDict[Tuple[int, int], np.ndarray]" = OrderedDict()

    def _window_perm(self, p: int, m: int) -> np.ndarray:
        key = (p, m)
        perm = self._perms.get(key)
        if perm is None:
            size = min(self.window, int(self._lens[p]) - m * self.window)
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, self._epoch, p, m, _WINDOW]))
            perm = rng.permutation(size)
            self._perms[key] = perm
            while len(self._perms) > 4 * self.partitions:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return perm

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> int:
        p, i = g % self.partitions, g // self.partitions
        m, k = divmod(i, self.window)
        j = int(self._starts[p]) + m * self.window + int(self._window_perm(p, m)[k])  # in the shard sequence
        s = int(np.searchsorted(self._seq_cum, j, side="right")) - 1
        return int(self._seq_first[s] + (j - self._seq_cum[s]))

    def map(self, positions) -> np.ndarray:
        return np.array([self[int(g)] for g in positions], np.int64)


class _Identity:
    """Evaluation's order: position g is item g."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> int:
        return int(g)

    def map(self, positions) -> np.ndarray:
        return np.asarray(positions, np.int64)


def node_slice(start: int, count: int, rank: int, world_size: int, ranks_per_node: int) -> List[int]:
    """Window order, a full step: node n = rank // ranks_per_node takes the positions = n (mod nodes), its ranks
    contiguous slices of those."""
    nodes = world_size // ranks_per_node
    node, local = divmod(rank, ranks_per_node)
    first = start + (node - start) % nodes
    mine = list(range(first, start + count, nodes))
    lo, hi = (local * len(mine)) // ranks_per_node, ((local + 1) * len(mine)) // ranks_per_node
    return mine[lo:hi]


def steps_in_epoch(num_samples: int, batch_size: int, world_size: int, position: int = 0) -> int:
    return math.ceil(max(0, num_samples - position) / (batch_size * world_size))


def rank_slice(start: int, count: int, rank: int, world_size: int) -> Tuple[List[int], List[bool]]:
    """Global positions [start, start+count) split evenly: rank r's positions and their padded flags."""
    lo = start + (rank * count) // world_size
    hi = start + ((rank + 1) * count) // world_size
    if hi > lo:
        return list(range(lo, hi)), [False] * (hi - lo)
    return [start + rank % count], [True]  # fewer samples than ranks: repeat one so every rank steps


def random_resized_crop(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                        ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window (10 tries, then a centre crop), in whole pixels."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return y0, x0, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def clip_span(num_frames: int, stride: int) -> int:
    return (num_frames - 1) * stride + 1


def frame_indices(start: int, nframes: int, num_frames: int, stride: int) -> List[int]:
    """The frames of a clip starting at `start`: every `stride`-th; past the video's end the last frame repeats
    (DALI's pad_mode='edge')."""
    return [min(start + i * stride, nframes - 1) for i in range(num_frames)]


def decoded_frames(start: int, nframes: int, num_frames: int, stride: int, keyframe_interval: int) -> int:
    """Frames a decoder decodes for a clip: from the keyframe at or before its first frame through its last
    (keyframes every `keyframe_interval` frames; 0 = only the first frame is one)."""
    return frame_indices(start, nframes, num_frames, stride)[-1] - keyframe_before(start, keyframe_interval) + 1


def keyframe_before(frame: int, keyframe_interval: int) -> int:
    """The keyframe at or before `frame` (keyframes every `keyframe_interval` frames; 0 = only frame 0)."""
    return frame - frame % keyframe_interval if keyframe_interval else 0


def train_record(seed: int, epoch: int, position: int, nframes: int, height: int, width: int,
                 num_frames: int, stride: int, scale: Sequence[float], ratio: Sequence[float],
                 flip: bool, start_grid: int = 1) -> ClipRecord:
    """The random choices for the sample at `position` of `epoch`: start frame (a multiple of `start_grid`: with
    the set's keyframe interval, a clip decodes no frame before its first), crop window, flip."""
    rng = rng_for(seed, epoch, position, _SAMPLE)
    starts = max(1, nframes - clip_span(num_frames, stride) + 1)
    start = int(rng.integers(0, (starts - 1) // start_grid + 1)) * start_grid
    crop = random_resized_crop(rng, height, width, scale, ratio)
    return ClipRecord(start, crop, bool(flip and rng.random() < 0.5))


def eval_record(view: int, num_clips: int, num_crops: int, nframes: int, height: int, width: int,
                num_frames: int, stride: int) -> ClipRecord:
    """Deterministic evaluation views: clips evenly spaced in time x square crops along the long side."""
    clip, crop = divmod(view, num_crops)
    free = max(0, nframes - clip_span(num_frames, stride))
    start = round(clip * free / (num_clips - 1)) if num_clips > 1 else free // 2
    side = min(height, width)
    slack_y, slack_x = height - side, width - side
    frac = crop / (num_crops - 1) if num_crops > 1 else 0.5
    return ClipRecord(int(start), (int(round(slack_y * frac)), int(round(slack_x * frac)), side, side), False, view)


class Plan:
    """The batches one rank reads, from a resumable (epoch, position) state.

    `samples`: `len(samples)` rows, `samples[row]` = (nframes, height, width), looked up only for the rows a
    step draws (a `SplitIndex` reads them with their shard; a list does too). Training: shuffled every epoch
    (`shuffle`: global, a permutation evaluated per position; or window over shards of `shard_counts` rows each,
    rows numbered shard after shard, with `partitions` canonical nodes, 0 = 8 per node, and `window` shards;
    module docstring), random records (start frames on multiples of `start_grid`), endless. Evaluation: every
    video expanded into `views` deterministic views, one pass, in order. Nothing here is per row: the plan of a
    22M-sample set is a few arrays of its shards.
    """

    def __init__(self, samples: Sequence[Tuple[int, int, int]], *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, train: bool = True, num_frames: int = 16,
                 stride: int = 4, scale: Sequence[float] = (0.3, 1.0), ratio: Sequence[float] = (0.75, 1.35),
                 flip: bool = True, num_clips: int = 1, num_crops: int = 1, start_grid: int = 1,
                 shuffle: str = "global", shard_counts: Optional[Sequence[int]] = None, partitions: int = 0,
                 window: int = 16, ranks_per_node: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if shuffle not in ("global", "window") or (shuffle == "window" and shard_counts is None):
            raise ValueError(f"shuffle {shuffle!r}: global, or window with the rows of every shard")
        if shard_counts is not None and int(np.sum(shard_counts)) != len(samples):
            raise ValueError(f"shard_counts sum to {int(np.sum(shard_counts))}, there are {len(samples)} samples")
        self.samples = samples
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.train, self.num_frames, self.stride = train, num_frames, stride
        self.scale, self.ratio, self.flip, self.start_grid = tuple(scale), tuple(ratio), flip, max(1, start_grid)
        self.views = 1 if train else num_clips * num_crops
        self.num_clips, self.num_crops = num_clips, num_crops
        self.shuffle = shuffle if train else "none"
        self.ranks_per_node = ranks_per_node if ranks_per_node >= 1 and world_size % ranks_per_node == 0 else 1
        self.nodes = world_size // self.ranks_per_node
        self.partitions = partitions or 8 * self.nodes  # 0: fixed at the first start, kept by resumes
        self._auto_partitions = not partitions
        self.window = window
        self._shard_counts = None if shard_counts is None else np.asarray(shard_counts, np.int64)
        self.epoch, self.position = 0, 0
        self._orders: "OrderedDict[int, object]" = OrderedDict()  # this epoch's and, near its end, the next

    @property
    def num_items(self) -> int:
        return len(self.samples) * self.views

    @property
    def steps_per_epoch(self) -> int:
        return steps_in_epoch(self.num_items, self.batch_size, self.world_size)

    def _order_key(self) -> dict:
        return {"shuffle": self.shuffle, "partitions": self.partitions, "window": self.window} \
            if self.shuffle == "window" else {"shuffle": self.shuffle}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items,
                "order_version": ORDER_VERSION, **self._order_key()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError(f"loader state is for {state['num_items']} items with seed {state['seed']}, this "
                             f"loader has {self.num_items} with seed {self.seed}: wrong dataset or config")
        if self._auto_partitions and "partitions" in state:
            self.partitions = int(state["partitions"])  # the canonical nodes of the first start
        saved = {k: state.get(k, "global" if k == "shuffle" else None) for k in self._order_key()}
        if saved != self._order_key():
            raise ValueError(f"loader state was saved with order {saved}, this loader has {self._order_key()}: "
                             "resuming would serve another order mid-epoch; keep data.shuffle, "
                             "data.shuffle_window and data.canonical_nodes as they were")
        if state.get("order_version", 1) != ORDER_VERSION and int(state["position"]) > 0:
            log.warning("the loader state was saved by a tubelet whose order (version %s) differs from this one's "
                        "(%s): the rest of epoch %s follows the new order, so some of its samples may be seen twice "
                        "or not at all; later epochs are exact", state.get("order_version", 1), ORDER_VERSION,
                        state["epoch"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._orders.clear()

    def _item_order(self, epoch: int):
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle == "window":
                order = WindowOrder(self._shard_counts, self.seed, epoch, self.partitions, self.window)
            elif self.train:
                order = PermutedOrder(self.num_items, self.seed, epoch)
            else:
                order = _Identity(self.num_items)
            self._orders[epoch] = order
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return order

    def _positions(self, epoch: int, start: int, count: int) -> Tuple[List[int], List[bool]]:
        """This rank's positions of the step [start, start + count), and their padded flags."""
        full = count == self.batch_size * self.world_size
        if (self.shuffle == "window" and full and self.nodes > 1
                and self._item_order(epoch).partitions % self.nodes == 0):
            positions = node_slice(start, count, self.rank, self.world_size, self.ranks_per_node)
            return positions, [False] * len(positions)
        return rank_slice(start, count, self.rank, self.world_size)

    def upcoming_rows(self, steps: int) -> List[int]:
        """The rows this rank reads in its next `steps` steps, in order (no records drawn): what to prefetch."""
        epoch, start, rows = self.epoch, self.position, []
        for _ in range(steps):
            if start >= self.num_items:
                if not self.train:
                    break
                epoch, start = epoch + 1, 0
            count = min(self.batch_size * self.world_size, self.num_items - start)
            order = self._item_order(epoch)
            rows.extend((order.map(self._positions(epoch, start, count)[0]) // self.views).tolist())
            start += count
        return rows

    def __iter__(self) -> Iterator[BatchPlan]:
        return self

    def __next__(self) -> BatchPlan:
        """The next step's batch for this rank; advances the state."""
        if self.position >= self.num_items:
            if not self.train:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
        epoch, start = self.epoch, self.position
        count = min(self.batch_size * self.world_size, self.num_items - start)
        positions, padded = self._positions(epoch, start, count)
        order = self._item_order(epoch)
        rows, records = [], []
        for p, item in zip(positions, order.map(positions).tolist()):
            row, view = divmod(item, self.views)
            n, h, w = self.samples[row]
            if self.train:
                rec = train_record(self.seed, epoch, p, n, h, w, self.num_frames, self.stride, self.scale,
                                   self.ratio, self.flip, self.start_grid)
            else:
                rec = eval_record(view, self.num_clips, self.num_crops, n, h, w, self.num_frames, self.stride)
            rows.append(row)
            records.append(rec)
        step = start // (self.batch_size * self.world_size)
        self.position = start + count
        return BatchPlan(epoch, step, start, self.position, rows, records, padded,
                         mask_seed=(self.seed, epoch, positions[0]))

    def masks(self, plan: BatchPlan, grid: Optional[Sequence[int]], specs) -> List[Tuple[np.ndarray, np.ndarray]]:
        """The masks of a step's batch, drawn on the token `grid` (none without a grid or specs), a pure function
        of the step's first position: V-JEPA's, one (context, target) index pair per mask type in `specs`; or,
        with an `ImageMaskConfig`, I-JEPA's, one pair per target block, every pair holding the same context
        array (so the context is encoded once)."""
        if grid is None or not specs:
            return []
        seed, epoch, pos = plan.mask_seed
        rng = rng_for(seed, epoch, pos, _MASKS)
        if isinstance(specs, ImageMaskConfig):
            context, targets = sample_image_masks(rng, len(plan.rows), grid, specs)
            return [(context, t) for t in targets]
        return sample_masks(rng, len(plan.rows), grid, specs)
