"""`--part auto`: a worker started by the user's own job script finds its part in the environment
the scheduler set, instead of every script computing `I/N` itself."""

from __future__ import annotations

from collections.abc import Mapping

from pkd.errors import ConfigError

_SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
_TORCHRUN = ("RANK", "WORLD_SIZE")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"--part auto: {name}={env[name]!r} is not a whole number") from None


def part_from_env(env: Mapping[str, str]) -> tuple[str, str]:
    """("I/N", which variables it came from): a SLURM job array first (its task ids counted from
    SLURM_ARRAY_TASK_MIN, so `--array=1-4` works too), else torchrun's RANK/WORLD_SIZE."""
    if any(name in env for name in _SLURM):
        missing = [name for name in _SLURM if name not in env]
        if missing:
            raise ConfigError(f"--part auto: {' and '.join(_SLURM)} must both be set (a SLURM job array), {missing[0]} is not; pass --part I/N")
        task, count, low = _int(env, _SLURM[0]), _int(env, _SLURM[1]), _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        index, source = task - low, f"SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_COUNT={count}" + (f", SLURM_ARRAY_TASK_MIN={low}" if low else "")
    elif any(name in env for name in _TORCHRUN):
        missing = [name for name in _TORCHRUN if name not in env]
        if missing:
            raise ConfigError(f"--part auto: {' and '.join(_TORCHRUN)} must both be set (torchrun), {missing[0]} is not; pass --part I/N")
        index, count = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        source = f"RANK={index}, WORLD_SIZE={count}"
    else:
        raise ConfigError(
            "--part auto: neither SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (a SLURM job array) nor RANK/WORLD_SIZE "
            "(torchrun) is set in this environment; pass --part I/N"
        )
    if not 0 <= index < count:
        raise ConfigError(f"--part auto: {source} gives part {index} of {count}, outside 0..{count - 1}; the job's array (or world) and its task count disagree")
    return f"{index}/{count}", source
