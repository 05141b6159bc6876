import os
import warnings

# Spawned test workers inherit these: one thread each (2-core CI), and no megatron-core import
# noise about Transformer Engine / Apex, which nothing here uses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore:Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# Without a GPU the Triton kernels run through Triton's interpreter, on CPU tensors. It has to be
# on before any kernel is decorated, i.e. before megatron_dyt is imported; a GPU machine runs the
# real kernels. Set TRITON_INTERPRET=0 to test the CPU fallback of backend 'triton' instead.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A small real dataset: Python standard-library text → tokenizer → indexed dataset."""
    from megatron_dyt.data import ensure_demo_data, load_tokenizer

    cache = tmp_path_factory.mktemp("cache")
    demo = ensure_demo_data(cache, vocab_size=512, progress=False)
    return {
        "tokenizer": str(demo.tokenizer_path),
        "prefix": str(demo.data_prefix),
        "vocab": load_tokenizer(demo.tokenizer_path).vocab_size,
        "cache": str(cache),
    }
