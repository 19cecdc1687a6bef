"""The launch scripts on a real SLURM cluster: Debian's slurmctld + 8 slurmd on this host.

tests/slurm/ci_slurm.sh installs SLURM (apt), starts 8 fake nodes n1..n8 with 8 fake GPUs
each, and stops everything by PID at the end. `launch/pretrain_8node.sh` is submitted
as it is (headers unchanged); only environment variables choose the CPU run: one rank
per node, gloo, and either the contract stub (tests/slurm/stub_trainer.py, launch
mechanics only) or the real trainer (tiny model, generated shards).

Needs root (it writes /etc/slurm and /etc/hosts, starts daemons). Outside CI a machine
without root or without a package registry skips; in CI (CI=true) that is a failure.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "slurm" / "ci_slurm.sh"
STUB = REPO / "tests" / "slurm" / "stub_trainer.py"
PRETRAIN_8NODE = REPO / "launch" / "pretrain_8node.sh"
PRETRAIN_1NODE = REPO / "launch" / "pretrain_1node.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# One cluster per machine: /etc/slurm, /etc/hosts and the ports are shared, so two test
# sessions (several checkouts, parallel runs) take turns.
LOCK = Path("/tmp/pmc-clip-slurm.lock")
LOCK_WAIT_SECONDS = 900
JOB_TIMEOUT_SECONDS = 240


def cannot_run(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"SLURM tests cannot run in CI: {reason}")
    pytest.skip(reason)


def harness(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(HARNESS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def slurm_installed() -> None:
    if os.geteuid() != 0:
        cannot_run("needs root (apt-get, /etc/slurm, /etc/hosts, daemons)")
    result = harness("install", timeout=600)
    if result.returncode != 0:
        cannot_run(f"installing SLURM failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="module")
def slurm_cluster(slurm_installed: None) -> Iterator[None]:
    """8 fake nodes, up for this module; always torn down (jobs cancelled, daemons stopped
    by PID, /etc files restored), also when a test fails."""
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {LOCK} for {LOCK_WAIT_SECONDS} s")
                time.sleep(1)
        try:
            up = harness("up", timeout=120)
            assert up.returncode == 0, f"cluster did not come up:\n{up.stdout}\n{up.stderr}"
            yield
        finally:
            down = harness("down", timeout=120)
            assert down.returncode == 0, f"teardown failed:\n{down.stdout}\n{down.stderr}"
            assert "pmc-clip-ci-slurm" not in Path("/etc/hosts").read_text()


def cpu_env(**overrides: str) -> dict[str, str]:
    """The submit environment of a CPU run of the unchanged 8-node script."""
    env = dict(os.environ)
    env.update(
        PMC_CLIP_REPO=str(REPO),
        PMC_CLIP_PYTHON=sys.executable,
        NPROC_PER_NODE="1",
        PMC_CLIP_DEVICE="cpu",
        DIST_BACKEND="gloo",
        OMP_NUM_THREADS="1",
    )
    env.update(overrides)
    return env


def submit(workdir: Path, env: Mapping[str, str], *script_args: str) -> int:
    """sbatch the launch script from `workdir` (its logs/ receives SLURM's output)."""
    (workdir / "logs").mkdir(exist_ok=True)
    result = subprocess.run(
        ["sbatch", "--parsable", str(PRETRAIN_8NODE), *script_args],
        cwd=workdir,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().split(";")[0])


def wait_for_job(job: int, timeout: int = JOB_TIMEOUT_SECONDS) -> dict[str, str]:
    """Poll (1 s) until the job has left the queue for good; its final JobState etc."""
    result = harness("wait", str(job), str(timeout), timeout=timeout + 30)
    assert result.returncode == 0, f"job {job} did not finish:\n{result.stderr}"
    return show_job(job)


def show_job(job: int) -> dict[str, str]:
    line = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def job_output(workdir: Path, job: int) -> str:
    """SLURM's stdout and stderr files of the job (all restarts: --open-mode=append)."""
    return "".join(path.read_text() for path in sorted((workdir / "logs").glob(f"*-{job}.*")))


def wait_for_text(path: Path, pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            match = re.search(pattern, path.read_text())
            if match:
                return match
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s")


def preempt_and_wait(workdir: Path, job: int) -> str:
    """Send the pre-timeout signal to a running job, wait for it to end, and check that it
    requeued once and then completed; returns its output."""
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True, timeout=30)
    final = wait_for_job(job)
    output = job_output(workdir, job)
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        final,
        output,
    )
    return output


def assert_ranks_on_nodes(output: str, world_size: int) -> None:
    """One rank per fake node: the launch script's `rank R/W on NODE` line of each task."""
    placed = dict(re.findall(rf"rank (\d+)/{world_size} on (n\d+)", output))
    assert sorted(map(int, placed)) == list(range(world_size)), output
    assert sorted(placed.values()) == sorted(f"n{i}" for i in range(1, world_size + 1)), output


# ---------------------------------------------------------------- without a trainer


def test_scripts_pass_shellcheck(slurm_installed: None) -> None:
    scripts = sorted(str(p) for p in [*REPO.glob("launch/*.sh"), *REPO.glob("tests/slurm/*.sh")])
    assert str(PRETRAIN_8NODE) in scripts
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_job_larger_than_the_cluster_is_rejected_at_submission(
    slurm_cluster: None, tmp_path: Path
) -> None:
    """EnforcePartLimits=ALL: an impossible request fails in sbatch, never pends forever."""
    for extra in (["--nodes=9"], ["--gpus-per-node=9"]):
        result = subprocess.run(
            ["sbatch", "--parsable", *extra, str(PRETRAIN_8NODE)],
            cwd=tmp_path,
            env=cpu_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0, (extra, result.stdout)
        assert "Batch job submission failed" in result.stderr, result.stderr
    queued = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30)
    assert queued.stdout.strip() == ""


def test_8node_script_runs_checkpoints_requeues_and_resumes(
    slurm_cluster: None, tmp_path: Path
) -> None:
    """The unchanged sbatch script with the contract stub: 8 ranks on n1..n8 agree in a gloo
    all_reduce; `scancel --signal=USR1` mid-run -> checkpoint, exit 3, `scontrol requeue`,
    the same job starts again, resumes at the saved step and finishes."""
    steps = 40
    env = cpu_env(PMC_CLIP_ENTRY=str(STUB), STUB_STEPS=str(steps), STUB_STEP_SECONDS="0.25")
    job = submit(tmp_path, env)
    allocated = show_job(job)
    assert allocated["NumNodes"].split("-")[0] == "8" and "gpu:8" in allocated["TresPerNode"], (
        allocated
    )

    out = tmp_path / "logs" / f"pmc-clip-pretrain-{job}.out"
    wait_for_text(out, r"0: stub step 3\b", timeout=120)
    output = preempt_and_wait(tmp_path, job)

    # Both runs: 8 ranks, one per node, the all_reduce of 1..8 = 36 on every rank.
    assert (
        len(re.findall(r"stub rank=\d local_rank=0 world_size=8 node=n\d allreduce=36.0", output))
        == 16
    ), output
    assert output.count("stub nodes=n1,n2,n3,n4,n5,n6,n7,n8") == 2, output
    assert_ranks_on_nodes(output, 8)
    # The script's defaults reach the trainer intact (a brace pattern, `--resume latest`).
    assert "--train-data s3://bucket/pmc-oa/pmc-oa-train-{000000..000164}.tar " in output
    assert "--resume latest" in output

    stopped = int(re.search(r"stub stopped by signal 10 at step (\d+)", output).group(1))  # type: ignore[union-attr]
    assert 3 <= stopped < steps, output
    assert f"requeueing job {job} (restart 1)" in output
    assert f"stub resumed from step {stopped}" in output
    done_steps = [int(s) for s in re.findall(r"0: stub step (\d+)", output)]
    assert done_steps == list(range(1, steps + 1)), done_steps  # continued, not restarted
    assert f"stub done step={steps}" in output

    checkpoints = tmp_path / "logs" / f"pmc-clip-pretrain-{job}" / "checkpoints"
    assert (checkpoints / f"step_{stopped}").exists()
    assert json.loads((checkpoints / "latest.json").read_text())["name"] == f"step_{steps}"


def test_1node_script_runs_torchrun_on_cpu(tmp_path: Path) -> None:
    """launch/pretrain_1node.sh without a GPU: torchrun, N CPU processes with gloo."""
    env = cpu_env(
        PMC_CLIP_ENTRY=str(STUB), NPROC_PER_NODE="2", STUB_STEPS="3", STUB_STEP_SECONDS="0.05"
    )
    env["LOGS_DIR"] = str(tmp_path / "logs")
    result = subprocess.run(
        ["bash", str(PRETRAIN_1NODE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert len(re.findall(r"stub rank=\d local_rank=\d world_size=2 .*allreduce=3.0", output)) == 2
    assert "stub done step=3" in output
    latest = tmp_path / "logs" / "pmc-clip-1node" / "checkpoints" / "latest.json"
    assert json.loads(latest.read_text())["name"] == "step_3"


# ---------------------------------------------------------------- with the real trainer


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Generated shards (8 of 8 samples) and a local tiny tokenizer: nothing downloaded."""
    from helpers_data import make_figures, write_shards
    from helpers_text import build_tokenizer

    root = tmp_path_factory.mktemp("slurm-inputs")
    jsonl, images = make_figures(root, num_articles=16)
    manifest = write_shards(jsonl, images, str(root / "shards"), shard_size=8)
    build_tokenizer(root / "tokenizer")
    pattern = manifest["splits"]["train"]["pattern"]
    return {
        "TRAIN_DATA": str(root / "shards" / pattern),
        "TOKENIZER": str(root / "tokenizer"),
    }


def trainer_env(inputs: Mapping[str, str], steps: int, batch_size: int = 4) -> dict[str, str]:
    """The tiny model on generated shards, one rank per node; `steps` steps in one epoch."""
    return cpu_env(
        **inputs,
        MODEL="tiny",
        TEXT_ENCODER="",  # the tiny config's BERT, randomly initialised
        BATCH_SIZE=str(batch_size),
        DATASET_RESAMPLED="1",  # epochs of exactly `steps` steps, whatever the shards hold
        TRAIN_NUM_SAMPLES=str(steps * batch_size * 8),
        EPOCHS="1",
        WARMUP="2",
        WORKERS="1",
        PRECISION="fp32",
        SAVE_EVERY_N_STEPS="10",
    )


def trainer_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"epoch \d+ step (\d+)/\d+", log)]


def test_8node_training_job(
    slurm_cluster: None, tiny_inputs: dict[str, str], tmp_path: Path
) -> None:
    """The unchanged sbatch script trains the tiny model with world size 8 on n1..n8, writes
    a checkpoint and TensorBoard logs, and exits 0."""
    steps = 12
    job = submit(tmp_path, trainer_env(tiny_inputs, steps), "--log-every-n-steps", "4")
    final = wait_for_job(job)
    output = job_output(tmp_path, job)
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "0"), (
        final,
        output,
    )
    assert final["NodeList"] == "n[1-8]", final
    assert_ranks_on_nodes(output, 8)

    run_dir = tmp_path / "logs" / f"pmc-clip-pretrain-{job}"
    log = (run_dir / "out.log").read_text()
    assert re.search(r"world size 8\b", log), log
    assert trainer_steps(log)[-1] == steps, log
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert (run_dir / "checkpoints" / latest["name"]).stat().st_size > 0
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events), events


def test_8node_training_job_checkpoints_requeues_and_resumes(
    slurm_cluster: None, tiny_inputs: dict[str, str], tmp_path: Path
) -> None:
    """USR1 mid-run (as SLURM sends before the time limit): the trainer checkpoints and
    exits 3, the script requeues the job, the rerun resumes at the saved step and
    finishes; the step count continues."""
    steps = 20
    job = submit(tmp_path, trainer_env(tiny_inputs, steps), "--log-every-n-steps", "1")
    run_dir = tmp_path / "logs" / f"pmc-clip-pretrain-{job}"
    wait_for_text(run_dir / "out.log", r"epoch \d+ step [3-9]/", timeout=180)
    output = preempt_and_wait(tmp_path, job)
    log = (run_dir / "out.log").read_text()
    stopped = int(re.search(r"stopped on request at step (\d+)", log).group(1))  # type: ignore[union-attr]
    assert 3 <= stopped < steps, log
    assert f"requeueing job {job} (restart 1)" in output
    assert re.search(rf"resumed from \S+ at epoch \d+ step {stopped}\b", log), log
    logged = trainer_steps(log)
    # Continued from the checkpoint: no step twice (a restart from 0 would repeat 1..K).
    assert logged == sorted(set(logged)) and logged[-1] == steps, logged
    assert min(logged) <= stopped < max(logged), logged
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert (run_dir / "checkpoints" / latest["name"]).exists()
