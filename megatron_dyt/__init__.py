"""megatron-dyt: Megatron-style TP/PP LLaMA pretraining with a norm factory for DyT and Derf."""

__version__ = "0.2.0"
