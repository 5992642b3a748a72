"""Test-session settings shared by every test file."""

import os

# Any Hugging Face Hub call would hang ~30 s before failing on a machine without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test: tiny-model numerics then match the one-thread subprocesses the
    multi-process tests launch, and small ops don't stall on OpenMP oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
