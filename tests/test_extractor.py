"""actors/extractor.py: how the extractor pool runs its calls (the thread, the process's memory).

What the extractor computes is tested in test_fm_embed.py (one causal pass per chunk, every event
once) and test_embed_faults.py (a killed actor, two nodes).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from loopfm.actors.extractor import pool_args

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]


def test_pool_runs_every_call_on_the_actors_main_thread(ray_session):
    """Ray Data's default runs a callable class on a helper thread, whose glibc arena unmaps its
    freed heaps after every call (25% slower extraction, measured); `pool_args` must avoid it."""
    class WhichThread:  # defined here so Ray pickles it by value (workers cannot import tests/)
        """Per row: did the call run on its actor's main thread, and what did the pool pass."""

        def __init__(self, retain_memory: bool = False):
            self.retain_memory = retain_memory

        def __call__(self, batch: dict) -> dict:
            n = len(batch["id"])
            return {"main": np.full(n, threading.current_thread() is threading.main_thread()),
                    "retain": np.full(n, self.retain_memory)}

    ds = ray_session.data.range(48, override_num_blocks=4)
    rows = ds.map_batches(WhichThread, **pool_args(actors=1, num_cpus=1, num_gpus=0, batch_size=8)).take_all()
    assert len(rows) == 48
    assert all(row["main"] for row in rows), "an extractor call ran off the actor's main thread"
    assert all(row["retain"] for row in rows), "the pool did not ask the extractor to retain freed memory"


CHURN = textwrap.dedent("""
    import ctypes, resource, sys
    import torch
    from loopfm.actors.extractor import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, retain_freed_memory

    # Start both runs from glibc's initial thresholds, pinned (128 KiB: 8 MiB blocks are mmapped and
    # unmapped on free). glibc raises them on its own depending on the heap's layout, which differs
    # between checkouts, so without pinning the control could keep its memory by luck.
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 << 10) and libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)
    if sys.argv[1] == "retain":
        assert retain_freed_memory()

    def rounds(n):  # what an extractor call does: large activations, all freed at its end
        for _ in range(n):
            buffers = [torch.ones(2 << 20) for _ in range(8)]  # 8 x 8 MiB
            del buffers

    rounds(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(10)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")
def test_retained_memory_is_reused_instead_of_faulted_in_again():
    default, retained = page_faults("default"), page_faults("retain")
    pages_per_round = 8 * (8 << 20) // 4096
    assert default > 5 * pages_per_round, f"the control kept its memory ({default} faults): the test proves nothing"
    assert retained < default / 4, f"{retained} page faults with retained memory vs {default} without"
