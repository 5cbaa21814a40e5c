"""Root conftest: runs before anything imports triton, so kernels run in Triton's CPU interpreter without a GPU."""

import os

try:  # torch may be absent on a control-plane-only install
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
