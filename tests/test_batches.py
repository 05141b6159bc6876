"""The micro-batches of a step: reading ahead changes when a batch is read, never which."""

import torch

from megatron_dyt.layout import BatchLayout
from megatron_dyt.training.batches import StepBatches


class Samples:
    """Sample i is the sequence [i, i+1, i+2] (labels shifted by one), and reads are logged."""

    def __init__(self, n: int):
        self.n, self.reads = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads.append(i)
        return {"tokens": [i, i + 1, i + 2], "labels": [i + 1, i + 2, i + 3]}


LAYOUT = BatchLayout(global_batch=8, micro_batch=2, grad_accum=2, data_parallel=2)


def _first_samples(pairs) -> list[list[int]]:
    return [tokens[:, 0].tolist() for tokens, _ in pairs]


def test_the_data_order_of_a_step():
    """Micro-batch j of DP rank r takes samples c·B + (j·DP + r)·m … + m."""
    rank1 = StepBatches(Samples(32), LAYOUT, dp_rank=1, device=torch.device("cpu"))
    assert _first_samples(rank1.for_step(2)) == [[18, 19], [22, 23]]
    tokens, labels = rank1.for_step(0)[0]
    assert tokens.dtype == torch.long and torch.equal(labels, tokens + 1)


def test_reading_ahead_gives_the_same_batches_in_any_order_of_requests():
    """In order, after a rewind (a batch other than the one read ahead) and at the end of the
    data (nothing past it is read)."""
    order = [0, 1, 2, 1, 2, 3, 0, 3]
    plain = StepBatches(Samples(32), LAYOUT, 0, torch.device("cpu"))
    data = Samples(32)
    ahead = StepBatches(data, LAYOUT, 0, torch.device("cpu"), read_ahead=True)
    try:
        for batch in order:
            want, got = plain.for_step(batch), ahead.for_step(batch)
            for (t1, l1), (t2, l2) in zip(want, got, strict=True):
                assert torch.equal(t1, t2) and torch.equal(l1, l2)
        ahead.for_step(3)  # the last batch: nothing after it is read
    finally:
        ahead.close()
    assert max(data.reads) < 32
    # batch 2 was asked for twice, each time right after batch 1: both times the read-ahead
    # served it (read twice in all; four times if each request had read it again)
    assert data.reads.count(16) == 2
