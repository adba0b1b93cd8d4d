import os

import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. This must be set before
# triton.jit decorates anything, i.e. before mapo_fast.kernels' Triton modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
