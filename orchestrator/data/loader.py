"""MultiCropLoader: DINOv2 batches streamed from WebDataset shards on any fsspec URL.

    loader = MultiCropLoader("s3://bucket/shards/index.json", batch_size=64, rank=r, world_size=W,
                             seed=0, crops=dataclasses.asdict(CropsCfg()), patch_size=14, num_workers=8,
                             mask=dict(mask_ratio_min_max=(0.1, 0.5), mask_probability=0.5))
    for batch in loader: ...          # one epoch from the saved position; `len(loader)` batches
    state = loader.state_dict()       # small JSON-able dict; MultiCropLoader(..., state=state) resumes

Epoch plan (deterministic from (seed, epoch), identical on every rank; details in data/plan.py):
  1. the shards of index.json are permuted with np.random.default_rng([seed, epoch]);
  2. their samples, concatenated in that order, form one sequence of T samples. The global batch
     G = world_size * batch_size is what stays fixed: an epoch has len = T // G steps at any world
     size. Rank r reads the contiguous range [r*N, r*N + len*B) with N = T // world_size, so every
     rank yields exactly `len` batches, no sample is read twice in an epoch, and a shard is read by at
     most the ranks/workers whose ranges touch it (the T - len*G leftover samples differ per epoch);
  3. a rank's range is cut into DataLoader-worker chunks: batch j is made by worker j % num_workers
     from its own contiguous chunk (so workers read disjoint shard ranges), shuffled with a buffer
     seeded by (seed, epoch, rank, worker); DataLoader returns batches in j order;
  4. crop/colour randomness of batch j comes from (seed, epoch, rank, j), masks from a torch.Generator
     seeded the same way.
Resume: state = {epoch, batch (next j), seed, layouts, consumed counts...}. Workers replay their shard
stream (bytes only, no decoding) up to the next batch, so the resumed run yields exactly the batches an
uninterrupted run would. At another world size or worker count (same global batch, any rank's state),
the rest of the epoch is resharded: a new layout starts at batch j over the samples no earlier batch
used (found by replaying the seeded shuffle buffers on sample positions, without I/O), so within the
epoch no sample is used twice or skipped. If the global batch or the index changed, the position
cannot be mapped: the loader warns and starts the next epoch.
Errors: opening/reading a shard is retried with exponential backoff (transient storage errors); a
missing shard or denied access fails with a clear message; a corrupt sample is skipped, counted
(`loader.skipped`) and replaced by another sample of the same batch so batch shapes stay fixed; the run
fails when skipped/seen exceeds `error_budget` (checked after min(epoch, ~10/budget) samples and at
each epoch end).

No entrypoint; used by orchestrator.training.driver (TRAIN) and `dinoray bench data`.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings

import numpy as np
import torch

from orchestrator import storage
from orchestrator.data import plan
from orchestrator.data.augment import MultiCrop
from orchestrator.data.index import read_index
from orchestrator.data.samples import read_shard, sample_image
from orchestrator.storage import Store

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: global batch and layouts (reshards on resume); 1 is still read


def _label(sample: dict) -> int:
    """A sample's class (its `cls` entry), -1 where it has none or it is not an integer."""
    try:
        return int(sample["cls"]) if "cls" in sample else -1
    except ValueError:
        return -1


class DataBudgetError(RuntimeError):
    """Too many corrupt samples."""


def resolve_shards(urls, storage_options=None) -> tuple[list[dict], int]:
    """-> ([{store, count}], n_classes) from an index.json URL, a shard folder, a brace pattern or a list."""
    if isinstance(urls, str) and (urls.endswith(".json") or not urls.endswith(".tar")):
        index, folder = read_index(Store(urls, storage_options))
        return [{"store": folder / s["name"], "count": int(s["count"])} for s in index["shards"]], \
            len(index.get("classes", []))
    import braceexpand

    expanded = list(braceexpand.braceexpand(urls)) if isinstance(urls, str) else \
        [u for x in urls for u in braceexpand.braceexpand(x)]
    if not expanded:
        raise ValueError("no shard URLs given; pass an index.json URL, a folder or a brace pattern")
    stores = [Store(u, storage_options) for u in expanded]
    try:
        index, folder = read_index(stores[0].parent)
        counts = {(folder / s["name"]).url: int(s["count"]) for s in index["shards"]}
        n_classes = len(index.get("classes", []))
    except (FileNotFoundError, ValueError, OSError):
        counts, n_classes = {}, 0
    out = []
    for shard in stores:
        if shard.url not in counts:
            warnings.warn(f"{storage.redact(shard.url)} not in an index.json; counting its samples (slow). "
                          f"Build shards with `dinoray shards build` to avoid this.", stacklevel=2)
            counts[shard.url] = sum(1 for _ in read_shard(shard, retries=3, backoff=0.5))
        out.append({"store": shard, "count": counts[shard.url]})
    return out, n_classes


class _EpochStream(torch.utils.data.IterableDataset):
    """One rank's epoch from batch `start_batch` on; each DataLoader worker makes its own batches."""

    def __init__(self, loader: "MultiCropLoader", epoch: int, start_batch: int, layout: tuple):
        self.L, self.epoch, self.start_batch, self.layout = loader, epoch, start_batch, layout

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # DataLoader asks worker 0 first: make it the worker that owns batch `start_batch`.
        first = self.start_batch - self.layout[0]  # local step within the layout
        w = 0 if info is None else (info.id + first) % info.num_workers
        yield from self.L._worker_batches(self.epoch, self.start_batch, w, self.layout)


class MultiCropLoader:
    def __init__(self, urls, *, batch_size: int, crops: dict, patch_size: int, mask: dict, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 0, storage_options: dict | None = None, error_budget: float = 0.01,
                 state: dict | None = None, shuffle_buffer: int = 1000, retries: int = 5, backoff: float = 0.5,
                 prefetch_factor: int = 2, pin_memory: bool = False, with_keys: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.urls = urls
        self.B, self.rank, self.world, self.seed = int(batch_size), int(rank), int(world_size), int(seed)
        self.aug = MultiCrop.from_cfg(crops)
        self.patch = int(patch_size)
        if self.aug.G % self.patch:
            raise ValueError(f"crops.global_size {self.aug.G} is not a multiple of patch_size {self.patch}")
        if set(mask) != {"mask_ratio_min_max", "mask_probability"}:  # ModelCfg holds their defaults
            raise ValueError(f"mask keys {sorted(mask)}; give exactly mask_ratio_min_max and mask_probability")
        self.mask_ratio, self.mask_prob = tuple(mask["mask_ratio_min_max"]), float(mask["mask_probability"])
        self.num_workers, self.error_budget = int(num_workers), float(error_budget)
        self.buffer, self.retries, self.backoff = int(shuffle_buffer), int(retries), float(backoff)
        self.prefetch_factor, self.pin_memory, self.with_keys = prefetch_factor, pin_memory, with_keys
        self.shards, self.n_classes = resolve_shards(urls, storage_options)
        self.total = sum(s["count"] for s in self.shards)
        self.G, self.workers = self.B * self.world, max(1, self.num_workers)  # global batch; plan workers
        self.n_batches = self.total // self.G
        if self.n_batches == 0:
            raise ValueError(f"{self.total} samples over {self.world} ranks give no full batch of {self.B}; "
                             f"lower batch_size or add data")
        self.epoch, self.batch, self.skipped, self.seen = 0, 0, 0, 0
        self.layouts = [[0, self.world, self.workers]]  # this epoch's [start step, world, workers]
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------------------- state
    def __len__(self) -> int:
        return self.n_batches

    def _fingerprint(self) -> dict:
        """What a saved position is only valid for (the world size and worker count may change)."""
        return {"global_batch": self.G, "total": self.total, "n_shards": len(self.shards),
                "shuffle_buffer": self.buffer}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "rank": self.rank, "skipped": self.skipped, "seen": self.seen, "world_size": self.world,
                "batch_size": self.B, "num_workers": self.workers, "layouts": [list(x) for x in self.layouts],
                **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; at another world size or worker count, the rest of the epoch is
        resharded over the new layout (same global order of steps, no sample twice or skipped)."""
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {state.get('version')} is not 1 or {STATE_VERSION}")
        if state["version"] == 1:  # one layout; the global batch is world x per-rank batch
            state = {**state, "global_batch": state["world_size"] * state["batch_size"],
                     "layouts": [[0, state["world_size"], state["num_workers"]]]}
        self.seed = int(state["seed"])
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped, self.seen = int(state.get("skipped", 0)), int(state.get("seen", 0))
        old = {k: state.get(k) for k in self._fingerprint()}
        current = [self.world, self.workers]
        if old != self._fingerprint():
            changed = {k: (old[k], v) for k, v in self._fingerprint().items() if old[k] != v}
            warnings.warn(f"loader state from another global batch or data set {changed}: the position cannot "
                          f"be mapped, starting epoch {self.epoch + 1} (rest of epoch {self.epoch} skipped)",
                          stacklevel=2)
            if self.batch > 0:
                self.epoch, self.batch = self.epoch + 1, 0
            self.layouts = [[0, *current]]
        else:
            self.layouts = [[int(v) for v in x] for x in state["layouts"]]
            if self.layouts[-1][1:] != current:  # reshard the rest of the epoch from this step on
                if self.layouts[-1][0] == self.batch:  # no step was taken in the last layout
                    self.layouts.pop()
                self.layouts.append([self.batch, *current])
        if self.batch >= self.n_batches:
            self.epoch, self.batch, self.layouts = self.epoch + 1, 0, [[0, *current]]

    # -------------------------------------------------------------------------------- plan
    def _layout(self) -> tuple:
        """(start step, layout number, sorted positions) of the layout the current epoch reads with."""
        positions = plan.unused_positions(self.layouts, total=self.total, global_batch=self.G, seed=self.seed,
                                          epoch=self.epoch, buffer=self.buffer)[-1]
        return self.layouts[-1][0], len(self.layouts) - 1, positions

    def _read(self, ranges):
        """Samples at the given positions of each shard, one pass per shard (None marks a lost sample)."""
        for shard, spans in ranges:
            lo, hi = spans[0][0], spans[-1][1]
            samples = read_shard(shard["store"], lo, hi, self.retries, self.backoff)
            if len(spans) == 1:
                yield from samples
                continue
            spans = iter(spans)
            a, b = next(spans)
            for pos, sample in enumerate(samples, lo):
                while pos >= b:
                    a, b = next(spans)
                if pos >= a:
                    yield sample

    def _worker_batches(self, epoch: int, start_batch: int, w: int, layout: tuple):
        """Worker w's batches of this rank from `start_batch` on: its chunk of the layout, read in
        position order through its seeded shuffle buffer; earlier batches are replayed undecoded."""
        start, number, positions = layout
        steps_left = self.n_batches - start
        mine = plan.worker_positions(positions, steps_left, self.B, self.rank, w, self.workers)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        rng = plan.buffer_rng(self.seed, epoch, self.rank, w, number)
        stream = plan.shuffled(self._read(plan.shard_ranges(mine, self.shards, order)), rng, self.buffer)
        last_good = None
        for j in (start + k for k in plan.worker_steps(w, steps_left, self.workers)):
            raw = list(itertools.islice(stream, self.B))
            if len(raw) < self.B:
                raise RuntimeError(f"rank {self.rank} worker {w}: shard stream ended early at batch {j}; "
                                   f"run `dinoray shards verify`")
            if j < start_batch:
                continue  # replayed without decoding: exact resume
            batch, last_good = self._make_batch(raw, epoch, j, last_good)
            yield batch

    # ------------------------------------------------------------------------------- batch
    def _make_batch(self, raw, epoch, j, last_good):
        rng = np.random.default_rng([self.seed, epoch, self.rank, j])
        samples = [(s, im[1]) for s in raw if s is not None and (im := sample_image(s)) is not None]
        plans = []
        for (s, _), planned in zip(samples, self.aug.plan_images([data for _, data in samples], rng)):
            if isinstance(planned, Exception):
                log.debug("corrupt sample skipped: %s", planned)  # any decoder error means a corrupt sample
            else:
                plans.append((*planned, _label(s), s.get("__key__")))
                last_good = s
        bad = len(raw) - len(plans)
        if not plans:
            if last_good is None:
                raise DataBudgetError(f"batch {j} of epoch {epoch} (rank {self.rank}) has no decodable sample; "
                                      f"run `dinoray shards verify` on {storage.redact(str(self.urls))}")
            planned = self.aug.plan_images([sample_image(last_good)[1]], rng)[0]
            if isinstance(planned, Exception):
                raise planned
            plans = [(*planned, _label(last_good), last_good.get("__key__"))]
        n_ok = len(plans)
        plans += [plans[k % n_ok] for k in range(self.B - n_ok)]  # corrupt samples' places: valid ones of this batch
        images, boxes, flips, labels, keys = zip(*plans)
        g, lc = self.aug.resize_crops(list(images), np.stack(boxes), np.stack(flips))
        g = g.transpose(0, 1).flatten(0, 1)  # crop-major: crop 0 of every image, then crop 1 ...
        lc = lc.transpose(0, 1).flatten(0, 1)
        g, lc = self.aug.photometric(g, lc, rng)
        from model.masking import collate_masks

        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, self.rank, j, 2])
                                                .generate_state(1)[0]))
        masks = collate_masks(g.shape[0], self.aug.G // self.patch, gen, mask_ratio_min_max=self.mask_ratio,
                              mask_probability=self.mask_prob)
        batch = {"global_crops": g, "local_crops": lc, **masks, "labels": torch.tensor(labels, dtype=torch.int64),
                 "_skipped": bad, "_index": j}
        if self.with_keys:
            batch["keys"] = list(keys)
        return batch, last_good

    # ---------------------------------------------------------------------------- iterate
    def _check_budget(self, final: bool) -> None:
        warm = min(self.n_batches * self.B, max(100, math.ceil(10 / max(self.error_budget, 1e-9))))
        if self.seen and (final or self.seen >= warm) and self.skipped > self.error_budget * self.seen:
            raise DataBudgetError(
                f"{self.skipped} of {self.seen} samples ({100 * self.skipped / self.seen:.2f}%) were corrupt, "
                f"over the error budget of {100 * self.error_budget:.2f}%; run `dinoray shards verify "
                f"{storage.redact(str(self.urls))}` and rebuild the bad shards, or raise data.error_budget")

    def __iter__(self):
        epoch, start = self.epoch, self.batch
        ds = _EpochStream(self, epoch, start, self._layout())
        if self.num_workers > 0:
            it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                  prefetch_factor=self.prefetch_factor,
                                                  pin_memory=self.pin_memory, persistent_workers=False))
        else:
            it = iter(ds)
        for batch in it:
            j = batch.pop("_index")
            if j != self.batch:
                raise RuntimeError(f"loader got batch {j}, expected {self.batch} (worker order broken)")
            self.skipped += batch.pop("_skipped")
            self.seen += self.B
            self.batch += 1
            self._check_budget(final=False)
            yield batch
        if self.batch != self.n_batches:
            raise RuntimeError(f"epoch {epoch} ended after {self.batch} of {self.n_batches} batches on rank "
                               f"{self.rank}; shards changed under index.json? run `dinoray shards verify`")
        self._check_budget(final=True)
        self.epoch, self.batch, self.layouts = epoch + 1, 0, [[0, self.world, self.workers]]

    def forever(self):
        """Endless iterator over epochs (for step-based training loops)."""
        while True:
            yield from self
