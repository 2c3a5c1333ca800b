import os
import sys
import tempfile


# Tests never touch the network (those that test the Hub point HF_ENDPOINT at a server they start).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The reference checkpoint and the synthetic dataset are built into a fresh cache, never the user's.
os.environ["MMPEFT_CACHE"] = tempfile.mkdtemp(prefix="mmpeft-test-cache-")
sys.path.insert(0, os.path.dirname(__file__))  # tiny_parts

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    from tiny_parts import tokenizer

    return tokenizer()


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory):
    """The reference checkpoint, built once per session."""
    from mmpeft.reference import build_reference_checkpoint

    return build_reference_checkpoint(tmp_path_factory.mktemp("reference"))
