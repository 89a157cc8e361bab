"""The Ray launcher: each part a Ray task (`num_gpus` = the proxy's tensor-parallel size) that runs
the part's command on whichever node Ray picks; parts write to the output URI, so the nodes need
shared storage or an object store (`s3://`).

Ray reruns a task whose worker process or node died (`max_retries`); a part whose command fails
is resubmitted by pkd (pkd.launch.parts). Tasks end with the driver that submitted them, so a
rerun of pkd submits again the parts a killed driver had not finished (they resume).
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

from pkd.errors import LaunchError
from pkd.launch.parts import PartJob

RAY_NODE_RETRIES = 2  # Ray's own reruns of a task whose worker or node died


def _run_part(argv: list[str], cwd: str, log: str, marker: str) -> int:
    """In a Ray worker: mark the start, run the part's command, return its exit status."""
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).touch()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.run(argv, cwd=cwd if Path(cwd).is_dir() else None, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


class RayLauncher:
    name = "ray"
    survives_exit = False

    def __init__(self, address: str, gpus: int, cpus: int, folder: Path) -> None:
        try:
            import ray
        except ImportError:
            raise LaunchError("the ray launcher needs ray: pip install 'pkd[ray]'") from None
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as e:
                raise LaunchError(f"no Ray cluster at address {address!r} ({e}): start one (`ray start --head`), set RAY_ADDRESS, or pass --ray-address local to start one here") from None
        self.ray = ray
        self.folder = folder
        self.task = ray.remote(_run_part).options(num_gpus=gpus, num_cpus=cpus, max_retries=RAY_NODE_RETRIES, retry_exceptions=False)
        self._refs: dict[str, Any] = {}

    def submit(self, jobs: list[PartJob]) -> list[str]:
        ids = []
        for job in jobs:
            job_id = f"part{job.index}-{uuid.uuid4().hex[:12]}"
            self._refs[job_id] = self.task.remote(job.argv, job.cwd, str(job.log), str(self.folder / "started" / job_id))
            ids.append(job_id)
        return ids

    def state(self, job_id: str) -> str:
        ref = self._refs.get(job_id)
        if ref is None:
            return "lost"  # a task of a driver that has exited: Ray ended it with that driver
        ready, _ = self.ray.wait([ref], timeout=0)
        if ready:
            return "ended"
        return "running" if (self.folder / "started" / job_id).exists() else "pending"

    def close(self) -> None:
        """Cancel what still runs (the parts resume on the next run)."""
        for ref in self._refs.values():
            self.ray.cancel(ref)  # not force: the task stops its command (subprocess.run kills it) instead of orphaning it
        self._refs.clear()
