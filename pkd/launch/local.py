"""The local launcher: the parts as processes on this machine, e.g. one per GPU.

With GPUs, each part gets `gpus_per_part` of them through CUDA_VISIBLE_DEVICES and at most
(visible GPUs / gpus_per_part) parts run at once; without, `max_parallel` parts (default: all).
The processes start in their own session, so a Ctrl-C or kill of pkd does not take them down: each
started job's pid and start time are written to `<work>/pids/<job id>`, and a rerun watches those
that still run (the start time tells a reused pid from the part's).
"""

from __future__ import annotations

import os
import subprocess
from collections import deque
from pathlib import Path

from pkd.launch.parts import PartJob, pid_alive, start_time

def gpu_slots(gpus_per_part: int, max_parallel: int | None, parts: int) -> list[str | None]:
    """One CUDA_VISIBLE_DEVICES value per slot (None: leave it alone, CPU parts)."""
    if gpus_per_part:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [x for x in visible.split(",") if x.strip()]
        else:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
        slots: list[str | None] = [",".join(ids[i : i + gpus_per_part]) for i in range(0, len(ids) - gpus_per_part + 1, gpus_per_part)]
        if slots:
            return slots[:max_parallel]
    return [None] * (max_parallel or parts)


class LocalLauncher:
    name = "local"
    survives_exit = False  # queued parts start only while pkd runs

    def __init__(self, slots: list[str | None], work: Path) -> None:
        self._pids = work / "pids"
        self._free = list(slots)
        self._queue: deque[tuple[str, PartJob]] = deque()
        self._running: dict[str, tuple[subprocess.Popen[bytes], str | None]] = {}
        self._ended: set[str] = set()
        self._count = 0

    def submit(self, jobs: list[PartJob]) -> list[str]:
        ids = []
        for job in jobs:
            self._count += 1
            job_id = f"part{job.index}-{os.getpid()}-{self._count}"
            self._queue.append((job_id, job))
            ids.append(job_id)
        self._start_queued()
        return ids

    def _start_queued(self) -> None:
        while self._queue and self._free:
            job_id, job = self._queue.popleft()
            slot = self._free.pop(0)
            env = os.environ | ({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {})
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "ab") as log:
                proc = subprocess.Popen(job.argv, cwd=job.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            self._running[job_id] = (proc, slot)
            self._pids.mkdir(parents=True, exist_ok=True)
            (self._pids / job_id).write_text(f"{proc.pid} {start_time(proc.pid)}".strip())

    def _reap(self) -> None:
        """Free the slots of every ended process (the runner stops asking about a part once its
        folder is complete) and start queued parts in them."""
        for job_id, (proc, slot) in list(self._running.items()):
            if proc.poll() is not None:
                del self._running[job_id]
                self._ended.add(job_id)
                self._free.append(slot)
        self._start_queued()

    def state(self, job_id: str) -> str:
        self._reap()
        if job_id in self._running:
            return "running"
        if job_id in self._ended:
            return "ended"
        if any(queued == job_id for queued, _ in self._queue):
            return "pending"
        pid = self._pids / job_id  # a job of an earlier pkd process
        if not pid.is_file():
            return "lost"  # it was still queued when that process ended
        number, _, started = pid.read_text().partition(" ")
        return "running" if pid_alive(int(number), started) else "ended"

    def close(self) -> None:
        """Leave running parts alone (they resume anyway); drop the queue."""
        self._queue.clear()
