"""Stochastic depth by whole samples, as the reference does it: the residual branch runs only on the
kept rows of the batch and is rescaled. On CPU the kept rows are taken as contiguous runs (slices,
each output row written once) instead of row gathers and `index_add`, which are slow there; the values
and gradients are the same (tests/test_model_speed.py).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _kept_runs(idx: Tensor, B: int) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive kept rows (idx: the kept rows, any order)."""
    kept = torch.zeros(B + 1, dtype=torch.bool)
    kept[idx.cpu()] = True
    runs, start = [], None
    for i, k in enumerate(kept.tolist()):
        if k and start is None:
            start = i
        elif not k and start is not None:
            runs.append((start, i))
            start = None
    return runs


# _take_runs and _scatter_runs work on 2-D views (rows of one flattened sample): the CPU `cat` of 2-D
# contiguous pieces is a plain copy, 3x faster than the same `cat` of [n, N, D] slices (torch 2.13).
def _take_runs(x: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    if len(runs) == 1:
        return x[runs[0][0]:runs[0][1]]
    flat = x.reshape(x.shape[0], -1)
    return torch.cat([flat[a:b] for a, b in runs]).view((-1,) + tuple(x.shape[1:]))


def _kept_and_dropped(runs: list[tuple[int, int]], B: int) -> list[tuple[int, int, bool]]:
    """[start, stop, kept] of every run of rows, kept or dropped, in order (covering 0..B)."""
    out, pos = [], 0
    for a, b in runs:
        if a > pos:
            out.append((pos, a, False))
        out.append((a, b, True))
        pos = b
    if pos < B:
        out.append((pos, B, False))
    return out


def _scatter_runs(y: Tensor, base: Tensor | None, runs: list[tuple[int, int]], shape) -> Tensor:
    """A new [B, ...] tensor in base's dtype (y's without base): y's rows on the rows in runs (plus base's
    there, if given), base's rows (or zeros) elsewhere. Each row is written once: no zero-fill or copy of
    the whole tensor first, and a bf16 y is promoted inside the addition rather than by a cast first."""
    out = (y if base is None else base).new_empty(shape)
    flat, yflat, pos = out.view(shape[0], -1), y.reshape(y.shape[0], -1), 0
    bflat = base.reshape(shape[0], -1) if base is not None else None
    for a, b, kept in _kept_and_dropped(runs, shape[0]):
        if kept:
            if bflat is None:
                flat[a:b].copy_(yflat[pos:pos + b - a])
            else:
                torch.add(bflat[a:b], yflat[pos:pos + b - a], out=flat[a:b])
            pos += b - a
        elif bflat is None:
            flat[a:b].zero_()
        else:
            flat[a:b].copy_(bflat[a:b])
    return out


class _TakeRuns(torch.autograd.Function):
    """Rows in runs, one `cat`; backward: the gradient's rows back in place, zeros for the others
    (autograd's own backward of slicing would zero-fill and add a full-size gradient per run)."""

    @staticmethod
    def forward(ctx, x, runs):
        ctx.runs, ctx.shape = runs, x.shape
        return _take_runs(x, runs)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_runs(grad, None, ctx.runs, ctx.shape), None


class _AddRuns(torch.autograd.Function):
    """x + y on the rows in runs (y holds those rows, in order), x elsewhere; backward: x's gradient
    as is, y's = the gradient's rows in runs (one `cat`)."""

    @staticmethod
    def forward(ctx, x, y, runs):
        ctx.runs = runs
        return _scatter_runs(y, x, runs, x.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, _take_runs(grad, ctx.runs), None


def add_subset_residual(x: Tensor, idx: Tensor, branch, scale: float) -> Tensor:
    """x + scale * branch(x[idx]) on the rows idx (the kept samples), x unchanged elsewhere; `branch`
    takes the rows and `scale` (Block's branches fold it into their output projection).

    The same numbers as `torch.index_add(x, 0, idx, branch(x[idx]) * scale)` (the rows reach the
    branch in ascending order), but the kept samples are taken as the few contiguous runs between the
    dropped ones: one copy each way instead of row gathers and scatters, whose CPU kernels (and
    their backward: index_select, index_put into a zero-filled gradient) cost several passes each.
    """
    runs = _kept_runs(idx, x.shape[0])
    return _AddRuns.apply(x, branch(_TakeRuns.apply(x, runs), scale), runs)
