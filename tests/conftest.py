import os
import warnings

# Spawned test workers inherit these: one thread each (2-core CI), and no megatron-core import
# noise about Transformer Engine / Apex, which nothing here uses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore:Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
