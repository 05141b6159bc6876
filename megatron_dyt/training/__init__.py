"""Pretraining with DeepSpeed: optimizer, schedule, engine, checkpoints, metrics and the loop."""
