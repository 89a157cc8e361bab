"""Running a step's parts past one machine: locally (one process per GPU), as a SLURM job array
(submitit) or as Ray tasks, watched, retried and then merged by the caller (DESIGN §6).

`parts.run_parts` is the one loop; each launcher module only starts jobs and reports their
state. The heavy or optional libraries (torch, submitit, ray) are imported by the launcher that
needs them, when it is made.
"""

from __future__ import annotations

from pathlib import Path

from pkd.config import LaunchConfig
from pkd.launch.parts import Launcher


def make_launcher(cfg: LaunchConfig, gpus: int, work: Path, parts: int) -> Launcher:
    """The launcher `cfg.launcher` names; `gpus` per part; `work`: its local folder (records, logs)."""
    if cfg.launcher == "slurm":
        from pkd.launch.slurm import SlurmLauncher

        return SlurmLauncher(cfg, gpus, work / "slurm")
    if cfg.launcher == "ray":
        from pkd.launch.ray import RayLauncher

        return RayLauncher(cfg.ray_address, gpus, cfg.cpus_per_part, work / "ray")
    from pkd.launch.local import LocalLauncher, gpu_slots

    return LocalLauncher(gpu_slots(gpus, cfg.max_parallel, parts), work / "local")
