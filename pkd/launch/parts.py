"""The part runner every launcher shares: submit the parts that have no job, watch them, resubmit
the failed ones, until every part's folder holds a complete manifest.

The output folders are the truth: a part is done when its manifest says complete, whatever its
job reports, so a part that finished just before its node died is not run again, and a job that
"succeeded" without writing its cache is a failure. The jobs are recorded in `launch.json` (in
the parts' folder) right after each submission, before any wait, so a rerun of the same command
(after `--no-wait`, or after the launching process was killed) watches the recorded jobs instead
of submitting them again. Parts resume from their last committed shard, so a resubmitted part
redoes at most one shard.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pkd.errors import LaunchError
from pkd.store import Folder

RECORD = "launch.json"


@dataclass(frozen=True)
class PartJob:
    """One part: a command line whose output folder is complete when its manifest says so."""

    index: int
    argv: list[str]
    out: str  # the part's own folder (path or URI)
    log: Path  # the command's stdout and stderr, where the launcher can put them
    cwd: str  # where the command runs (relative paths in it are relative to this)


class Launcher(Protocol):
    """Starts part jobs and reports on them; knows nothing of caches."""

    name: str
    survives_exit: bool  # its jobs keep running when pkd exits (`--no-wait` is possible)

    def submit(self, jobs: list[PartJob]) -> list[str]:
        """Start `jobs`; their job ids, in order."""
        ...

    def state(self, job_id: str) -> str:
        """pending, running, ended (finished or failed: the part's folder tells which), or lost
        (a job this launcher cannot know of, e.g. a Ray task of a driver that has exited)."""
        ...

    def close(self) -> None: ...


@dataclass
class Attempt:
    part: int
    job: str
    submitted: float  # epoch seconds
    started: float | None = None  # first seen running
    ended: float | None = None  # first seen ended or complete
    result: str | None = None  # done, failed, lost; None while it runs

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class LaunchRecord:
    """`launch.json`: which launcher ran which jobs for which part, and when."""

    launcher: str
    parts: int
    started: float
    attempts: list[Attempt] = field(default_factory=list)

    def of(self, part: int) -> list[Attempt]:
        return [a for a in self.attempts if a.part == part]

    def retries(self, part: int) -> int:
        """Resubmissions after a failure (a lost job is not the part's failure)."""
        return sum(a.result == "failed" for a in self.of(part))


def part_complete(uri: str) -> bool:
    folder = Folder(uri)
    return folder.has_manifest() and folder.read_manifest().complete


def load_record(path: Path, launcher: str, parts: int) -> LaunchRecord:
    if not path.is_file():
        return LaunchRecord(launcher, parts, time.time())
    data = json.loads(path.read_text())
    if (data["launcher"], data["parts"]) != (launcher, parts):
        raise LaunchError(
            f"{path} records a launch of {data['parts']} parts on {data['launcher']}, not {parts} on {launcher}: "
            "rerun with those settings to resume it, or choose another --out"
        )
    return LaunchRecord(data["launcher"], data["parts"], data["started"], [Attempt(**a) for a in data["attempts"]])


def save_record(path: Path, record: LaunchRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"launcher": record.launcher, "parts": record.parts, "started": record.started, "attempts": [a.as_dict() for a in record.attempts]}, indent=1) + "\n")
    os.replace(tmp, path)


def run_parts(
    launcher: Launcher,
    jobs: list[PartJob],
    record_path: Path,
    *,
    max_retries: int,
    wait: bool = True,
    poll_s: float = 5.0,
    show: Callable[[Counter[str]], None] | None = None,
) -> LaunchRecord:
    """Drive `jobs` to completion (or, without `wait`, submit what has no job and return);
    raises LaunchError when a part has failed `max_retries` + 1 times."""
    if not wait and not launcher.survives_exit:
        raise LaunchError(f"--no-wait: {launcher.name} parts end with the pkd process that started them; use the slurm launcher, or keep pkd running (tmux, nohup)")
    record = load_record(record_path, launcher.name, len(jobs))
    while True:
        now, todo, counts, changed = time.time(), [], Counter[str](), False
        for job in jobs:
            attempts = record.of(job.index)
            last = attempts[-1] if attempts else None
            if last is not None and last.result is None:
                state = launcher.state(last.job)
                if state == "running" and last.started is None:
                    last.started, changed = now, True
                if state in ("ended", "lost") or part_complete(job.out):
                    done = part_complete(job.out)
                    last.ended, last.result, changed = now, "done" if done else "failed" if state == "ended" else "lost", True
                    last.started = last.started or now
                else:
                    counts[state] += 1
                    continue
            if part_complete(job.out):
                counts["done"] += 1
            elif last is None or last.result == "lost" or record.retries(job.index) <= max_retries:
                todo.append(job)
                counts["pending"] += 1
            else:
                counts["failed"] += 1
        if todo:
            for job, job_id in zip(todo, launcher.submit(todo)):
                record.attempts.append(Attempt(job.index, job_id, time.time()))
            changed = True
        if changed:
            save_record(record_path, record)
        if show is not None:
            show(counts)
        if counts["done"] == len(jobs):
            return record
        if counts["failed"] and not counts["running"] and not counts["pending"]:
            failed = [j for j in jobs if not part_complete(j.out)]
            logs = ", ".join(str(j.log) for j in failed[:3])
            raise LaunchError(
                f"{len(failed)} part(s) failed {max_retries + 1} times ({', '.join(str(j.index) for j in failed)}); see their logs ({logs}); "
                "fix the cause and rerun the same command: finished parts are kept, the others resume"
            )
        if not wait:
            return record
        time.sleep(poll_s)


def timeline(record: LaunchRecord) -> list[dict[str, Any]]:
    """Per part: first submission, first start and last end relative to the launch's start (s),
    retries, and its attempts' job ids."""
    rows = []
    for part in range(record.parts):
        attempts = record.of(part)
        if not attempts:
            continue
        start = min((a.started for a in attempts if a.started is not None), default=None)
        end = attempts[-1].ended
        rows.append({
            "part": part,
            "start_s": None if start is None else round(start - record.started, 1),
            "end_s": None if end is None else round(end - record.started, 1),
            "retries": record.retries(part),
            "jobs": [a.job for a in attempts],
            "result": attempts[-1].result,
        })  # fmt: skip
    return rows


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state first); [] where there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def start_time(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot ("" where /proc cannot say): with the
    pid it names one process, so a pid reused after a reboot is not taken for the part's."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def pid_alive(pid: int, started: str = "") -> bool:
    """Whether a local process is still running: our child (reaped if it ended), or another's
    (a process of an earlier pkd that was killed or ran with --no-wait); `started`
    (`start_time`), when known, must match."""
    if started and start_time(pid) not in ("", started):
        return False
    try:
        ended, _ = os.waitpid(pid, os.WNOHANG)
        return not ended
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _stat(pid)[:1] != ["Z"]  # a zombie waiting for its parent has ended too
