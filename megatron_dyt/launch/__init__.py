"""Launching runs: SLURM sbatch jobs, local multi-process runs and alpha0 sweeps."""
