"""qlora.data: train/val split, epoch batch order (seeded, grouped by length, resumable) and collate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qlora.data import MEGA_BATCH, BatchPlan, collate, epoch_batches, split_train_val


def test_split_train_val_is_deterministic_disjoint_and_complete():
    data = list(range(100))
    train, val = split_train_val(data, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == data and train == sorted(train)
    assert split_train_val(data, 0.1, seed=3) == (train, val)
    assert split_train_val(data, 0.1, seed=4)[1] != val
    assert split_train_val(data, 0.0, seed=3) == (data, [])
    assert [len(p) for p in split_train_val(data[:3], 0.01, seed=0)] == [2, 1]  # at least one held out
    assert split_train_val(data[:1], 0.5, seed=0) == ([0], [])


LENGTHS = [int(x) for x in torch.randint(5, 500, (1234,), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("group", [True, False])
def test_each_example_exactly_once_per_epoch(group):
    for epoch in range(3):
        batches = epoch_batches(LENGTHS, 8, seed=1, epoch=epoch, group_by_length=group)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(LENGTHS)))
        assert all(len(b) <= 8 for b in batches) and len(batches) == -(-len(LENGTHS) // 8)


def test_batch_order_depends_on_seed_and_epoch_only():
    a = epoch_batches(LENGTHS, 8, seed=1, epoch=2)
    assert a == epoch_batches(LENGTHS, 8, seed=1, epoch=2)
    assert a != epoch_batches(LENGTHS, 8, seed=1, epoch=3)
    assert a != epoch_batches(LENGTHS, 8, seed=2, epoch=2)


def test_batch_order_is_the_same_in_a_new_process():
    code = (
        "import torch, json; from qlora.data import epoch_batches;"
        "L=[int(x) for x in torch.randint(5, 500, (1234,), generator=torch.Generator().manual_seed(0))];"
        "print(json.dumps(epoch_batches(L, 8, seed=1, epoch=2)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == epoch_batches(LENGTHS, 8, seed=1, epoch=2)


def test_group_by_length_groups_but_does_not_sort_the_run():
    grouped = epoch_batches(LENGTHS, 8, seed=1, epoch=0, group_by_length=True)
    plain = epoch_batches(LENGTHS, 8, seed=1, epoch=0, group_by_length=False)

    def padding(batches):
        return sum(len(b) * max(LENGTHS[i] for i in b) - sum(LENGTHS[i] for i in b) for b in batches)

    assert padding(grouped) * 10 < padding(plain)  # far less padding
    assert max(LENGTHS[i] for i in grouped[0]) == max(LENGTHS)  # the largest batch runs first
    heads = [max(LENGTHS[i] for i in b) for b in grouped[1:]]
    assert heads != sorted(heads) and heads != sorted(heads, reverse=True)
    window = MEGA_BATCH * 8  # batches come from length-sorted windows: each is sorted inside
    assert all([LENGTHS[i] for i in b] == sorted((LENGTHS[i] for i in b), reverse=True) for b in grouped)
    assert window == 400


def test_batch_plan_resumes_at_a_position():
    plan = BatchPlan(tuple(LENGTHS[:50]), batch_size=8, seed=5)
    assert plan.batches_per_epoch == 7
    it = plan.iterate()
    run = [next(it) for _ in range(20)]
    assert [(e, b) for e, b, _ in run[:9]] == [(0, i) for i in range(7)] + [(1, 0), (1, 1)]
    resumed = plan.iterate(*run[12][:2])
    assert [next(resumed) for _ in range(8)] == run[12:20]
    assert next(plan.iterate(0, 7)) == run[7]  # a saved "next batch" past the end rolls over
    assert run[0][2] == plan.epoch(0)[0]
    examples = [{"input_ids": [1] * n} for n in LENGTHS[:50]]
    assert BatchPlan.for_examples(examples, 8, 5) == plan


def test_collate_right_pads():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
