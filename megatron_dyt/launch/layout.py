"""Check that a job's processes fit the config's TP × PP layout before anything is submitted."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dyt.config import Config
from megatron_dyt.layout import LayoutError, batch_layout, data_parallel_size


@dataclass(frozen=True)
class JobLayout:
    nodes: int
    procs_per_node: int
    tensor: int
    pipeline: int
    data: int

    @property
    def world(self) -> int:
        return self.nodes * self.procs_per_node


def job_layout(cfg: Config, nodes: int, procs_per_node: int) -> JobLayout:
    """nodes × processes per node = TP × PP × DP, and the global batch splits over DP.

    Raises LayoutError naming the numbers and the world sizes that would work.
    """
    if nodes < 1 or procs_per_node < 1:
        raise LayoutError(
            f"--nodes={nodes} and processes per node={procs_per_node} must both be at least 1"
        )
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    world = nodes * procs_per_node
    model_parallel = tp * pp
    if world % model_parallel:
        options = ", ".join(str(model_parallel * k) for k in range(1, 5))
        raise LayoutError(
            f"{nodes} node(s) × {procs_per_node} process(es) per node = {world} processes, which"
            f" is not a multiple of parallel.tensor × parallel.pipeline = {tp} × {pp} ="
            f" {model_parallel}; use a world size of {options}, … or change the layout"
        )
    data = data_parallel_size(cfg.parallel, world)
    batch_layout(cfg, data)  # the global batch must split into micro-batches over DP ranks
    return JobLayout(nodes, procs_per_node, tp, pp, data)
