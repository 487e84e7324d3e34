"""VM losses: L = BCE(y_V, y) + lambda * L_KD(y_V, y_F), with ExFM's auxiliary-head routing.

With an auxiliary head the serving head `logit` learns from the true label only and
`aux_logit` from the FM only; both share the trunk, which is how the teacher still helps
serving without its calibration leaking into the served score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logit, label.to(logit.dtype))


def kd_loss(student_logit: torch.Tensor, teacher_logit: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean BCE of student/T against sigmoid(teacher/T); rows with a NaN teacher (no FM logit) are skipped."""
    has = ~torch.isnan(teacher_logit)
    target = torch.sigmoid(torch.where(has, teacher_logit, torch.zeros_like(teacher_logit)) / temperature)
    per = F.binary_cross_entropy_with_logits(student_logit / temperature, target.to(student_logit.dtype),
                                             reduction="none")
    return torch.where(has, per, torch.zeros_like(per)).sum() / has.sum().clamp_min(1)


def vm_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], use_kd: bool, kd_lambda: float,
            temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {"bce", "kd", "total"} detached); KD goes to aux_logit when the model has that head."""
    label_loss = bce(out["logit"], batch["label"])
    parts = {"bce": label_loss.detach()}
    total = label_loss
    if use_kd:
        student = out.get("aux_logit", out["logit"])
        kd = kd_loss(student, batch["kd_logit"], temperature)
        total = total + kd_lambda * kd
        parts["kd"] = kd.detach()
    parts["total"] = total.detach()
    return total, parts
