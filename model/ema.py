"""Teacher EMA update over flat lists of tensors (works on the local shards of a sharded model)."""

from __future__ import annotations

import torch
from torch import Tensor


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@torch.no_grad()
def ema_update_(teacher_tensors: list[Tensor], student_tensors: list[Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place (torch._foreach_lerp_).
    momentum=1 keeps the teacher, momentum=0 copies the student."""
    if len(teacher_tensors) != len(student_tensors):
        raise ValueError(f"EMA needs matching lists: {len(teacher_tensors)} teacher vs "
                         f"{len(student_tensors)} student tensors")
    t = [_local(x) for x in teacher_tensors]
    s = [_local(x).detach() for x in student_tensors]
    for a, b in zip(t, s):
        if a.shape != b.shape:
            raise ValueError(f"EMA shape mismatch: teacher {tuple(a.shape)} vs student {tuple(b.shape)}")
    if not t:
        return
    if any(a.dtype != b.dtype for a, b in zip(t, s)):
        s = [b.to(a.dtype) for a, b in zip(t, s)]
    torch._foreach_lerp_(t, s, 1.0 - float(momentum))
