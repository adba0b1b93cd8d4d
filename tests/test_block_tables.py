"""DeviceBlockTables: the step's block tables as one device tensor updated in place, against
the tables themselves over random step sequences (growth, copy-on-write of the last block,
sequences leaving and returning, rewritten tables, reused rows)."""

import random

import torch

from mapo_fast.rollout.block_tables import DeviceBlockTables, _changed_from


def test_changed_from():
    assert _changed_from([1, 2], [1, 2, 3]) == 2      # extended
    assert _changed_from([1, 2], [1, 9, 3]) == 1      # last entry replaced (copy-on-write)
    assert _changed_from([1, 2, 3], [7, 2, 3]) == 0   # rewritten
    assert _changed_from([1, 2, 3], [1, 2]) == 0      # shorter: rewritten
    assert _changed_from([], [4]) == 0


def test_random_steps_match_the_tables():
    rng = random.Random(0)
    stats = {}
    dt = DeviceBlockTables(torch.device("cpu"), stats)
    tables = {k: [rng.randrange(1000)] for k in range(12)}
    full = 0  # entries a rebuild of every table every step would send
    for step in range(200):
        keys = rng.sample(sorted(tables), rng.randint(1, len(tables)))
        for k in keys:
            r = rng.random()
            if r < 0.3:
                tables[k].append(rng.randrange(1000))
            elif r < 0.4:
                tables[k][-1] = rng.randrange(1000)
            elif r < 0.42:
                tables[k] = [rng.randrange(1000) for _ in range(rng.randint(1, 9))]
        got = dt.update(keys, [tables[k] for k in keys])
        full += sum(len(tables[k]) for k in keys)
        assert got.dtype == torch.int32 and got.shape[0] == len(keys)
        for i, k in enumerate(keys):
            assert got[i, :len(tables[k])].tolist() == tables[k], (step, k)
    sent = stats["block_table_entries_copied"]
    assert sent < full / 3, (sent, full)


def test_rows_of_absent_sequences_are_given_back_beyond_the_limit():
    stats = {}
    dt = DeviceBlockTables(torch.device("cpu"), stats)
    dt.KEEP_MIN = 4
    for k in range(6):
        dt.update([k], [[k]])
    assert len(dt.rows) <= 4 and 5 in dt.rows and 0 not in dt.rows  # least recent went
    got = dt.update([0, 5], [[0], [5]])  # 0 comes back: copied again, 5 is unchanged
    assert got[:, 0].tolist() == [0, 5] and stats["block_table_entries_copied"] == 7


def test_unchanged_step_copies_nothing():
    stats = {}
    dt = DeviceBlockTables(torch.device("cpu"), stats)
    dt.update(["a", "b"], [[1, 2, 3], [4]])
    before = stats["block_table_entries_copied"]
    assert before == 4
    got = dt.update(["a", "b"], [[1, 2, 3], [4]])
    assert stats["block_table_entries_copied"] == before
    assert got[0].tolist() == [1, 2, 3] and got[1, :1].tolist() == [4]
