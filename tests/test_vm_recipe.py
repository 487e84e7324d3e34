"""The VM training recipe, without Ray: the arm registry, regularized id tables, the epoch kept by
valid log loss, and metrics grouped by the raw user id."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopfm.config import ARM_CHANNELS, ARMS, DEFAULT_ARMS, LoopFMConfig, TrainConfig, VMConfig
from loopfm.evaluation.metrics import gauc
from loopfm.models.inputs import InputSpec
from loopfm.models.vm import build_vm
from loopfm.training.loop import EarlyStopping
from loopfm.training.vm import arm_config, arm_of, evaluate_vm, selection_value, vm_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_arm_round_trips_through_its_channels():
    cfg = LoopFMConfig()
    assert set(DEFAULT_ARMS) <= set(ARMS) and len(set(ARM_CHANNELS.values())) == len(ARMS)
    for arm in ARMS:
        assert arm_of(arm_config(cfg, arm, 3).train) == arm
    with pytest.raises(ValueError, match="exclusive"):
        TrainConfig(use_loopfm=True, use_rawseq=True)


def tiny_vm():
    torch.manual_seed(0)
    return build_vm(VMConfig(embed_dim=4, hidden=[8], features=[]),
                    InputSpec({"user_id": 50, "item_id": 20, "category": 3}, history=False))


def test_id_tables_get_embedding_l2_and_dense_layers_weight_decay():
    vm = tiny_vm()
    opt = vm_optimizer(vm, TrainConfig(embedding_l2=1e-3, weight_decay=0.0))
    emb, dense = opt.param_groups
    tables = {id(p) for m in vm.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    assert {id(p) for p in emb["params"]} == tables and emb["weight_decay"] == 1e-3
    assert not tables & {id(p) for p in dense["params"]} and dense["weight_decay"] == 0.0
    # a user row that no batch touches shrinks toward zero under the L2, and stays put without it
    for l2, shrinks in ((1e-2, True), (0.0, False)):
        vm = tiny_vm()
        opt = vm_optimizer(vm, TrainConfig(embedding_l2=l2, lr=1e-2))
        before = vm.inputs.emb.user.weight[7].detach().norm().item()
        batch = {"user": torch.ones(16, dtype=torch.long), "item": torch.randint(1, 20, (16,)),
                 "category": torch.ones(16, dtype=torch.long), "context": torch.zeros(16, 0, dtype=torch.long)}
        for _ in range(50):
            loss = vm(batch)["logit"].pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = vm.inputs.emb.user.weight[7].detach().norm().item()
        assert (after < 0.7 * before) == shrinks, (l2, before, after)


def test_the_kept_epoch_is_the_one_with_the_best_valid_log_loss():
    """Epoch 2 ranks best but is miscalibrated; select_by=logloss keeps epoch 1, auc keeps epoch 2."""
    epochs = [{"auc": 0.70, "logloss": 0.50}, {"auc": 0.71, "logloss": 0.60}, {"auc": 0.69, "logloss": 0.55}]
    for select_by, kept in (("logloss", 0), ("auc", 1)):
        stop = EarlyStopping(patience=5)
        for e, m in enumerate(epochs):
            stop.update(e, selection_value(m, select_by), m)
        assert stop.best_epoch == kept


def test_gauc_groups_by_the_raw_user_id_not_the_vocabulary_index():
    """Users missing from the train vocabulary all share the OOV index: grouped by it they would be one user."""
    rng = np.random.default_rng(0)
    n, users = 400, 40
    uid = rng.integers(1000, 1000 + users, n)
    label = rng.integers(0, 2, n).astype(np.float32)
    vm = tiny_vm()
    batch = {"user": torch.ones(n, dtype=torch.long), "uid": torch.from_numpy(uid),  # every user is OOV
             "item": torch.from_numpy(rng.integers(1, 20, n)), "category": torch.ones(n, dtype=torch.long),
             "context": torch.zeros(n, 0, dtype=torch.long), "label": torch.from_numpy(label)}
    got = evaluate_vm(vm, [batch])
    with torch.no_grad():
        logit = vm(batch)["logit"].numpy()
    assert got["gauc"] == pytest.approx(gauc(uid, label, logit))
    assert abs(got["gauc"] - gauc(np.ones(n), label, logit)) > 1e-3  # one pseudo-user would give another number
