"""Running a saved checkpoint outside training: loading it at its own layout (or merged in one
process) and generating text with a KV cache (docs/design.md §13).

| module | holds |
|---|---|
| `load` | a checkpoint's config at the layout of this job, and this rank's module with its weights |
| `generate` | KV-cached decoding over TP/PP (greedy or sampled), and `megatron-dyt generate` |
"""
