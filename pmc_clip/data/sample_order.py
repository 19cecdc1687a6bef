"""The order of an epoch's training samples: every sample once per epoch, at any number of
ranks, workers and shards, resumable on another world size. Pure numpy: no I/O, no torch.

    shards -> placement (fixed per seed) -> C canonical streams -> spans shuffled per epoch
    global step: the next G / C positions of every stream; rank r: slice r of those G

Placement. The shards are put in an order drawn from the seed alone and their samples laid
end to end; that sample space is cut into C "canonical streams" of equal size (+-1
sample; a shard may straddle two streams). C (`num_canonical_nodes`) is the node count
of the run that started the epoch: streams never change between epochs, so with
`--cache-dir` a node reads the same shards every epoch (see `rank_segments`).

Shuffle. Each stream's part of a shard is cut into spans of `span_samples` consecutive
samples; every epoch permutes the spans of every stream (seed, epoch, stream). A span is
one contiguous byte range of its shard: a reader fetches it with one range request, never
per sample. A global batch draws G / span_samples spans spread over all streams, so it
mixes far more shards than the old shard-per-reader order (bench/RESULTS.md measures it).

Resampling. A resampled stream is a sequence of draws with replacement: a position of the
stream, chosen with probability proportional to its source's upsampling factor, starts
a run of `span_samples` samples that wraps around inside the stream's part of the shard.
Wrapping makes every position of a shard equally likely (each is covered by exactly
`span_samples` start positions); cutting runs at the shard's end would starve its start.

Steps. Global step t of an epoch consumes positions [t G / C, (t + 1) G / C) of every
stream, G = batch_size x world_size, which must be a multiple of C. The consumed set after
k samples is "the first k / C positions of every stream", whatever G was: a run resumed
with another world size continues the same epoch with no sample repeated or lost. An
epoch has floor(samples_per_epoch / G) steps; the remainder (< G samples) is the tail of
every stream's shuffled order, a different set every epoch (rotated, never starved).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

# Independent random streams for the three uses of the seed.
_PLACEMENT, _SPAN_SHUFFLE, _RESAMPLE = 0x504C, 0x5350, 0x5253


@dataclass(frozen=True, kw_only=True)
class OrderConfig:
    """The shuffle's own parameters: with the epoch they fix the order of every sample."""

    seed: int
    num_canonical_nodes: int
    span_samples: int
    resampled: bool
    samples_per_epoch: int  # all samples without resampling; the draws with it

    def __post_init__(self) -> None:
        assert self.num_canonical_nodes >= 1 and self.span_samples >= 1, self
        assert self.samples_per_epoch >= 0, self


@dataclass(frozen=True, kw_only=True)
class Run:
    """Samples [first, stop) of shard `shard`, at positions [position, position + stop -
    first) of canonical stream `stream` (the position seeds the sample's crop and mask)."""

    shard: int
    first: int
    stop: int
    stream: int
    position: int

    @property
    def num_samples(self) -> int:
        return self.stop - self.first


@dataclass(frozen=True, kw_only=True)
class Segment:
    """Positions [start, stop) of canonical stream `stream`."""

    stream: int
    start: int
    stop: int


def rank_segments(
    *, consumed: int, global_batch: int, rank: int, batch_size: int, num_canonical_nodes: int
) -> list[Segment]:
    """The stream positions of rank `rank`'s batch in the step that starts after `consumed`
    samples of the epoch.

    The step's G samples are laid out stream after stream (G / C positions of stream 0,
    then of stream 1, ...) and rank r takes [r B, (r + 1) B) of that layout. Ranks are
    numbered node by node (torchrun and SLURM do), so with P nodes and C a multiple of P,
    node p takes exactly streams [p C / P, (p + 1) C / P): the same shards every epoch.
    """
    per_stream = global_batch // num_canonical_nodes
    assert per_stream * num_canonical_nodes == global_batch, (global_batch, num_canonical_nodes)
    assert consumed % num_canonical_nodes == 0, (consumed, num_canonical_nodes)
    base = consumed // num_canonical_nodes
    low, high = rank * batch_size, (rank + 1) * batch_size
    segments = []
    for stream in range(low // per_stream, (high - 1) // per_stream + 1):
        start = max(low, stream * per_stream) - stream * per_stream
        stop = min(high, (stream + 1) * per_stream) - stream * per_stream
        segments.append(Segment(stream=stream, start=base + start, stop=base + stop))
    return segments


class Placement:
    """The fixed cut of the sample space into canonical streams: per stream, its pieces
    (shard, first, stop) in placement order. Depends on the seed and C, never the epoch.

    The cut gives every stream an equal share of the mass (samples x weight): equal
    sample counts without resampling, where every weight is 1; with resampling, streams
    draw equally many samples, so equal mass keeps every sample's chance the same across
    the streams (a shard cut between two streams included)."""

    def __init__(
        self,
        *,
        shard_sizes: np.ndarray,
        shard_mass: np.ndarray,
        seed: int,
        num_canonical_nodes: int,
    ) -> None:
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        order = np.random.default_rng([seed, _PLACEMENT]).permutation(len(sizes))
        starts = np.concatenate([[0], np.cumsum(sizes[order])])  # in the placed space
        per_sample = np.asarray(shard_mass, dtype=np.float64)[order]
        cum_mass = np.concatenate([[0.0], np.cumsum(sizes[order] * per_sample)])
        bounds = [0]
        for c in range(1, num_canonical_nodes):
            mass = c * cum_mass[-1] / num_canonical_nodes
            i = min(int(np.searchsorted(cum_mass, mass, side="right")) - 1, len(sizes) - 1)
            offset = min(int((mass - cum_mass[i]) // per_sample[i]), int(sizes[order[i]]))
            bounds.append(max(bounds[-1], int(starts[i]) + offset))
        bounds.append(int(starts[-1]))
        self.pieces: list[np.ndarray] = []  # per stream: int64 [n, 3] (shard, first, stop)
        for low, high in itertools.pairwise(bounds):
            # Placed shards overlapping [low, high), clipped to it.
            first_i = int(np.searchsorted(starts, low, side="right")) - 1
            last_i = int(np.searchsorted(starts, high, side="left"))
            rows = []
            for i in range(max(first_i, 0), min(last_i, len(sizes))):
                lo, hi = max(low, int(starts[i])), min(high, int(starts[i + 1]))
                if hi > lo:
                    rows.append((int(order[i]), lo - int(starts[i]), hi - int(starts[i])))
            self.pieces.append(np.asarray(rows, dtype=np.int64).reshape(-1, 3))


class StreamOrder:
    """One canonical stream in one epoch: runs of consecutive samples laid end to end.

    Memory: 20 bytes a run, in every data-loader worker that reads the stream (with
    one-sample spans, PMC-OA's 1.3M samples on 8 nodes: 3.3 MB a worker; 24M: 60 MB)."""

    def __init__(self, *, shard: np.ndarray, first: np.ndarray, length: np.ndarray) -> None:
        # int32: shard numbers, sample numbers within a shard and run lengths are small.
        self.shard = shard.astype(np.int32)
        self.first = first.astype(np.int32)
        self.length = length.astype(np.int32)
        self.ends = np.cumsum(length, dtype=np.int64)  # stream position just past each run

    @property
    def num_positions(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def runs(self, *, stream: int, start: int, stop: int) -> list[Run]:
        """The samples at positions [start, stop) as runs (each within one span)."""
        assert 0 <= start <= stop <= self.num_positions, (start, stop, self.num_positions)
        out = []
        i = int(np.searchsorted(self.ends, start, side="right"))
        position = start
        while position < stop:
            run_start = int(self.ends[i] - self.length[i])
            offset = position - run_start
            take = min(stop, int(self.ends[i])) - position
            first = int(self.first[i]) + offset
            out.append(
                Run(
                    shard=int(self.shard[i]),
                    first=first,
                    stop=first + take,
                    stream=stream,
                    position=position,
                )
            )
            position += take
            i += 1
        return out


def span_order(
    pieces: np.ndarray, *, span_samples: int, seed: int, epoch: int, stream: int
) -> StreamOrder:
    """Every sample of the stream once: its pieces cut into spans, the spans permuted."""
    lengths = pieces[:, 2] - pieces[:, 1]
    spans_per_piece = -(-lengths // span_samples)
    piece_of_span = np.repeat(np.arange(len(pieces)), spans_per_piece)
    # Index of each span within its piece: 0, 1, ... restarting at every piece.
    span_in_piece = np.arange(len(piece_of_span)) - np.repeat(
        np.cumsum(spans_per_piece) - spans_per_piece, spans_per_piece
    )
    first = pieces[piece_of_span, 1] + span_in_piece * span_samples
    length = np.minimum(span_samples, pieces[piece_of_span, 2] - first)
    shard = pieces[piece_of_span, 0]
    permutation = np.random.default_rng([seed, _SPAN_SHUFFLE, epoch, stream]).permutation(
        len(first)
    )
    return StreamOrder(
        shard=shard[permutation], first=first[permutation], length=length[permutation]
    )


def resampled_order(
    pieces: np.ndarray,
    *,
    weights: np.ndarray,
    span_samples: int,
    num_positions: int,
    seed: int,
    epoch: int,
    stream: int,
) -> StreamOrder:
    """`num_positions` samples drawn as runs with replacement (see the module docstring):
    a start position with probability proportional to its shard's weight, then up to
    `span_samples` samples wrapping around inside the piece."""
    rng = np.random.default_rng([seed, _RESAMPLE, epoch, stream])
    lengths = pieces[:, 2] - pieces[:, 1]
    mass = lengths * weights[pieces[:, 0]]
    probabilities = mass / mass.sum()
    run_length = np.minimum(span_samples, lengths)
    shards, firsts, counts = [], [], []
    drawn = 0
    while drawn < num_positions:
        # Enough draws for the rest in one vectorised call (the shortest runs bound it).
        num_draws = -(-(num_positions - drawn) // int(run_length.min())) + 1
        piece = rng.choice(len(pieces), size=num_draws, p=probabilities)
        offset = (rng.random(num_draws) * lengths[piece]).astype(np.int64)
        size = run_length[piece]
        # A run that passes the piece's end continues at its start: two runs.
        head = np.minimum(size, lengths[piece] - offset)
        tail = size - head
        shard = np.stack([pieces[piece, 0], pieces[piece, 0]], axis=1).ravel()
        first = np.stack([pieces[piece, 1] + offset, pieces[piece, 1]], axis=1).ravel()
        count = np.stack([head, tail], axis=1).ravel()
        keep = count > 0
        shards.append(shard[keep])
        firsts.append(first[keep])
        counts.append(count[keep])
        drawn += int(size.sum())
    order = StreamOrder(
        shard=np.concatenate(shards), first=np.concatenate(firsts), length=np.concatenate(counts)
    )
    return order


class EpochOrder:
    """The order of one epoch: a StreamOrder per canonical stream, built on first use (a
    rank reads one or two streams)."""

    def __init__(
        self,
        *,
        shard_sizes: np.ndarray,
        shard_weights: np.ndarray,
        config: OrderConfig,
        epoch: int,
    ) -> None:
        self.config, self.epoch = config, epoch
        self.weights = np.asarray(shard_weights, dtype=np.float64)
        mass = self.weights if config.resampled else np.ones(len(self.weights))
        self.placement = _placement(
            shard_sizes=tuple(int(n) for n in shard_sizes),
            shard_mass=tuple(float(m) for m in mass),
            seed=config.seed,
            num_canonical_nodes=config.num_canonical_nodes,
        )

    @property
    def num_samples(self) -> int:
        """Samples in the epoch (before the cut to whole global batches)."""
        return self.config.samples_per_epoch

    def num_steps(self, global_batch: int, *, consumed: int = 0) -> int:
        """Global steps left after `consumed` samples."""
        return (self.num_samples - consumed) // global_batch

    @functools.lru_cache(maxsize=4)  # noqa: B019 -- one EpochOrder per epoch, few streams
    def stream(self, stream: int) -> StreamOrder:
        c = self.config
        pieces = self.placement.pieces[stream]
        if not c.resampled:
            return span_order(
                pieces, span_samples=c.span_samples, seed=c.seed, epoch=self.epoch, stream=stream
            )
        return resampled_order(
            pieces,
            weights=self.weights,
            span_samples=c.span_samples,
            num_positions=c.samples_per_epoch // c.num_canonical_nodes,
            seed=c.seed,
            epoch=self.epoch,
            stream=stream,
        )

    def runs(self, segment: Segment) -> list[Run]:
        return self.stream(segment.stream).runs(
            stream=segment.stream, start=segment.start, stop=segment.stop
        )

    def rank_runs(
        self, *, consumed: int, global_batch: int, rank: int, batch_size: int
    ) -> list[Run]:
        """Rank `rank`'s batch of the step that starts after `consumed` samples, as runs."""
        segments = rank_segments(
            consumed=consumed,
            global_batch=global_batch,
            rank=rank,
            batch_size=batch_size,
            num_canonical_nodes=self.config.num_canonical_nodes,
        )
        return [run for segment in segments for run in self.runs(segment)]


@functools.lru_cache(maxsize=2)
def _placement(
    *,
    shard_sizes: tuple[int, ...],
    shard_mass: tuple[float, ...],
    seed: int,
    num_canonical_nodes: int,
) -> Placement:
    return Placement(
        shard_sizes=np.asarray(shard_sizes),
        shard_mass=np.asarray(shard_mass),
        seed=seed,
        num_canonical_nodes=num_canonical_nodes,
    )
