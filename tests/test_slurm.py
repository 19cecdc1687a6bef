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
import hashlib
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
MAKE_SHARDS_ARRAY = REPO / "launch" / "make_shards_array.sh"
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


def wait_for_job(job: int | str, timeout: int = JOB_TIMEOUT_SECONDS) -> dict[str, str]:
    """Poll (1 s) until the job has left the queue for good; its final JobState etc."""
    result = harness("wait", str(job), str(timeout), timeout=timeout + 30)
    assert result.returncode == 0, f"job {job} did not finish:\n{result.stderr}"
    return show_job(job)


def show_job(job: int | str) -> dict[str, str]:
    """`scontrol show job`'s fields; `job` may name an array task (`JOBID_TASK`)."""
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


# ---------------------------------------------------------------- make_shards as an array job


def pmc_like_input(root: Path) -> tuple[str, str, dict[int, str]]:
    """(jsonl, images, {row: reason}): generated articles with figures large enough that a
    part runs for seconds, plus three bad rows, one per part (skipped rows are dealt to
    parts by row number)."""
    from helpers_data import make_figures

    jsonl, images = make_figures(root, num_articles=100, min_side=800, max_side=1200)
    image_dir = Path(images)
    (image_dir / "PMC9000001_F1_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 50)
    good = next(iter(sorted(image_dir.glob("*.png"))))
    (image_dir / "PMC9000002_F1_0.png").write_bytes(good.read_bytes())
    bad = [
        (
            {"image": "PMC9000000_F1_0.png", "caption": "A figure.", "pmcid": "PMC9000000"},
            "missing_file",
        ),
        (
            {"image": "PMC9000001_F1_0.png", "caption": "A figure.", "pmcid": "PMC9000001"},
            "unreadable_image",
        ),
        ({"image": "PMC9000002_F1_0.png", "caption": "", "pmcid": "PMC9000002"}, "empty_caption"),
    ]
    lines = Path(jsonl).read_text().splitlines()
    expected = {len(lines) + i: reason for i, (_, reason) in enumerate(bad)}
    lines += [json.dumps(record) for record, _ in bad]
    Path(jsonl).write_text("\n".join(lines) + "\n")
    return jsonl, images, expected


def no_slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without SLURM's job variables (the test may itself run inside a SLURM job)."""
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def output_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a make_shards output but its progress records."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_make_shards_array_part_killed_resubmitted_and_merged(
    slurm_cluster: None, tmp_path: Path
) -> None:
    """launch/make_shards_array.sh with K=3: the array and its merge in one command; part 1
    killed mid-way (kill -9: no clean-up), so the merge never runs; part 1 resubmitted
    alone (it resumes: its recorded shards stay as they were), then the merge: every input
    row is in exactly one shard or in skipped.jsonl, the counts add up, inspect_shards
    verifies the manifest, and the 3 parts run by hand without SLURM give the same files."""
    jsonl, images, bad_rows = pmc_like_input(tmp_path / "input")
    num_rows = len(Path(jsonl).read_text().splitlines())
    out = tmp_path / "out"
    # Slow enough to be killed mid-way: one shard per sample, one decoding process.
    args = "--shard-size 1 --workers 1 --resize-max-side 384"
    env = no_slurm_env(
        cpu_env(INPUT=jsonl, IMAGES=images, OUTPUT=str(out), NUM_PARTS="3", MAKE_SHARDS_ARGS=args)
    )

    submitted = subprocess.run(
        ["bash", str(MAKE_SHARDS_ARRAY)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    parts = int(re.search(r"parts: array job (\d+)", submitted.stdout).group(1))  # type: ignore[union-attr]
    merge = int(re.search(r"merge: job (\d+)", submitted.stdout).group(1))  # type: ignore[union-attr]
    assert "--array=<part>" in submitted.stdout, submitted.stdout  # how to resubmit

    # Kill part 1 as soon as it has recorded its first shard.
    progress = out / "_progress" / "part-00001"
    deadline = time.monotonic() + 120
    while not list(progress.glob("*.tar.json")):
        assert time.monotonic() < deadline, "part 1 recorded no shard in 120 s"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=KILL", f"{parts}_1"], check=True, timeout=30)
    wait_for_job(parts)
    killed = show_job(f"{parts}_1")
    assert killed["JobState"] != "COMPLETED" and not (progress / "summary.json").exists(), (
        "part 1 finished before it was killed: make its work larger (more articles or "
        f"larger figures) so that the test kills it mid-way; {killed}"
    )
    kept = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for record in progress.glob("*.tar.json")
        for p in [out / record.name.removesuffix(".json")]
    }
    assert kept
    for task in (0, 2):
        final = show_job(f"{parts}_{task}")
        assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), (
            final,
            job_output(tmp_path, parts),
        )
    # afterok can no longer be met: the merge is cancelled, not left pending, and wrote nothing.
    assert wait_for_job(merge)["JobState"] == "CANCELLED"
    assert not (out / "manifest.json").exists() and not (out / "sizes.json").exists()
    # The merge step of the script, outside SLURM: exit 2 naming the missing part.
    early = subprocess.run(
        ["bash", str(MAKE_SHARDS_ARRAY)],
        env={**env, "MAKE_SHARDS_STEP": "merge"},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert early.returncode == 2, early.stdout + early.stderr
    assert "1 of 3 parts have not finished (--part 1)" in early.stderr, early.stderr
    assert not (out / "manifest.json").exists()

    # Resubmit part 1 alone (it resumes), then the merge after it.
    (tmp_path / "logs").mkdir(exist_ok=True)
    again = subprocess.run(
        ["sbatch", "--parsable", "--array=1", str(MAKE_SHARDS_ARRAY)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert again.returncode == 0, again.stderr
    rerun = int(again.stdout.strip().split(";")[0])
    merged = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--dependency=afterok:{rerun}",
            "--kill-on-invalid-dep=yes",
            "--output=logs/%x-merge-%j.out",
            str(MAKE_SHARDS_ARRAY),
        ],
        cwd=tmp_path,
        env={**env, "MAKE_SHARDS_STEP": "merge"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert merged.returncode == 0, merged.stderr
    merge = int(merged.stdout.strip().split(";")[0])
    final = wait_for_job(merge)
    merge_log = (tmp_path / "logs" / f"make_shards-merge-{merge}.out").read_text()
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), (
        final,
        merge_log,
        job_output(tmp_path, rerun),
    )
    assert show_job(f"{rerun}_1")["ExitCode"] == "0:0"
    for name, identity in kept.items():  # resumed: what part 1 recorded was not rewritten
        stat = (out / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == identity, name

    # Every input row in exactly one shard or in skipped.jsonl.
    from helpers_data import sample_metadata

    written = [meta["row"] for _, meta in sample_metadata(out)]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(written) == len(set(written)), "a row in two shards"
    assert {s["row"]: s["reason"] for s in skipped} == bad_rows
    assert sorted(written + [s["row"] for s in skipped]) == list(range(num_rows))
    manifest = json.loads((out / "manifest.json").read_text())
    rows = manifest["rows"]
    assert rows["read"] == rows["written"] + rows["skipped"] == num_rows, rows
    assert (rows["written"], rows["skipped"]) == (len(written), len(bad_rows)), rows
    assert manifest["parts"] == 3
    inspected = subprocess.run(
        [sys.executable, str(REPO / "tools" / "inspect_shards.py"), str(out), "--samples", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr

    # The same parts by hand, without SLURM (side by side), and their merge: the same files.
    by_hand = tmp_path / "by_hand"
    common = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--output", str(by_hand)]
    inputs = ["--input", jsonl, "--images", images, "--num-parts", "3", *args.split()]
    runs = [
        subprocess.Popen(
            [*common, *inputs, "--part", str(part)],
            env=no_slurm_env(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in range(3)
    ]
    for run in runs:
        _, errors = run.communicate(timeout=180)
        assert run.returncode == 0, errors
    merged_by_hand = subprocess.run(
        [*common, "--merge"], capture_output=True, text=True, timeout=120
    )
    assert merged_by_hand.returncode == 0, merged_by_hand.stderr
    # Shards, indexes, sizes.json and skipped.jsonl byte for byte; the manifest names its
    # --output: the rest of it is compared below.
    files, files_by_hand = output_files(out), output_files(by_hand)
    files_by_hand.pop("manifest.json"), files.pop("manifest.json")
    assert files_by_hand == files
    assert sum(name.endswith(".tar") for name in files) == len(written)
    manifest_by_hand = json.loads((by_hand / "manifest.json").read_text())
    assert manifest_by_hand["options"].pop("output") == str(by_hand)
    assert manifest["options"].pop("output") == str(out)
    assert manifest_by_hand == manifest
