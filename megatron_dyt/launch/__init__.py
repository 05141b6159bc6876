"""Launching runs: SLURM sbatch jobs and local multi-process runs (sweeps: `megatron_dyt.sweep`)."""
