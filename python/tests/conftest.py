import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from peer import Peer  # noqa: E402


@pytest.fixture(scope="module")
def kvxfer_peer():
    """A target process running a kvxfer agent, shared by a module."""
    p = Peer("kvxfer", name="kv-target")
    yield p
    p.close()


@pytest.fixture(scope="module")
def nixl_peer():
    """A target process running a kvxfer.nixl agent, shared by a module."""
    p = Peer("nixl", name="nixl-target", listen=True)
    yield p
    p.close()
