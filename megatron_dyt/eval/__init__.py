"""Zero-shot evaluation with lm-eval-harness: the model class (`adapter`), suites and the
bundled offline tasks (`suites`, `tasks/`), and `megatron-dyt eval` (`run`)."""
