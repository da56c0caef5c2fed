"""DINOv2 losses: DINO CLS loss, teacher centering (softmax EMA / Sinkhorn-Knopp), iBOT, KoLeo, Gram.

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
    only the scaling vectors a [K], b [B] iterated (matrix-vector products): two passes over the
    [B, K] matrix plus one read per half-iteration, where normalising Q itself costs several. Where E
    underflows so far that a scaling factor is not finite (a sample whose logits / T lie ~87 or more
    below every prototype's best), the log-domain algorithm (`sinkhorn_knopp_log`) computes the result
    instead, on every rank.
    """
    x = teacher_logits.float() / teacher_temp  # B_local x K
    if x.shape[0]:
        m = x.amax(dim=0, keepdim=True)
    else:
        m = x.new_full((1, x.shape[1]), float("-inf"))
    if _world(process_group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x.sub_(m))  # every prototype's largest entry (over the global batch) is 1
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


class _SoftCrossEntropy(torch.autograd.Function):
    """-sum(t * log_softmax(s / T)) per row, in float32 (float64 stays float64), as one autograd node.

    The [N, K] logits (K = 65,536 prototypes) are the largest activations of a step. Autograd's
    chain (cast, divide, log_softmax, multiply by t, sum) passes over them five times forward and
    four backward; here the division is in place on the float32 copy, <t, lsm> is one reduction, and
    the backward forms (softmax * sum(t) - t) / T in place in one new tensor. bench/model.py's
    iBOT logits, [619, 65,536] bf16 on 2 CPU threads: 534 -> 380-404 ms forward + backward; on an
    H200 ([2,400, 131,072]) 7.07 -> 7.17 ms (equal)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temp: float) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 from bf16 (fp64 stays, for gradcheck)
        x = logits.to(dtype)
        x = x.div_(temp) if x is not logits else x / temp
        t = targets.to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run vecdot in bf16
            lsm = torch.log_softmax(x, dim=-1)
            loss = -torch.linalg.vecdot(t, lsm)
        ctx.save_for_backward(lsm, t)
        ctx.temp, ctx.dtype = temp, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        lsm, t = ctx.saved_tensors
        scale = (grad.to(lsm.dtype) / ctx.temp).unsqueeze(-1)
        g = torch.exp(lsm).mul_(t.sum(dim=-1, keepdim=True) * scale)
        g.addcmul_(t, scale, value=-1.0)
        return g.to(ctx.dtype), None, None


def cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Per-row cross entropy -sum(t * log_softmax(s / T)) -> [N] (float32; no gradient to t)."""
    return _SoftCrossEntropy.apply(student_logits, teacher_probs.detach(), student_temp)


def dino_loss(student_chunks: list[Tensor], teacher_chunks: list[Tensor], student_temp: float = 0.1) -> Tensor:
    """Sum over every (student chunk, teacher chunk) pair of the mean cross entropy.

    Cross entropy is linear in the target, so each student chunk meets the sum of the teacher chunks
    once (one pass over its logits, not one per teacher chunk)."""
    if not student_chunks or not teacher_chunks:
        return student_chunks[0].new_zeros((), dtype=torch.float32) if student_chunks else torch.zeros(())
    t_sum = teacher_chunks[0].float()
    for t in teacher_chunks[1:]:
        t_sum = t_sum + t.float()
    return sum(cross_entropy(t_sum, s, student_temp).mean() for s in student_chunks)


def multicrop_dino_loss(student_logits: Tensor, teacher_probs: Tensor, n_global: int, n_local: int,
                        student_temp: float) -> tuple[Tensor, Tensor]:
    """The DINO terms of a multi-crop batch -> (dino_global, dino_local).

    `student_logits` [(n_global + n_local) * B, K]: the global crops' rows first, crop by crop, then
    the local crops'; `teacher_probs` [n_global * B, K]: the teacher's centred global crops. Every
    student global crop is compared with the other global crops' targets, every local crop with all
    of them; both terms are divided by the total number of pairs, as in the reference."""
    n_rows = teacher_probs.shape[0]
    s_glob, s_loc = student_logits.split([n_rows, student_logits.shape[0] - n_rows])
    n_terms = n_global * (n_global - 1) + n_global * n_local
    s_chunks, t_chunks = s_glob.chunk(n_global), teacher_probs.chunk(n_global)
    dino_global = sum(dino_loss([s_chunks[i]], [t_chunks[j]], student_temp)
                      for i in range(n_global) for j in range(n_global) if i != j) / max(n_terms, 1)
    dino_local = (dino_loss(list(s_loc.chunk(n_local)), list(t_chunks), student_temp) / n_terms
                  if n_local else student_logits.sum() * 0.0)
    return dino_global, dino_local


def ibot_loss(student_masked_logits: Tensor, teacher_masked_probs: Tensor, masks_weight: Tensor,
              n_images: int, student_temp: float = 0.1) -> Tensor:
    """iBOT masked-patch loss: per-token cross entropy on masked tokens only, each image's tokens
    weighted 1/(number masked in that image), summed and divided by the number of images."""
    ce = cross_entropy(teacher_masked_probs, student_masked_logits, student_temp)
    return (ce * masks_weight.float()).sum() / max(int(n_images), 1)


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
