"""The shell launchers, without training: PYTHON is a stub that prints the arguments it receives.

Each launcher runs from a temporary copy of the repository's launchers (a fresh clone: no
output/pretrain_tiny/checkpoint-last.pth), so the default-weights paths never exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S, REPO

LAUNCHERS = [
    "train.sh",
    "finetune.sh",
    "linprobe.sh",
    "knn.sh",
    "segment.sh",
    "train_distributed.sh",
    "tools/launcher_lib.sh",
]
TORCHRUN = ["-m", "torch.distributed.run"]


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in LAUNCHERS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    return root


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    path = tmp_path / "stub_python"
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "mine.pth"
    path.write_bytes(b"not read by the stub")
    return path


def run(
    clone: Path, stub: Path, launcher: str, *args: str, cwd: Path = REPO, **env: str
) -> subprocess.CompletedProcess:
    """bash <launcher> args from the folder ``cwd`` with a minimal environment (none of the launchers' variables
    unless given)."""
    base = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHON": str(stub),
        "NUM_GPUS": "2",
        "SAMPLE_EVAL": "0",
    }  # train.sh's closing evaluation is a second command; tested on its own
    return subprocess.run(
        ["bash", str(clone / launcher), *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def argv(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def values(args: list[str], flag: str) -> list[list[str]]:
    """The values of every occurrence of flag (up to the next --flag)."""
    found = []
    for i, arg in enumerate(args):
        if arg == flag:
            rest = []
            for value in args[i + 1 :]:
                if value.startswith("--"):
                    break
                rest.append(value)
            found.append(rest)
    return found


# finetune.sh / linprobe.sh: --finetune replaces WEIGHTS, and the default is not checked


@pytest.mark.parametrize("form", ["split", "equals", "abbreviated"])
def test_finetune_flag_replaces_default_weights(clone, stub, weights, form):
    flags = {
        "split": ["--finetune", str(weights)],
        "equals": [f"--finetune={weights}"],
        "abbreviated": ["--fine", str(weights)],
    }[form]
    args = argv(run(clone, stub, "finetune.sh", *flags, "--epochs", "1"))
    assert args[0] == "main_finetune.py"
    assert "output/pretrain_tiny/checkpoint-last.pth" not in args
    assert [a for a in args if a.startswith("--fine")] == [flags[0]]  # the user's flag only
    assert values(args, "--epochs") == [["1"]]


def test_finetune_default_weights_missing(clone, stub):
    result = run(clone, stub, "finetune.sh")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"error: no weights at {clone}/output/pretrain_tiny/checkpoint-last.pth: run 'bash train.sh' first, "
        "or give --finetune PATH / set WEIGHTS (published weights: weights/README.md)\n"
    )


@pytest.mark.parametrize("how", ["WEIGHTS", "--finetune", "the <weights> argument"])
def test_finetune_user_weights_missing(clone, stub, tmp_path, how):
    missing = str(tmp_path / "weights" / "x.pth")
    if how == "WEIGHTS":
        result = run(clone, stub, "finetune.sh", WEIGHTS=missing)
    elif how == "--finetune":
        result = run(clone, stub, "finetune.sh", "--finetune", missing, WEIGHTS=str(tmp_path / "other.pth"))
    else:
        result = run(clone, stub, "finetune.sh", "vit_base_patch16", missing)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: no weights at {missing} (from {how})\n"


def test_finetune_variables_and_defaults(clone, stub, weights):
    args = argv(run(clone, stub, "finetune.sh", "--blr", "2e-3", WEIGHTS=str(weights), EPOCHS="7"))
    assert args == [
        "main_finetune.py",
        "--finetune",
        str(weights),
        "--input_size",
        "64",
        "--epochs",
        "7",
        "--warmup_epochs",
        "3",
        "--batch_size",
        "32",
        "--train_path",
        "data/sentinel2_rgb/train.csv",
        "--output_dir",
        "output/finetune_tiny",
        "--num_workers",
        "2",
        "--blr",
        "2e-3",
    ]


def test_finetune_upstream_positional_form(clone, stub, weights):
    args = argv(run(clone, stub, "finetune.sh", "vit_large_patch16", str(weights), "--nb_classes", "62"))
    assert values(args, "--model") == [["vit_large_patch16"]]
    assert values(args, "--finetune") == [[str(weights)]]
    assert args[-2:] == ["--nb_classes", "62"]


def test_finetune_random_init_with_empty_flag(clone, stub):
    args = argv(run(clone, stub, "finetune.sh", "--model", "vit_tiny_patch16", "--finetune", ""))
    assert values(args, "--model") == [["vit_tiny_patch16"]]
    assert args.count("--finetune") == 1 and args[args.index("--finetune") + 1] == ""


def test_config_file_is_not_overridden_by_launcher_defaults(clone, stub):
    args = argv(run(clone, stub, "finetune.sh", "--config", "run.yaml", EPOCHS="5"))
    config = str(REPO / "run.yaml")  # from the folder of the call
    assert args == ["main_finetune.py", "--epochs", "5", "--config", config]  # no default WEIGHTS check either
    assert argv(run(clone, stub, "train.sh", "--config=run.yaml")) == ["main_pretrain.py", f"--config={config}"]


def test_linprobe_defaults_and_flag(clone, stub, weights):
    args = argv(run(clone, stub, "linprobe.sh", "--finetune", str(weights)))
    assert args[0] == "main_linprobe.py"
    assert values(args, "--finetune") == [[str(weights)]]
    assert values(args, "--epochs") == [["90"]] and values(args, "--blr") == [["10"]]
    assert values(args, "--output_dir") == [["output/linprobe_tiny"]]
    assert args[-1] == "--no_aug"
    args = argv(run(clone, stub, "linprobe.sh", "--finetune", str(weights), "--epochs", "2", BLR="0.1", EXTRA=""))
    assert values(args, "--epochs") == [["2"]] and values(args, "--blr") == [["0.1"]] and "--no_aug" not in args


def test_linprobe_default_weights_missing(clone, stub):
    result = run(clone, stub, "linprobe.sh")
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"error: no weights at {clone}/output/pretrain_tiny/checkpoint-last.pth: run 'bash train.sh'"
    )


# knn.sh: --checkpoints is the only list passed


def test_knn_flag_replaces_checkpoints(clone, stub, weights):
    args = argv(
        run(
            clone, stub, "knn.sh", "--checkpoints", "none", str(weights), "--pool", "mean", CHECKPOINTS="/nowhere/a.pth"
        )
    )
    assert values(args, "--checkpoints") == [["none", str(weights)]]
    assert "/nowhere/a.pth" not in args and "output/pretrain_tiny/checkpoint-last.pth" not in args
    assert args[-2:] == ["--pool", "mean"]


def test_knn_positional_and_variable(clone, stub, weights, tmp_path):
    other = tmp_path / "other.pth"
    other.write_bytes(b"")
    args = argv(run(clone, stub, "knn.sh", str(weights), str(other)))
    assert args[:4] == ["main_knn.py", "--checkpoints", str(weights), str(other)]
    args = argv(run(clone, stub, "knn.sh", CHECKPOINTS=f"none {weights}"))
    assert values(args, "--checkpoints") == [["none", str(weights)]]


def test_knn_missing_checkpoints(clone, stub, weights, tmp_path):
    result = run(clone, stub, "knn.sh")
    assert result.returncode == 1
    assert result.stderr == (
        f"error: no checkpoint at {clone}/output/pretrain_tiny/checkpoint-last.pth: run 'bash train.sh' first, "
        "or give --checkpoints PATH... / set CHECKPOINTS (published weights: weights/README.md)\n"
    )
    missing = str(tmp_path / "gone.pth")
    result = run(clone, stub, "knn.sh", f"--checkpoints={missing}")
    assert (result.returncode, result.stderr) == (1, f"error: no checkpoint at {missing} (from --checkpoints)\n")
    result = run(clone, stub, "knn.sh", str(weights), missing)
    assert result.stderr == f"error: no checkpoint at {missing} (from the <checkpoint> arguments)\n"


# train.sh


def test_a_stopped_quick_start_evaluates_nothing_and_exits_with_the_trainers_status(clone, tmp_path):
    """A trainer stopped by SIGTERM exits 143 after its checkpoint (util.run.process.stopped_exit_status): train.sh
    must not evaluate the partial run, must exit 143 too, and must say how to continue."""
    stopped = tmp_path / "stopped_python"
    stopped.write_text(
        '#!/usr/bin/env bash\nif [[ $1 == main_pretrain.py ]]; then exit 143; fi\necho "evaluated: $*"\n'
    )
    stopped.chmod(0o755)
    result = run(clone, stopped, "train.sh", "--epochs", "3", SAMPLE_EVAL="1")
    assert result.returncode == 143 and "evaluated" not in result.stdout
    assert "training stopped (status 143), no evaluation of an unfinished run" in result.stderr
    assert "bash train.sh --epochs 3 --resume auto" in result.stderr
    failed = tmp_path / "failed_python"
    failed.write_text("#!/usr/bin/env bash\nexit 1\n")
    failed.chmod(0o755)
    result = run(clone, failed, "train.sh", SAMPLE_EVAL="1")
    assert result.returncode == 1 and "training stopped" not in result.stderr  # an error is its own message


def test_the_quick_start_ends_with_the_sample_evaluation(clone, stub):
    lines = argv(run(clone, stub, "train.sh", SAMPLE_EVAL="1"))
    assert lines[0] == "main_pretrain.py" and "--norm_pix_loss" in lines
    evaluation = lines[lines.index("tools/sample_eval.py") :]
    assert evaluation == [
        "tools/sample_eval.py",
        "output/pretrain_tiny/checkpoint-last.pth",
        "--sample",
        "data/sentinel2_rgb",
    ]
    other_data = argv(run(clone, stub, "train.sh", "--train_path", "elsewhere.csv", SAMPLE_EVAL="1"))
    assert "tools/sample_eval.py" not in other_data  # only the embedded sample has the evaluation's blocks
    assert "--norm_pix_loss" not in argv(run(clone, stub, "train.sh", NORM_PIX_LOSS="0"))


def test_train_upstream_positional_form(clone, stub):
    args = argv(run(clone, stub, "train.sh", "mae_vit_base_MsLdCeCd", "scaled_dot_product", "mse", "--epochs", "400"))
    assert values(args, "--model") == [["mae_vit_base_MsLdCeCd"]]
    assert values(args, "--attn_name") == [["scaled_dot_product"]] and values(args, "--loss") == [["mse"]]
    assert values(args, "--epochs") == [["400"]]


def test_train_flag_beats_variable(clone, stub):
    args = argv(run(clone, stub, "train.sh", "--epochs=1", "--output_dir", "X", EPOCHS="9", OUTPUT_DIR="Y"))
    assert "--epochs" not in args and args.count("--epochs=1") == 1
    assert values(args, "--output_dir") == [[str(REPO / "X")]]  # the user's path, from the folder of the call
    assert values(argv(run(clone, stub, "train.sh", EPOCHS="9")), "--epochs") == [["9"]]


# DATA=sentinel2_ms: the 13-band sample, one variable for the four launchers

MS_BANDS = ["--in_chans", "13", "--band_stats", "data/sentinel2_ms/band_stats.json"]


def test_train_on_the_multispectral_sample(clone, stub):
    lines = argv(run(clone, stub, "train.sh", DATA="sentinel2_ms", SAMPLE_EVAL="1"))
    args = lines[: lines.index("tools/sample_eval.py")]
    assert values(args, "--train_path") == [["data/sentinel2_ms/train.csv"]]
    assert values(args, "--output_dir") == [["output/pretrain_tiny_ms"]]  # never the RGB run's folder
    assert values(args, "--in_chans") == [["13"]] and values(args, "--band_stats") == [[MS_BANDS[3]]]
    assert values(args, "--rgb_bands") == [["3", "2", "1"]]
    assert values(args, "--input_size") == [["64"]] and values(args, "--patch_size") == [["8"]]
    assert lines[lines.index("tools/sample_eval.py") :] == [
        "tools/sample_eval.py",
        "output/pretrain_tiny_ms/checkpoint-last.pth",
        "--sample",
        "data/sentinel2_ms",
    ]
    rgb = argv(run(clone, stub, "train.sh"))
    assert "--in_chans" not in rgb and "--band_stats" not in rgb and "--rgb_bands" not in rgb
    flags_win = argv(run(clone, stub, "train.sh", "--rgb_bands", "7", "--output_dir", "X", DATA="sentinel2_ms"))
    assert values(flags_win, "--rgb_bands") == [["7"]] and values(flags_win, "--output_dir") == [[str(REPO / "X")]]
    with_config = argv(run(clone, stub, "train.sh", "--config", "c.yaml", DATA="sentinel2_ms"))
    assert values(with_config, "--in_chans") == [["13"]] and "--epochs" not in with_config  # DATA is the user's


@pytest.mark.parametrize(
    "launcher, output", [("finetune.sh", "output/finetune_tiny_ms"), ("linprobe.sh", "output/linprobe_tiny_ms")]
)
def test_finetune_and_linprobe_on_the_multispectral_sample(clone, stub, launcher, output, tmp_path):
    missing = run(clone, stub, launcher, DATA="sentinel2_ms")
    assert missing.returncode == 1 and missing.stderr.startswith(
        f"error: no weights at {clone}/output/pretrain_tiny_ms/checkpoint-last.pth: run 'DATA=sentinel2_ms bash "
        "train.sh' first"
    )
    (clone / "output" / "pretrain_tiny_ms").mkdir(parents=True)
    (clone / "output" / "pretrain_tiny_ms" / "checkpoint-last.pth").write_bytes(b"")
    result = subprocess.run(
        ["bash", launcher],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={"PATH": os.environ["PATH"], "PYTHON": str(stub), "DATA": "sentinel2_ms"},
    )
    args = argv(result)
    assert values(args, "--finetune") == [["output/pretrain_tiny_ms/checkpoint-last.pth"]]
    assert values(args, "--train_path") == [["data/sentinel2_ms/train.csv"]]
    assert "--test_path" not in args  # Python's default: the sample's val.csv, for the sample's train.csv only
    assert values(args, "--output_dir") == [[output]] and values(args, "--input_size") == [["64"]]
    assert values(args, "--in_chans") == [["13"]] and values(args, "--band_stats") == [[MS_BANDS[3]]]


def test_segment_on_the_multispectral_sample(clone, stub):
    (clone / "output" / "pretrain_tiny_ms").mkdir(parents=True)
    (clone / "output" / "pretrain_tiny_ms" / "checkpoint-last.pth").write_bytes(b"")
    args = argv(run(clone, stub, "segment.sh", DATA="sentinel2_ms"))
    assert values(args, "--finetune") == [["output/pretrain_tiny_ms/checkpoint-last.pth"]]
    assert values(args, "--train_path") == [["data/sentinel2_ms/seg_train.csv"]]
    assert values(args, "--palette") == [["data/sentinel2_ms/seg_palette.json"]]
    assert values(args, "--input_size") == [["64"]] and values(args, "--output_dir") == [["output/segment_tiny_ms"]]
    assert values(args, "--in_chans") == [["13"]] and values(args, "--band_stats") == [[MS_BANDS[3]]]
    assert values(args, "--rgb_bands") == [["3", "2", "1"]]  # the figures in true colour (B04 B03 B02)
    rgb = argv(run(clone, stub, "segment.sh", "--finetune", str(clone / "output/pretrain_tiny_ms/checkpoint-last.pth")))
    assert values(rgb, "--input_size") == [["128"]] and "--in_chans" not in rgb and "--rgb_bands" not in rgb


def test_knn_on_the_multispectral_sample(clone, stub, weights):
    args = argv(run(clone, stub, "knn.sh", "--checkpoints", "none", str(weights), DATA="sentinel2_ms"))
    assert values(args, "--train_path") == [["data/sentinel2_ms/train.csv"]] and values(args, "--output_dir") == [
        ["output/knn_ms"]
    ]
    assert values(args, "--in_chans") == [["13"]] and values(args, "--band_stats") == [[MS_BANDS[3]]]
    missing = run(clone, stub, "knn.sh", DATA="sentinel2_ms")
    assert (
        f"no checkpoint at {clone}/output/pretrain_tiny_ms/checkpoint-last.pth: run 'DATA=sentinel2_ms bash "
        "train.sh' first" in missing.stderr
    )


def test_an_unknown_sample_is_a_one_line_error(clone, stub):
    result = run(clone, stub, "train.sh", DATA="sentinel2")
    assert result.returncode == 1 and result.stderr == (
        "error: DATA=sentinel2: the embedded samples are sentinel2_rgb and sentinel2_ms (other data: set TRAIN_PATH)\n"
    )


# train_distributed.sh


def torchrun_args(master_port: str) -> list[str]:
    return [
        *TORCHRUN,
        "--nnodes",
        "1",
        "--node_rank",
        "0",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        master_port,
    ]


def test_distributed_runs_chosen_launcher(clone, stub, weights):
    args = argv(run(clone, stub, "train_distributed.sh", "--finetune", str(weights), LAUNCHER="finetune.sh"))
    assert args[:12] == torchrun_args("29500")
    assert args[12] == "main_finetune.py" and values(args, "--finetune") == [[str(weights)]]
    args = argv(run(clone, stub, "train_distributed.sh", "none", str(weights), LAUNCHER="knn.sh"))
    assert args[12:15] == ["main_knn.py", "--checkpoints", "none"]
    args = argv(run(clone, stub, "train_distributed.sh", "--finetune", str(weights), LAUNCHER="linprobe.sh"))
    assert args[12] == "main_linprobe.py"
    assert argv(run(clone, stub, "train_distributed.sh"))[12] == "main_pretrain.py"


def test_distributed_unknown_launcher(clone, stub):
    result = run(clone, stub, "train_distributed.sh", LAUNCHER="eval.sh")
    assert result.returncode == 1 and result.stdout == ""
    assert (
        result.stderr == "error: LAUNCHER=eval.sh: expected train.sh, finetune.sh, linprobe.sh, knn.sh or segment.sh\n"
    )


def test_distributed_master_port_from_slurm(clone, stub):
    assert argv(run(clone, stub, "train_distributed.sh", SLURM_JOB_ID="123456"))[:12] == torchrun_args("23456")
    assert argv(run(clone, stub, "train_distributed.sh", SLURM_JOB_ID="40000"))[:12] == torchrun_args("20000")
    assert argv(run(clone, stub, "train_distributed.sh", SLURM_JOB_ID="123456", MASTER_PORT="31000"))[
        :12
    ] == torchrun_args("31000")


@pytest.mark.parametrize(
    "nodes, first",
    [
        ("gpu[01-02]", "gpu01"),
        ("alpha,beta", "alpha"),
        ("node[001,003-004]", "node001"),
        ("rack[2-3]-n[07-08]", "rack2-n07"),
        ("gpu-[01-02]", "gpu-01"),
        ("a[1-2],b[3]", "a1"),
        ("node[001,003-004],other", "node001"),
        ("host.example.com,other", "host.example.com"),
    ],
)
def test_distributed_master_addr_from_the_node_list_without_scontrol(clone, stub, nodes, first):
    """SLURM inside Apptainer / enroot has no scontrol: every node fell back to 127.0.0.1 and waited on its own
    loopback until torchrun timed out (pytorch-lightning#14896)."""
    if shutil.which("scontrol"):
        pytest.skip("scontrol is installed here")
    args = argv(run(clone, stub, "train_distributed.sh", SLURM_JOB_NODELIST=nodes, SLURM_NNODES="2", SLURM_NODEID="1"))
    assert args[args.index("--master_addr") + 1] == first and args[args.index("--nnodes") + 1] == "2"


@pytest.mark.parametrize("scontrol", ["fails", "works"])
def test_distributed_master_addr_with_a_scontrol_that_fails_is_parsed_from_the_node_list(
    clone, stub, tmp_path, scontrol
):
    """A container binding scontrol without slurm.conf: it fails, and the job was refused as if the node list could
    not be told. One that works is still used (its answer wins)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    body = 'echo "scontrol: error: s_p_parse_file: unable to status file /etc/slurm/slurm.conf" >&2; exit 1'
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n{body if scontrol == 'fails' else 'echo from-scontrol'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    result = run(clone, stub, "train_distributed.sh", PATH=path, SLURM_JOB_NODELIST="gpu-[01-02]", SLURM_NNODES="2")
    args = argv(result)
    assert args[args.index("--master_addr") + 1] == ("gpu-01" if scontrol == "fails" else "from-scontrol")
    assert result.stderr == ""


def test_distributed_without_a_master_addr_it_can_tell_is_refused_on_several_nodes(clone, stub):
    if shutil.which("scontrol"):
        pytest.skip("scontrol is installed here")
    result = run(clone, stub, "train_distributed.sh", SLURM_JOB_NODELIST="gpu[", SLURM_NNODES="2")
    assert result.returncode == 1 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: NNODES=2 but no MASTER_ADDR") and "export MASTER_ADDR" in result.stderr
    one_node = argv(run(clone, stub, "train_distributed.sh", SLURM_JOB_NODELIST="gpu[", SLURM_NNODES="1"))
    assert one_node[one_node.index("--master_addr") + 1] == "127.0.0.1"  # one node: its own loopback is right


def test_distributed_forwards_usr1_to_workers(clone, tmp_path):
    stub = tmp_path / "env_stub"
    stub.write_text('#!/usr/bin/env bash\necho "$PET_SIGNALS_TO_HANDLE"\necho "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"\n')
    stub.chmod(0o755)
    assert argv(run(clone, stub, "train_distributed.sh")) == ["SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "120"]


# Relative paths the user gives resolve against the folder the launcher is called from (the launchers cd into the
# repository, where their own defaults are relative)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A folder outside the clone holding the user's files: mine.pth, other.pth, stats.json, mydata/."""
    home = tmp_path / "home"
    (home / "mydata").mkdir(parents=True)
    for name in ("mine.pth", "other.pth", "stats.json"):
        (home / name).write_bytes(b"")
    return home


def test_the_users_relative_flags_resolve_against_the_folder_of_the_call(clone, stub, elsewhere):
    args = argv(
        run(
            clone,
            stub,
            "train.sh",
            "--train_path",
            "mydata",
            "--output_dir=./out",
            "--band",  # an abbreviation of --band_stats argparse accepts
            "stats.json",
            "--init",
            str(elsewhere / "mine.pth"),  # absolute: as given
            "--resume",
            "auto",  # a word, not a path
            cwd=elsewhere,
        )
    )
    assert values(args, "--train_path") == [[f"{elsewhere}/mydata"]]
    assert (
        f"--output_dir={elsewhere}/out" in args and "--output_dir" not in args
    )  # the launcher's default is not passed
    assert values(args, "--band") == [[f"{elsewhere}/stats.json"]]
    assert values(args, "--init") == [[f"{elsewhere}/mine.pth"]] and values(args, "--resume") == [["auto"]]


def test_the_users_path_variables_resolve_against_the_folder_of_the_call(clone, stub, elsewhere):
    args = argv(
        run(
            clone,
            stub,
            "finetune.sh",
            cwd=elsewhere,
            WEIGHTS="mine.pth",
            TRAIN_PATH="mydata",
            TEST_PATH="split",
            OUTPUT_DIR="out",
            BAND_STATS="stats.json",
            DATA="sentinel2_ms",  # the sample's band statistics would be the repository's: the user's win
        )
    )
    assert values(args, "--finetune") == [[f"{elsewhere}/mine.pth"]]
    assert values(args, "--train_path") == [[f"{elsewhere}/mydata"]] and values(args, "--test_path") == [["split"]]
    assert values(args, "--output_dir") == [[f"{elsewhere}/out"]]
    assert values(args, "--band_stats") == [[f"{elsewhere}/stats.json"]]
    default = argv(run(clone, stub, "finetune.sh", "--finetune", "mine.pth", cwd=elsewhere))
    assert values(default, "--train_path") == [["data/sentinel2_rgb/train.csv"]]  # the launcher's own: in the clone
    assert values(default, "--output_dir") == [["output/finetune_tiny"]]


def test_positional_weights_and_checkpoints_resolve_against_the_folder_of_the_call(clone, stub, elsewhere):
    args = argv(run(clone, stub, "finetune.sh", "vit_tiny_patch16", "mine.pth", cwd=elsewhere))
    assert values(args, "--finetune") == [[f"{elsewhere}/mine.pth"]]
    args = argv(run(clone, stub, "knn.sh", "none", "mine.pth", "other.pth", cwd=elsewhere))
    assert values(args, "--checkpoints") == [["none", f"{elsewhere}/mine.pth", f"{elsewhere}/other.pth"]]
    args = argv(run(clone, stub, "knn.sh", "--checkpoints", "none", "mine.pth", "--pool", "mean", cwd=elsewhere))
    assert values(args, "--checkpoints") == [["none", f"{elsewhere}/mine.pth"]]
    args = argv(run(clone, stub, "knn.sh", cwd=elsewhere, CHECKPOINTS="none other.pth"))
    assert values(args, "--checkpoints") == [["none", f"{elsewhere}/other.pth"]]


def test_nested_launchers_resolve_against_the_first_ones_caller(clone, stub, elsewhere):
    args = argv(run(clone, stub, "linprobe.sh", "--finetune", "mine.pth", cwd=elsewhere))
    assert args[0] == "main_linprobe.py" and values(args, "--finetune") == [[f"{elsewhere}/mine.pth"]]
    args = argv(run(clone, stub, "train_distributed.sh", cwd=elsewhere, LAUNCHER="segment.sh", WEIGHTS="mine.pth"))
    assert args[12] == "main_segment.py" and values(args, "--finetune") == [[f"{elsewhere}/mine.pth"]]


def test_a_missing_path_is_named_absolute(clone, stub, elsewhere):
    result = run(clone, stub, "finetune.sh", "--finetune", "gone.pth", cwd=elsewhere)
    assert (result.returncode, result.stderr) == (1, f"error: no weights at {elsewhere}/gone.pth (from --finetune)\n")
    result = run(clone, stub, "knn.sh", "none", "gone.pth", cwd=elsewhere)
    assert result.stderr == f"error: no checkpoint at {elsewhere}/gone.pth (from the <checkpoint> arguments)\n"


@pytest.mark.parametrize("launcher", ["finetune.sh", "linprobe.sh", "knn.sh", "segment.sh"])
def test_the_users_training_data_gets_no_sample_evaluation_set(clone, stub, elsewhere, launcher):
    args = argv(
        run(
            clone,
            stub,
            launcher,
            "--finetune" if launcher != "knn.sh" else "--checkpoints",
            "mine.pth",
            cwd=elsewhere,
            TRAIN_PATH="mydata",
        )
    )
    assert values(args, "--train_path") == [[f"{elsewhere}/mydata"]]
    assert (
        "--test_path" not in args
    )  # Python asks for --test_path PATH or split (tests/integration/test_main_finetune.py)


@pytest.mark.parametrize(
    "launcher, script",
    [
        ("train.sh", "main_pretrain.py"),
        ("finetune.sh", "main_finetune.py"),
        ("linprobe.sh", "main_linprobe.py"),
        ("knn.sh", "main_knn.py"),
        ("segment.sh", "main_segment.py"),
    ],
)
def test_help_shows_the_launcher_and_its_script_and_runs_nothing(clone, stub, launcher, script):
    """Before: train.sh --help ran the closing evaluation after the help; the evaluation launchers refused --help
    in a fresh clone (no pretrained weights yet)."""
    result = run(clone, stub, launcher, "--epochs", "1", "--help", SAMPLE_EVAL="1")
    assert result.returncode == 0, result.stderr
    header, _, called = result.stdout.rpartition("\n\n")
    lines = (REPO / launcher).read_text().splitlines()[1:]
    comments = [
        line.removeprefix("#").removeprefix(" ")
        for line in lines[: next(i for i, s in enumerate(lines) if not s.startswith("#"))]
    ]
    assert header.splitlines() == comments  # the whole comment block under the shebang line, its last line too
    assert called.splitlines() == [script, "--help"]  # the stub prints its arguments: the script's help, only that


def test_distributed_names_a_python_without_the_requirements_in_one_line(tmp_path):
    """torchrun is ``python -m torch.distributed.run``: a Python without torch failed there, in Python's own words,
    before util's line naming the interpreter and what it lacks."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.util\n"
        "find_spec = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'torch' else find_spec(name, *a)\n"
    )
    python = tmp_path / "python_without_torch"
    python.write_text(f'#!/usr/bin/env bash\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    result = subprocess.run(
        ["bash", str(REPO / "train_distributed.sh")],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {sys.executable} has no torch: ") and result.stderr.count("\n") == 1
