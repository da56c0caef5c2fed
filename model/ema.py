"""EMA of a trained tower over flat lists of tensors (works on the local shards of a sharded model),
and `EMAMetaArch`, the tower management SSLMetaArch and DistillMetaArch share."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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


def freeze_(module: nn.Module) -> nn.Module:
    """No gradients, eval mode, no stochastic depth: a tower that is only ever run forward."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if hasattr(m, "drop_path"):
            m.drop_path = 0.0
    return module


class EMAMetaArch(nn.Module):
    """A trained `student` (nn.ModuleDict) and an EMA copy of it, the tower named `EMA_TOWER`
    ("teacher" in SSLMetaArch, "student_ema" in DistillMetaArch), plus frozen towers (`FROZEN`) that
    stay in eval mode whatever `train()` is told. The EMA tower is the model kept after training."""

    EMA_TOWER = "teacher"
    FROZEN: tuple[str, ...] = ("teacher",)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.FROZEN:
            tower = getattr(self, name, None)
            if tower is not None:
                tower.eval()
        return self

    def ema_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """(EMA tensors, student tensors) in matching order, for `ema_update_`."""
        ema = getattr(self, self.EMA_TOWER)
        t, s = [], []
        for k in ema:
            t += list(ema[k].parameters())
            s += list(self.student[k].parameters())
        return t, s

    @torch.no_grad()
    def update_ema_(self, momentum: float) -> None:
        """One EMA step of the EMA tower towards the student (momentum 0 copies the student)."""
        ema_update_(*self.ema_pairs(), momentum)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise the student (e.g. after `to_empty` from the meta device) and copy it into
        the EMA tower."""
        for m in self.student.values():
            m.init_weights() if hasattr(m, "init_weights") else m.reset_parameters()
        self.update_ema_(0.0)

    def final_backbone(self) -> nn.Module:
        """The backbone DINOv2 keeps after training: the EMA tower's."""
        return getattr(self, self.EMA_TOWER)["backbone"]
