"""The micro-batches of each optimizer step, read one step ahead.

Data order: global batch c holds train samples [c·B, (c+1)·B) (B the global batch in sequences);
micro-batch j of data-parallel rank r takes samples c·B + (j·DP + r)·m … + m. The samples of a
step do not depend on DP, so resumed and rescaled runs see the same data; TP and PP peers of a
rank read the same samples. Reading ahead changes only when a batch is read, never which.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from megatron_dyt.layout import BatchLayout

Pair = tuple[torch.Tensor, torch.Tensor]


class StepBatches:
    """The micro-batches of one optimizer step for this data-parallel rank.

    With `read_ahead` a background thread gathers the next batch's samples while the GPU
    trains on this one; on CUDA they are put in pinned memory, so the copy to the GPU is
    non-blocking and the loop never waits on the disk or on a pageable copy. A batch other than
    the one read ahead (after a rewind) is read on the spot and the early read dropped.
    """

    def __init__(
        self,
        dataset,
        layout: BatchLayout,
        dp_rank: int,
        device: torch.device,
        read_ahead: bool = False,
    ):
        self.dataset = dataset
        self.layout = layout
        self.dp_rank = dp_rank
        self.device = device
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, "read-ahead") if read_ahead else None
        self._ahead: tuple[int, Future[list[Pair]]] | None = None

    def _micro_batch(self, first_sample: int) -> Pair:
        samples = [
            self.dataset[i] for i in range(first_sample, first_sample + self.layout.micro_batch)
        ]
        tokens = torch.stack([torch.as_tensor(s["tokens"], dtype=torch.long) for s in samples])
        labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.long) for s in samples])
        if self.pin:
            tokens, labels = tokens.pin_memory(), labels.pin_memory()
        return tokens, labels

    def read(self, batch: int) -> list[Pair]:
        """Batch `batch`'s micro-batches for this rank, on the host."""
        lay = self.layout
        base = batch * lay.global_batch
        return [
            self._micro_batch(base + (j * lay.data_parallel + self.dp_rank) * lay.micro_batch)
            for j in range(lay.grad_accum)
        ]

    def _exists(self, batch: int) -> bool:
        return (batch + 1) * self.layout.global_batch <= len(self.dataset)

    def for_step(self, batch: int) -> list[Pair]:
        """Batch `batch` on the device (copies queued, not waited for); starts reading
        `batch + 1`."""
        ahead, self._ahead = self._ahead, None
        host = ahead[1].result() if ahead is not None and ahead[0] == batch else self.read(batch)
        if self._pool is not None and self._exists(batch + 1):
            self._ahead = (batch + 1, self._pool.submit(self.read, batch + 1))
        return [
            (t.to(self.device, non_blocking=self.pin), lab.to(self.device, non_blocking=self.pin))
            for t, lab in host
        ]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._ahead = None
