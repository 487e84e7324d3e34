"""Where the VMs of one Ray Train run hand their final state to the driver (`train_vms`).

Several VMs train in turn in one worker group (`loopfm.training.vm.train_vms`). A Train
checkpoint holds one loop's state and Train keeps only the newest two, so the finished VMs'
weights cannot travel in checkpoints without every checkpoint carrying all of them. Instead rank 0
puts each finished VM here. The actor belongs to the driver, so it outlives a worker group that
Train restarts after a failure; the restarted group asks it which VMs are done and skips them.
It needs no CPU and no shared filesystem.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class FinishedVMs:
    def __init__(self) -> None:
        self.states: dict[int, bytes] = {}

    def put(self, index: int, payload: bytes) -> None:
        self.states[index] = payload

    def finished(self) -> list[int]:
        return sorted(self.states)

    def get(self, index: int) -> bytes:
        return self.states[index]
