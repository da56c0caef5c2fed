"""The loader's epoch plan: which samples each rank and DataLoader worker reads, and in which order.

Positions: the shards of index.json, permuted with default_rng([seed, epoch]) and concatenated, number
the epoch's T samples 0..T-1. The global batch G = world * B is fixed, so an epoch has n = T // G steps
at any world size.

A layout (world W, nw workers per rank) starts at step s with the sorted positions `assigned` that no
earlier step used, (n - s) * G of them: rank r takes the r-th of W equal contiguous parts; its part is
cut into worker chunks in step order (worker w makes the rank's local steps w, w + nw, ...), and each
worker reads its chunk in position order through a shuffle buffer seeded by (seed, epoch, rank, w, 1)
(+ the layout's number after the first). Step s + k of a rank is the (k // nw)-th group of B samples
that worker k % nw emits.

The first layout of an epoch gives rank r the contiguous range [r*N, r*N + n*B), N = T // W (workers
read disjoint contiguous chunks; T - n*G samples wait for another epoch). A resume at another world
size or worker count starts a new layout at the resumed step, over the positions the earlier layouts
have not emitted yet. Those are found by replaying the earlier layouts' shuffle buffers on positions
alone (no I/O, about a second per million samples), so within an epoch no sample is used twice or
skipped, over any sequence of world sizes.

No entrypoint; used by orchestrator.data.loader.
"""

from __future__ import annotations

import itertools

import numpy as np


def shuffled(items, rng: np.random.Generator, size: int):
    """`items` through a shuffle buffer of `size` slots drawing from `rng` (the loader's only shuffle)."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = int(rng.integers(0, len(buf)))
        buf[k], item = item, buf[k]
        yield item
    while buf:
        k = int(rng.integers(0, len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


def buffer_rng(seed: int, epoch: int, rank: int, worker: int, layout: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank, worker, 1] + ([layout] if layout else []))


def worker_steps(worker: int, steps: int, workers: int) -> range:
    """The local steps (0-based within a layout) that `worker` of `workers` makes."""
    return range(worker, steps, workers)


def worker_positions(assigned: np.ndarray, steps_left: int, batch: int, rank: int, worker: int,
                     workers: int) -> np.ndarray:
    """The positions worker `worker` of rank `rank` reads in a layout with `steps_left` steps."""
    per_worker = [len(worker_steps(k, steps_left, workers)) for k in range(workers)]
    begin = rank * steps_left * batch + batch * sum(per_worker[:worker])
    return assigned[begin:begin + batch * per_worker[worker]]


def _emitted(assigned, steps_left, steps_done, world, workers, seed, epoch, layout, buffer) -> np.ndarray:
    """Positions every rank's workers emitted in the first `steps_done` steps of layout number `layout`."""
    batch = len(assigned) // (steps_left * world)
    used = []
    for rank in range(world):
        for w in range(workers):
            positions = worker_positions(assigned, steps_left, batch, rank, w, workers).tolist()
            n_used = len(worker_steps(w, steps_done, workers)) * batch
            used += itertools.islice(shuffled(positions, buffer_rng(seed, epoch, rank, w, layout), buffer), n_used)
    return np.array(used, dtype=np.int64)


def unused_positions(layouts, *, total: int, global_batch: int, seed: int, epoch: int,
                     buffer: int) -> list[np.ndarray]:
    """For each layout [start step, world, workers] of an epoch, the sorted positions it starts with."""
    steps = total // global_batch
    world = layouts[0][1]
    per_rank, batch = total // world, global_batch // world
    out = [np.concatenate([np.arange(r * per_rank, r * per_rank + steps * batch) for r in range(world)])]
    for k in range(1, len(layouts)):
        (start, world, workers), next_start = layouts[k - 1], layouts[k][0]
        used = _emitted(out[-1], steps - start, next_start - start, world, workers, seed, epoch, k - 1, buffer)
        left = np.setdiff1d(out[-1], used, assume_unique=True)  # stays sorted
        if len(left) != (steps - next_start) * global_batch:
            raise RuntimeError(f"loader layouts {layouts}: replay left {len(left)} samples, expected "
                               f"{(steps - next_start) * global_batch}")
        out.append(left)
    return out


def shard_ranges(positions: np.ndarray, shards: list[dict], order: np.ndarray) -> list[tuple[dict, list]]:
    """[(shard, [(lo, hi), ...])] covering sorted epoch `positions`, in position order; `order` is the
    epoch's shard permutation, lo/hi are sample numbers inside the shard."""
    counts = np.array([shards[i]["count"] for i in order], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    out: list[tuple[dict, list]] = []
    if len(positions) == 0:
        return out
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    for run in np.split(positions, breaks):
        lo, hi = int(run[0]), int(run[-1]) + 1
        for k in range(int(np.searchsorted(starts, lo, "right")) - 1, len(order)):
            a, b = max(lo, int(starts[k])), min(hi, int(starts[k + 1]))
            if a >= hi:
                break
            if a < b:
                shard = shards[order[k]]
                if out and out[-1][0] is shard:
                    out[-1][1].append((a - int(starts[k]), b - int(starts[k])))
                else:
                    out.append((shard, [(a - int(starts[k]), b - int(starts[k]))]))
    return out
