"""DINOv2 losses: teacher centering (softmax EMA / Sinkhorn-Knopp), the heads' prototype cross entropy
(DINO on CLS tokens, iBOT on masked patches; fused with the heads' last layer), KoLeo, Gram.

Every loss computes in float32 (inputs are cast), so it is safe under bf16 autocast.
Collectives run only when torch.distributed is initialised and the group has more than one rank;
nothing here creates a process group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# The names of the loss terms a meta-architecture's forward returns in `parts` (each present only
# where the model computes it: gram with gram_loss_weight > 0, feature in distillation). Metrics,
# plots and the training loop use this one tuple.
LOSS_PARTS = ("dino_global", "dino_local", "ibot", "koleo", "gram", "feature")


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce_(t: Tensor, group) -> Tensor:
    if _world(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _logsumexp_over_samples(logq: Tensor, group) -> Tensor:
    """log(sum over the global batch) of exp(logq) [K, B_local] -> [K, 1]."""
    if logq.shape[1]:
        m = logq.amax(dim=1, keepdim=True)
    else:
        m = logq.new_full((logq.shape[0], 1), float("-inf"))
    if _world(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = _all_reduce_(torch.exp(logq - m).sum(dim=1, keepdim=True), group)
    return m + torch.log(s)


# Sinkhorn-Knopp: a column max of a [B, K] matrix in one call is a strided reduction, 3-4x slower than
# the same over blocks of 16 rows ([619 x 65,536] bf16: 34 ms, 9 ms); exp(z) for z <= _EXP_FLOOR
# (log(smallest normal float32) + 1) counts as 0.
_COLUMN_MAX_ROWS = 16
_EXP_FLOOR = math.log(torch.finfo(torch.float32).tiny) + 1.0


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                   process_group=None) -> Tensor:
    """Sinkhorn-Knopp centering of teacher logits [B, K] -> assignment probabilities [B, K].

    The reference's algorithm (Q = exp(logits / T); alternately normalise prototypes to 1/K and
    samples to 1/B; return B * Q). With several ranks in `process_group`, the prototype sums run over
    the global batch, so splitting a batch across ranks (also unequally, e.g. masked tokens) gives
    the 1-rank result. Each returned row sums to 1; columns sum to about B/K (exactly in the limit of
    iterations). The global batch size B only rescales the sample step and cancels in the final B * Q.

    Computed as Q = diag(a) E diag(b) with E = exp(logits / T - per-prototype max) formed once and
    only the scaling vectors a [K], b [B] iterated (matrix-vector products): a few passes to form E
    plus one read per half-iteration, where normalising Q itself costs several per iteration. Where E
    underflows so far that a scaling factor is not finite (a sample whose logits / T lie ~87 or more
    below every prototype's best), the log-domain algorithm (`sinkhorn_knopp_log`) computes the result
    instead, on every rank.
    """
    x = teacher_logits  # B_local x K in its own dtype (bf16 under autocast); read, never written
    if x.shape[0]:  # max(x / T) = max(x) / T: the max of the raw logits, by blocks of rows
        m = torch.stack([rows.amax(dim=0) for rows in x.split(_COLUMN_MAX_ROWS)]).amax(dim=0, keepdim=True).float()
    else:
        m = torch.full((1, x.shape[1]), float("-inf"), device=x.device)
    if _world(process_group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # z = (x - max) / T in float32, one pass: the addition promotes a bf16 input as it writes the new matrix
    z = torch.add(m.mul(-1.0 / teacher_temp), x, alpha=1.0 / teacher_temp)
    # entries whose exp would be subnormal or 0 are 0: a CPU's exp takes ~50-100x longer on arguments
    # below log(smallest normal) (-inf included), and matmuls with subnormal operands ~190x (docs/training.md,
    # fourth CPU round and eighth); sharp teachers (T = 0.02-0.04) put much of z there once the logits
    # spread. Clamped to _EXP_FLOOR (a normal exp) and zeroed after, only where some entry is that low.
    underflow = bool(z.amin() <= _EXP_FLOOR) if z.numel() else False
    if underflow:
        z.clamp_(min=_EXP_FLOOR)
    e = z.exp_()  # each prototype's max is 1
    if underflow:
        F.threshold_(e, 1.01 * math.exp(_EXP_FLOOR), 0.0)  # the clamped entries (1% above: rounding)
    K = e.shape[1]
    b = e.new_ones(e.shape[0], 1)
    a = e.new_ones(K, 1)
    for _ in range(n_iterations):
        a = 1.0 / (_all_reduce_(e.t() @ b, process_group) * K)  # each prototype sums to 1/K
        b = 1.0 / (e @ a)  # each sample sums to 1
    ok = torch.isfinite(a).all() & torch.isfinite(b).all()
    if _world(process_group) > 1:
        ok = ok.float()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=process_group)
    if not bool(ok):
        return sinkhorn_knopp_log(teacher_logits, teacher_temp, n_iterations, process_group)
    return e.mul_(a.t()).mul_(b)


@torch.no_grad()
def sinkhorn_knopp_log(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                       process_group=None) -> Tensor:
    """`sinkhorn_knopp` computed in the log domain, so that sharp logits cannot underflow to 0/0
    (slower: several passes over the [K, B] matrix per iteration)."""
    logq = (teacher_logits.float() / teacher_temp).t()  # K x B_local
    K = logq.shape[0]
    for _ in range(n_iterations):
        logq = logq - _logsumexp_over_samples(logq, process_group) - math.log(K)
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True)  # each sample sums to 1
    return torch.exp(logq).t()


@torch.no_grad()
def softmax_center(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center_(center: Tensor, teacher_logits: Tensor, momentum: float, process_group=None) -> None:
    """EMA centre update with the (global) batch mean of the teacher logits."""
    logits = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
    s = _all_reduce_(logits.sum(dim=0, keepdim=True), process_group)
    n = _all_reduce_(torch.tensor(float(logits.shape[0]), device=logits.device), process_group)
    center.mul_(momentum).add_(s / n.clamp(min=1.0), alpha=1.0 - momentum)


# Rows of logits per block on a CPU: a float32 block of about 1 MiB stays in cache through the block's
# passes (float32 copy, log-softmax, target dot, gradient) and is reused, where whole [N, K] float32
# temporaries are fresh allocations that page-fault on every step (glibc hands blocks over 32 MiB back
# to the OS). [699 x 65,536] rows, fwd + bwd, bf16 autocast, 2 threads: 0.25 / 0.5 / 1 / 2 / 4 MiB
# blocks 339 / 302 / 279-302 / 328 / 402-458 ms, all rows at once 519 ms. Accelerators take blocks of
# 256 MiB: a few launches, and float32 temporaries of that size instead of the whole [N, K] (ViT-g's
# [2,400 x 131,072] iBOT logits are 1.2 GiB in float32).
_CPU_BLOCK_BYTES = 1 << 20
_ACCEL_BLOCK_BYTES = 256 << 20
# On a CPU the [N, K] logits get a row stride of K + 64 elements: with K = 65,536 a row is 128 KiB in
# bf16, a power of two, and the rows of a matmul's tile all fall in the same L1 cache sets. [699 x
# 65,536] bf16, 2 threads, padded against unpadded: x @ w^T 0.86-0.99x, g @ w 0.89-0.97x, g^T @ x 0.85-0.94x.
_CPU_ROW_PAD = 64


class _PrototypeCrossEntropy(torch.autograd.Function):
    """Per-row -sum(t * log_softmax(x @ w^T / T)) for a head's prototype layer, and its gradient.

    The [N, K] logits (K = 65,536 prototypes) are the largest activations of a step. They are formed
    once, in the compute dtype (bf16 under autocast), and overwritten block by block with the gradient
    of each row's cross entropy with respect to them, (softmax * sum(t) - t) / T, computed in float32
    (float64 stays float64, for gradcheck). Backward is then two matmuls, with the rows' incoming
    gradients applied to the [N, D] operands rather than to the [N, K] matrix. The loss and gradients
    are those of autograd through matmul, log_softmax and the target dot (tests/test_model_losses.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, segments: list, temp: float) -> Tensor:
        dev = x.device.type
        cdt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
               else torch.promote_types(x.dtype, w.dtype))
        fdt = torch.promote_types(cdt, torch.float32)
        n_rows = sum(t.shape[0] if i is None else i.shape[0] for t, i in segments)
        if n_rows != x.shape[0]:
            raise ValueError(f"the target segments cover {n_rows} rows, the inputs have {x.shape[0]}")
        with torch.autocast(dev, enabled=False):
            xc, wc = x.to(cdt), w.to(cdt)
            # logits, then (in place, block by block) their gradient
            if dev == "cpu":
                g = xc.new_empty(xc.shape[0], wc.shape[0] + _CPU_ROW_PAD)[:, :wc.shape[0]]
                torch.mm(xc, wc.t(), out=g)
            else:
                g = xc @ wc.t()
            ce = torch.empty(g.shape[0], dtype=fdt, device=x.device)
            K = g.shape[1]
            step = max(1, (_CPU_BLOCK_BYTES if dev == "cpu" else _ACCEL_BLOCK_BYTES) // (4 * max(K, 1)))
            row = 0
            for targets, index in segments:
                n = targets.shape[0] if index is None else index.shape[0]
                for a in range(row, row + n, step):
                    b = min(a + step, row + n)
                    t = (targets[a - row:b - row] if index is None else targets[index[a - row:b - row]]).to(fdt)
                    z = g[a:b].to(fdt).div_(temp)  # (a view of g in float32: overwritten below anyway)
                    lsm = torch.log_softmax(z, dim=-1)
                    ce[a:b] = -torch.linalg.vecdot(t, lsm)
                    grad = lsm.exp_().mul_(t.sum(dim=-1, keepdim=True) / temp).sub_(t, alpha=1.0 / temp)
                    g[a:b].copy_(grad)
                row += n
        ctx.save_for_backward(g, xc, wc)
        ctx.dtypes = (x.dtype, w.dtype)
        return ce

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, xc, wc = ctx.saved_tensors
        r = grad.to(g.dtype).unsqueeze(-1)
        with torch.autocast(g.device.type, enabled=False):
            gx = (g @ wc).mul_(r)
            gw = g.t() @ (xc * r)
        return gx.to(ctx.dtypes[0]), gw.to(ctx.dtypes[1]), None, None


class Targets:
    """The target rows of a head's input rows, in segments covering them in order: (targets [M, K],
    index [n] or None); a segment's row i has the target targets[index[i]] (targets[i] without an
    index). No gradient reaches the targets.

    A plain object rather than a list: FSDP2 casts the floating tensors inside a sharded module's
    list and tuple arguments to its parameter dtype, and targets are float32 probabilities."""

    def __init__(self, *segments: tuple[Tensor, Tensor | None]):
        self.segments = [(t.detach(), i) for t, i in segments]

    def __add__(self, other: "Targets") -> "Targets":
        return Targets(*self.segments, *other.segments)


def prototype_cross_entropy(x: Tensor, w: Tensor, targets: Targets, temp: float) -> Tensor:
    """Per-row cross entropy of the targets against the logits x @ w^T / temp -> [N] (float32).
    x [N, D] (a head's normalised bottleneck), w [K, D] (its prototypes)."""
    return _PrototypeCrossEntropy.apply(x, w, targets.segments, temp)


def dino_targets(teacher_probs: Tensor, n_global: int, n_local: int) -> Targets:
    """The DINO targets of the student's CLS rows (global crops, crop by crop, then the local crops').

    `teacher_probs` [n_global * B, K] are the teacher's centred global crops. Every student global crop
    is compared with each other global crop, every local crop with each global crop; cross entropy is
    linear in its target, so each row meets the sum of its targets once."""
    t = teacher_probs.float().unflatten(0, (n_global, -1))
    B = t.shape[1]
    others = [sum((t[j] for j in range(n_global) if j != i), torch.zeros_like(t[0])) for i in range(n_global)]
    targets = torch.cat(others + [t.sum(0)])
    rows = torch.arange(B, device=t.device)  # built where the targets are: no host copy per step
    index = torch.cat([torch.arange(n_global * B, device=t.device), n_global * B + rows.repeat(n_local)])
    return Targets((targets, index))


def dino_terms(ce_cls: Tensor, n_global: int, n_local: int) -> tuple[Tensor, Tensor]:
    """(dino_global, dino_local) from the per-row cross entropies of `dino_targets`' rows: each the sum
    over its pairs of the mean over the batch, divided by the total number of pairs, as in the
    reference."""
    B = ce_cls.shape[0] // (n_global + n_local)
    n_terms = max(n_global * (n_global - 1) + n_global * n_local, 1)
    glob, loc = ce_cls.split([n_global * B, n_local * B])
    return glob.sum() / (B * n_terms), loc.sum() / (B * n_terms)


def ibot_terms(ce_patch: Tensor, masks_weight: Tensor, n_images: int) -> Tensor:
    """iBOT masked-patch loss from the masked tokens' cross entropies: each image's tokens weighted
    1/(number masked in that image), summed and divided by the number of images."""
    return (ce_patch * masks_weight.float()).sum() / max(int(n_images), 1)


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser on L2-normalised rows of x [B, D]:
    -mean(log(distance to the nearest neighbour)).

    Stays finite where the reference does not: 0 for fewer than 2 points, and the distance is
    sqrt(squared distance + eps), so duplicates give -log(sqrt(eps)) with finite gradients while
    near-duplicates are still pushed apart.
    """
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), p=2, dim=-1, eps=1e-8)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nn_idx = dots.argmax(dim=1)
    sq = (x - x[nn_idx]).square().sum(dim=-1)
    return -0.5 * torch.log(sq + eps).mean()


def gram_loss(student_patches: Tensor, target_patches: Tensor) -> Tensor:
    """Gram anchoring (DINOv3): MSE between the patch-similarity (Gram) matrices of L2-normalised
    student and Gram-teacher patch features, per image. Inputs [B, N, D]."""
    s = F.normalize(student_patches.float(), dim=-1)
    t = F.normalize(target_patches.float(), dim=-1)
    return (s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).square().mean()


def entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of the rows of a probability matrix."""
    p = probs.float().clamp(min=1e-12)
    return -(p * p.log()).sum(dim=-1).mean()
