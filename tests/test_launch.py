"""`pkd cache-logits --parts 4` on each launcher's local mode (processes, submitit's local
executor, a local Ray with 2 CPUs) over the tiny proxy: the merged cache is byte for byte the
single-process run's, whichever launcher ran the parts; a part killed mid-way is retried and
changes nothing; `--no-wait` then a rerun submits nothing twice; `--part
auto` reads the scheduler's environment or says in one line why it cannot."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pkd.cache.ops import verify
from pkd.cli import app
from pkd.config import CacheLogitsConfig, LaunchConfig, RunConfig
from pkd.errors import ConfigError
from pkd.launch.env import part_from_env
from pkd.steps.cache_logits import launch_cache_logits, run_cache_logits
from pkd.store import Folder
from tests.test_cache_logits import config, fingerprint, root  # noqa: F401  (root: a fixture)

PARTS = 4
SHARD_ROWS = 2  # ~9 samples a part: several shards each, so a kill lands mid-way
FAULTS = Path(__file__).parent / "launch_faults"
REPO = Path(__file__).resolve().parent.parent


# --part auto ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "part", "source"),
    [
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, "2/4", "SLURM_ARRAY_TASK_ID=2"),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, "3/4", "SLURM_ARRAY_TASK_MIN=1"),
        ({"RANK": "1", "WORLD_SIZE": "8"}, "1/8", "RANK=1, WORLD_SIZE=8"),
    ],
)
def test_part_auto_reads_slurm_or_torchrun(env: dict[str, str], part: str, source: str) -> None:
    got, said = part_from_env(env)
    assert got == part and source in said


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "neither SLURM_ARRAY_TASK_ID"),
        ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT is not"),
        ({"RANK": "0"}, "WORLD_SIZE is not"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "outside 0..3"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "not a whole number"),
    ],
)
def test_part_auto_refuses_a_missing_or_inconsistent_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        part_from_env(env)


def test_part_auto_error_is_one_line_from_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["cache-logits", "--part", "auto", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--part auto: neither" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["cache-logits", "--part", "1/4", "--parts", "4", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "pass one of the two" in result.output


def test_launch_settings_from_flags_and_recipe() -> None:
    assert LaunchConfig(time="2-00:30:00").time_min == 2 * 1440 + 30
    with pytest.raises(ValueError):
        LaunchConfig(time="two hours")


# launched parts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launch_env(root: Path) -> Iterator[None]:  # noqa: F811
    """Parts see the fault injector (tests/launch_faults) and this checkout; part 2 of 4 kills
    itself once. Set before Ray starts, whose workers inherit it."""
    with pytest.MonkeyPatch.context() as mp:  # module scope: the fixture can't take `monkeypatch`
        mp.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        mp.setenv("PKD_TEST_KILL_PART", f"2/{PARTS}")
        yield


def launch_config(root: Path, out: str, launcher: str, **launch: Any) -> CacheLogitsConfig:  # noqa: F811
    cfg = config(root, out, shard_rows=SHARD_ROWS)
    return cfg.model_copy(update={"launch": LaunchConfig(parts=PARTS, launcher=launcher, max_retries=1, gpus_per_part=0, cpus_per_part=1, max_parallel=2, poll_s=0.2, slurm_executor="local", time="10")})


@pytest.fixture(scope="module")
def single(root: Path) -> str:  # noqa: F811
    run_cache_logits(config(root, "single", shard_rows=SHARD_ROWS), RunConfig(), progress=False)
    return str(root / "single")


@pytest.fixture(scope="module")
def ray_local(launch_env: None) -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "slurm", "ray"])
def test_launched_parts_merge_to_the_single_run(launcher: str, root: Path, single: str, launch_env: None, request: pytest.FixtureRequest) -> None:  # noqa: F811
    if launcher == "slurm":
        pytest.importorskip("submitit")
    if launcher == "ray":
        request.getfixturevalue("ray_local")
    summary = launch_cache_logits(launch_config(root, launcher, launcher), RunConfig(), progress=False)
    out = str(root / launcher)
    print(f"\n{launcher} timeline: " + "; ".join(f"part {r['part']} {r['start_s']}-{r['end_s']} s, {r['retries']} retries" for r in summary.timeline))
    # part 2 was killed mid-way (after a committed shard), resubmitted once and resumed
    assert [r["retries"] for r in summary.timeline] == [0, 0, 1, 0]
    assert Path(f"{out}-parts/2-of-{PARTS}.killed").is_file() and summary.merged
    assert verify(Folder(out)).ok
    # the bytes one process scoring everything writes, whatever launched the parts and killed one
    assert len(fingerprint(single)[1]) > PARTS and fingerprint(out) == fingerprint(single)
    # the same command again, from the CLI: the merged cache is found, nothing is submitted
    flags = ["--teacher", str(root / "teacher"), "--proxy", str(root / "proxy"), "--k", "8", "--engine", "hf", "--dtype", "float32", "--max-length", "256", "--shard-rows", str(SHARD_ROWS)]
    result = CliRunner().invoke(app, ["cache-logits", *flags, "--parts", str(PARTS), "--launcher", launcher, "--out", out])
    assert result.exit_code == 0 and "nothing to do" in result.output, result.output
    result = CliRunner().invoke(app, ["cache-logits", *flags, "--k", "4", "--parts", str(PARTS), "--launcher", launcher, "--out", out])
    assert result.exit_code == 3 and "holds another cache" in result.output and "Traceback" not in result.output


def test_no_wait_is_refused_where_parts_end_with_pkd(root: Path, tmp_path: Path) -> None:  # noqa: F811
    result = CliRunner().invoke(app, ["cache-logits", "--teacher", str(root / "teacher"), "--proxy", str(root / "proxy"), "--parts", "2", "--no-wait", "--out", str(tmp_path / "out")])
    assert result.exit_code == 6 and "--no-wait: local parts end with the pkd process" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_no_wait_then_rerun_submits_nothing_twice(root: Path, single: str, launch_env: None, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    pytest.importorskip("submitit")
    monkeypatch.setenv("PKD_TEST_KILL_PART", "")
    cfg = launch_config(root, "no-wait", "slurm")
    first = launch_cache_logits(cfg, RunConfig(), wait=False, progress=False)
    assert first.manifest is None and len(first.timeline) == PARTS
    jobs = [r["jobs"] for r in first.timeline]
    record = json.loads(Path(first.record).read_text())
    assert len(record["attempts"]) == PARTS
    second = launch_cache_logits(cfg, RunConfig(), progress=False)
    assert [r["jobs"] for r in second.timeline] == jobs and second.merged
    assert len(json.loads(Path(first.record).read_text())["attempts"]) == PARTS
    assert fingerprint(str(root / "no-wait")) == fingerprint(single)


@pytest.mark.slow
def test_parts_without_a_shard_are_named_with_the_shard_rows_that_would_spread_the_work(root: Path, single: str, tmp_path: Path) -> None:  # noqa: F811
    """A part scores whole shards: 3 parts over a D_s of one 64-row shard leave two idle, and the
    command says so and how to avoid it; the merged cache is still the single run's."""
    out = tmp_path / "out"
    flags = ["--teacher", str(root / "teacher"), "--proxy", str(root / "proxy"), "--k", "8", "--engine", "hf", "--dtype", "float32", "--max-length", "256"]
    result = CliRunner().invoke(app, ["cache-logits", *flags, "--shard-rows", "64", "--parts", "3", "--launcher", "local", "--out", str(out)])
    rows = Folder(single).read_manifest().rows
    assert result.exit_code == 0, result.output
    assert "2 of 3 parts had nothing to score (1, 2)" in " ".join(result.output.split()) and f"--shard-rows {-(-rows // 3)} or less" in result.output
    assert [f.path for f in Folder(str(out)).read_manifest().files] == ["data/part-00000-00000.parquet"]


def test_a_recorded_pid_counts_as_the_part_only_with_its_start_time(tmp_path: Path) -> None:
    """A rerun watches the parts an earlier pkd started by their recorded pids; a pid reused by
    another process (after a reboot) is not taken for a running part."""
    from pkd.launch.local import LocalLauncher
    from pkd.launch.parts import start_time

    launcher = LocalLauncher([None], tmp_path)
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "part0-1-1").write_text(f"{os.getpid()} {start_time(os.getpid())}")
    (tmp_path / "pids" / "part1-1-2").write_text(f"{os.getpid()} 1")
    (tmp_path / "pids" / "part2-1-3").write_text(str(os.getpid()))  # recorded before start times were
    assert [launcher.state(j) for j in ("part0-1-1", "part1-1-2", "part2-1-3", "part3-1-4")] == ["running", "ended", "running", "lost"]
