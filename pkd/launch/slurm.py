"""The SLURM launcher: the parts as one job array through submitit, one task per part, each with
`gpus_per_part` GPUs (the proxy's tensor-parallel size) on one node.

submitit writes the sbatch script, submits it and reads job states from `sacct`; its folder
(`<work>/slurm`) holds the scripts and each job's stdout/stderr. A resubmitted part is a job of
its own. `slurm_executor = "local"` runs the same jobs through submitit's local executor on this
machine: the test of the jobs before a cluster sees them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pkd.config import LaunchConfig
from pkd.errors import LaunchError
from pkd.launch.parts import PartJob, pid_alive

_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "UNKNOWN"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


class SlurmLauncher:
    name = "slurm"
    survives_exit = True  # the jobs belong to SLURM (or, locally, to their own controller processes)

    def __init__(self, cfg: LaunchConfig, gpus: int, folder: Path) -> None:
        try:
            import submitit
        except ImportError:
            raise LaunchError("the slurm launcher needs submitit: pip install 'pkd[slurm]'") from None
        self.local = cfg.slurm_executor == "local"
        if not self.local and shutil.which("sbatch") is None:
            raise LaunchError("the slurm launcher found no `sbatch` on this machine: run pkd on a SLURM login node, or use --launcher local/ray")
        self.folder = folder
        self.executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local" if self.local else "slurm")
        params: dict[str, Any] = dict(name="pkd-cache-logits", timeout_min=cfg.time_min, nodes=1, tasks_per_node=1, gpus_per_node=gpus, cpus_per_task=cfg.cpus_per_part)
        if not self.local:
            slurm = dict(partition=cfg.partition, account=cfg.account, constraint=cfg.constraint, array_parallelism=cfg.max_parallel, additional_parameters=dict(cfg.sbatch) or None)
            params |= {f"slurm_{k}": v for k, v in slurm.items() if v is not None}
        self.executor.update_parameters(**params)
        self._jobs: dict[str, Any] = {}

    def submit(self, jobs: list[PartJob]) -> list[str]:
        from submitit.helpers import CommandFunction

        submitted = []
        with self.executor.batch():  # one job array
            for job in jobs:
                submitted.append(self.executor.submit(CommandFunction(job.argv, cwd=job.cwd, verbose=True)))
        for job in submitted:
            self._jobs[job.job_id] = job
        return [job.job_id for job in submitted]

    def state(self, job_id: str) -> str:
        if self.local:
            job = self._jobs.get(job_id)
            if job is not None:  # started by this process: submitit holds the controller
                return "running" if job.state == "RUNNING" else "ended"
            return "running" if pid_alive(int(job_id)) else "ended"  # a controller an earlier pkd started
        import submitit

        job = self._jobs.setdefault(job_id, submitit.SlurmJob(folder=self.folder / "%j", job_id=job_id))
        state = job.state.split()[0] if job.state else "UNKNOWN"  # e.g. "CANCELLED by 123"
        return "pending" if state in _PENDING else "running" if state in _RUNNING else "ended"

    def close(self) -> None:
        """Nothing to stop: the jobs run on without pkd."""
