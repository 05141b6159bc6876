"""Zero-shot evaluation with lm-eval-harness (imported as `megatron_dyt.eval`).

Empty until the evaluation work lands.
"""
