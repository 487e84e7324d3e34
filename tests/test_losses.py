"""VM losses: hand-computed values, ExFM aux-head routing, and rows without an FM logit."""

from __future__ import annotations

import math

import torch

from loopfm.models.losses import bce, kd_loss, vm_loss

LOG2 = math.log(2.0)


def test_values_by_hand():
    zero = torch.zeros(3)
    assert math.isclose(bce(zero, torch.tensor([1.0, 0.0, 1.0])).item(), LOG2, rel_tol=1e-6)
    assert math.isclose(kd_loss(zero, zero, 1.0).item(), LOG2, rel_tol=1e-6)
    # student 2, teacher 2, T = 2: BCE(logit 1, target sigmoid(1)) = entropy of sigmoid(1)
    p = 1 / (1 + math.exp(-1))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert math.isclose(kd_loss(torch.tensor([2.0]), torch.tensor([2.0]), 2.0).item(), h, rel_tol=1e-6)
    # student 0 against a confident teacher: target ~1, loss ~log 2 still (logit 0 => p 0.5)
    s, t = torch.tensor([1.0]), torch.tensor([-3.0])
    q = 1 / (1 + math.exp(3))
    expect = -(q * math.log(1 / (1 + math.exp(-1))) + (1 - q) * math.log(1 - 1 / (1 + math.exp(-1))))
    assert math.isclose(kd_loss(s, t, 1.0).item(), expect, rel_tol=1e-6)


def test_vm_loss_total_and_parts():
    out = {"logit": torch.zeros(2)}
    batch = {"label": torch.tensor([1.0, 0.0]), "kd_logit": torch.zeros(2)}
    total, parts = vm_loss(out, batch, use_kd=True, kd_lambda=0.5, temperature=1.0)
    assert math.isclose(total.item(), 1.5 * LOG2, rel_tol=1e-6)
    assert (math.isclose(parts["bce"].item(), LOG2, rel_tol=1e-6)
            and math.isclose(parts["kd"].item(), LOG2, rel_tol=1e-6))
    total, parts = vm_loss(out, batch, use_kd=False, kd_lambda=0.5, temperature=1.0)
    assert math.isclose(total.item(), LOG2, rel_tol=1e-6) and "kd" not in parts


def test_aux_head_takes_the_kd_term_and_only_it():
    logit = torch.zeros(4, requires_grad=True)
    aux = torch.zeros(4, requires_grad=True)
    batch = {"label": torch.tensor([1.0, 0.0, 1.0, 0.0]), "kd_logit": torch.tensor([3.0, 3.0, -3.0, -3.0])}
    total, _ = vm_loss({"logit": logit, "aux_logit": aux}, batch, use_kd=True, kd_lambda=1.0, temperature=1.0)
    total.backward()
    # serving head: d BCE / d logit = (sigmoid(0) - y) / B, untouched by the teacher
    assert torch.allclose(logit.grad, (0.5 - batch["label"]) / 4)
    assert torch.allclose(aux.grad, (0.5 - torch.sigmoid(batch["kd_logit"])) / 4)
    # without the aux head both terms land on the serving head
    logit.grad = None
    vm_loss({"logit": logit}, batch, use_kd=True, kd_lambda=1.0, temperature=1.0)[0].backward()
    assert torch.allclose(logit.grad, (0.5 - batch["label"]) / 4 + (0.5 - torch.sigmoid(batch["kd_logit"])) / 4)


def test_nan_teacher_rows_are_ignored():
    student = torch.tensor([0.0, 5.0, 0.0], requires_grad=True)
    teacher = torch.tensor([0.0, float("nan"), 0.0])
    loss = kd_loss(student, teacher, 1.0)
    assert math.isclose(loss.item(), LOG2, rel_tol=1e-6)
    loss.backward()
    assert student.grad[1] == 0 and torch.isfinite(student.grad).all()
    all_nan = kd_loss(student, torch.full((3,), float("nan")), 1.0)
    assert all_nan.item() == 0.0
    batch = {"label": torch.zeros(3), "kd_logit": teacher}
    total, parts = vm_loss({"logit": student.detach()}, batch, use_kd=True, kd_lambda=1.0, temperature=1.0)
    assert torch.isfinite(total) and math.isclose(parts["kd"].item(), LOG2, rel_tol=1e-6)
