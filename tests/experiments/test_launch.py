"""`--launcher local|slurm`: options from flags and YAML, one submitit job per shard, `--status`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cmafnet.cli import main
from cmafnet.errors import ConfigError
from cmafnet.experiments.launch import load_options, parse_time, state_path

pytest.importorskip("submitit")  # the slurm extra (part of .[all])


@pytest.mark.parametrize(("text", "minutes"), [("90", 90), ("30:30", 31), ("2:00:00", 120), ("1-0", 1440),
                                               ("1-2:30", 1590), ("0-0:0:1", 1)])  # fmt: skip
def test_slurm_times(text: str, minutes: int) -> None:
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "0", "1:2:3:4", "-5"])
def test_bad_times(text: str) -> None:
    with pytest.raises(ConfigError, match="--time"):
        parse_time(text)


def test_flags_override_the_yaml_file(tmp_path: Path) -> None:
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text("partition: gpu\naccount: lab\ntime: '4:00:00'\nmem_gb: 64\nsbatch: {qos: long}\n"
                   "setup: ['module load cuda']\n")  # fmt: skip
    opts = load_options(
        "slurm", cfg, {"partition": "a100", "time": None, "mem_gb": None, "sbatch": ["constraint=h100"]}
    )
    assert (opts.partition, opts.account, opts.time_min, opts.mem_gb) == ("a100", "lab", 240, 64)
    assert opts.sbatch == {"qos": "long", "constraint": "h100"} and opts.setup == ("module load cuda",)
    cfg.write_text("partiton: gpu\n")
    with pytest.raises(ConfigError, match=r"partiton: unknown key\. Did you mean 'partition'"):
        load_options("slurm", cfg, {})
    cfg.write_text("mem_gb: lots\n")
    with pytest.raises(ConfigError, match=r"slurm.yaml: mem_gb: expected int, got 'lots'"):
        load_options("slurm", cfg, {})
    with pytest.raises(ConfigError, match="--sbatch '=x'"):
        load_options("slurm", None, {"sbatch": ["=x"]})


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``srun`` and ``sbatch`` stand-ins on PATH: sbatch keeps the script it was given and answers with a
    job id, as Slurm does; nothing runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {tmp_path}/script.sh\necho "Submitted batch job 4242"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "script.sh"


def test_slurm_array_of_shards_and_status(fake_slurm: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exp"
    (tmp_path / "s.yaml").write_text("account: lab\nsetup: ['module load cuda/12']\n")
    argv = ["experiment", "table8", "--scale", "smoke", "--out", str(out), "--launcher", "slurm", "--jobs", "3",
            "--launcher-config", str(tmp_path / "s.yaml"), "--partition", "gpu", "--time", "2:00:00",
            "--cpus-per-job", "8", "--mem-gb", "32", "--array-parallelism", "2", "--sbatch", "constraint=a100"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert (
        "submitted 3 Slurm jobs: 4242_0 4242_1 4242_2" in text
        and "logs: " in text
        and "--aggregate-only" in text
    )
    script = fake_slurm.read_text()
    for line in ("--partition=gpu", "--account=lab", "--time=120", "--gpus-per-node=1", "--cpus-per-task=8",
                 "--mem=32GB", "--array=0-2%2", "--constraint=a100", "module load cuda/12"):  # fmt: skip
        assert line in script, line
    # Each job pickles the command's own arguments with its shard set and the scheduler options cleared.
    (sub,) = (out / "jobs").iterdir()
    record = json.loads((sub / "submission.json").read_text())
    assert [j["job_id"] for j in record["jobs"]] == ["4242_0", "4242_1", "4242_2"]
    from submitit.core.utils import DelayedSubmission

    job = DelayedSubmission.load(sub / "logs" / "4242_2_submitted.pkl")  # what job 2 will run
    args = job.args[0]
    assert (args.func.__module__, args.shard, args.no_aggregate) == ("cmafnet.cli.experiment", "2/3", True)
    assert args.launcher is args.partition is args.jobs is None and args.out == out
    assert main(["experiment", "--status", "--out", str(out)]) == 0
    status = capsys.readouterr().out
    assert "0 finished, 0 running, 0 failed, 3 waiting" in status
    assert "table8 (smoke): 4 runs: 0 finished, 0 started, 4 not started" in status
    # The jobs report through their state files: one finished, one failed, one still running.
    for k, state in enumerate(({"state": "finished", "exit_code": 0}, {"state": "failed", "exit_code": 1,
                               "error": "boom"}, {"state": "running"})):  # fmt: skip
        path = state_path(sub, (k, 3))
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(state))
    assert main(["experiment", "--status", "--out", str(out)]) == 0
    status = capsys.readouterr().out
    assert (
        "1 finished, 1 running, 1 failed, 0 waiting" in status
        and "failed: shard 1/3 (job 4242_1): boom" in status
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--partition", "gpu"], "--partition goes with --launcher"),
        (["--launcher", "local", "--shard", "0/2"], "--shard picks one shard by hand"),
        (["--launcher", "slurm"], "no Slurm here (srun not found)"),
        (["--launcher", "local", "--time", "soon"], "--time 'soon'"),
    ],
)
def test_launcher_usage_errors(extra: list[str], message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert main(["experiment", "table8", "--scale", "smoke", "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_without_submitit_the_launcher_says_how_to_install_it(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    assert main(["experiment", "table8", "--out", str(tmp_path), "--launcher", "local"]) == 2
    assert "pip install 'cmafnet[slurm]'" in capsys.readouterr().err


@pytest.mark.slow
def test_table8_shards_as_local_jobs_aggregate_like_a_plain_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """Two submitit jobs (two processes) each profile one model; the table is the one a plain run of
    the same command builds from those results, and a resubmission finds nothing to do."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs share the test machine's cores
    out = tmp_path / "exp"
    # two of the four models, at 32 px: the smallest profile that still runs every part of each model
    base = ["experiment", "table8", "--scale", "smoke", "--out", str(out), "--device", "cpu",
            "--only", "efficientnet_b3", "cmafnet", "--set", "model.img_size=32"]  # fmt: skip
    assert main([*base, "--launcher", "local", "--jobs", "2", "--array-parallelism", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count(": shard ") == 2 and "| CMAF-Net |" in text
    (sub,) = (out / "jobs").iterdir()
    states = [json.loads(state_path(sub, (k, 2)).read_text()) for k in range(2)]
    assert [s["state"] for s in states] == ["finished", "finished"]
    assert states[0]["job_id"] != states[1]["job_id"]  # two processes
    assert (out / "runs/efficientnet_b3/profile/result_profile.json").exists()
    table = (out / "table8" / "table.json").read_text()
    assert main(base) == 0  # a plain run: nothing left to do, the same table
    assert "2 already finished, 0 evaluated" in capsys.readouterr().out
    assert (out / "table8" / "table.json").read_text() == table
    assert main([*base, "--launcher", "local"]) == 0
    assert "nothing to submit: every shard is finished" in capsys.readouterr().out
    assert main(["experiment", "--status", "--out", str(out)]) == 0
    assert "2 finished, 0 running, 0 failed, 0 waiting" in capsys.readouterr().out
