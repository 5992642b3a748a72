"""Test-session settings shared by every test file."""

import os

# Any Hugging Face Hub call would hang ~30 s before failing on a machine without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
