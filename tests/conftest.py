import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs or automatic-dynamic state carry over."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def one_thread(request):
    """One intra-op thread for the small models most tests build: their ops are too small to
    share, and a second thread mostly waits at each op's join (measured: test_head.py 57 s with
    two threads, 50 s with one). Tests marked ``all_cores`` (long sequences) keep the default."""
    if request.node.get_closest_marker("all_cores"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
