"""Training across nodes: options and environment (tasks/multinode.py), the unreachable rendezvous, and
two "nodes" on localhost joined by torchrun's c10d rendezvous through the real train stage, evidence and fleet."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import evidence, fleet, layout, multinode, records, runs, stage
from tasks import train as train_stage
from tasks.records import StageRecord, StageStatus

# tests/test_train.py's tiny GPT-2, smaller still: 4 processes share this CPU, and in float32 (bf16 autocast on a
# CPU without bf16 instructions is ~15x slower per step, measured here: 40 s against 2.8 s).
TINY = [
    "model.config.n_layer=2",
    "model.config.n_head=2",
    "model.config.n_embd=64",
    "model.config.n_positions=64",
    "train.block_size=64",
    "train.batch_size=4",
    "train.steps=6",
    "train.lr=3e-3",
    "train.lr_warmup_steps=2",
    "train.timing_warmup=1",
    "train.compile=false",
    "train.autocast=none",
    "checks.final_window=2",
    "checks.min_loss_drop=0.3",
]


def options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    multinode.add_arguments(parser)
    return parser.parse_args(list(argv))


# --------------------------------------------------------------------------- options and environment


def test_one_machine_without_options_or_environment_is_no_job():
    assert multinode.resolve(options(), {}) is None
    assert multinode.resolve(options(), {"MASTER_ADDR": "10.0.0.1", "SLURM_NNODES": "1"}) is None  # a stray address


def test_slurm_environment_is_picked_up_and_explicit_options_win():
    env = {
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_JOB_ID": "81234",
        "MASTER_ADDR": "gpu001",
        "MASTER_PORT": "29600",
    }
    job = multinode.resolve(options(), env)
    assert (job.nnodes, job.node_rank, job.endpoint, job.rdzv_id) == (4, 2, "gpu001:29600", "81234")
    job = multinode.resolve(
        options("--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "head:1234", "--rdzv-id", "mine"), env
    )
    assert (job.nnodes, job.node_rank, job.endpoint, job.rdzv_id) == (2, 1, "head:1234", "mine")
    assert job.source == "--nnodes, --rdzv-endpoint, --node-rank, --rdzv-id"


def test_one_node_of_a_bigger_allocation_runs_alone_with_nnodes_1():
    """`--nnodes 1` (what the no-rendezvous error advises) on node 2 of a 4-node Slurm allocation, or a stray
    NODE_RANK another tool set: the scheduler's rank is not this run's; only a --node-rank given is judged."""
    assert multinode.resolve(options("--nnodes", "1"), {"SLURM_NNODES": "4", "SLURM_NODEID": "2"}) is None
    assert multinode.resolve(options(), {"NODE_RANK": "1"}) is None


def test_torchrun_style_environment_and_defaults():
    job = multinode.resolve(options(), {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "fe80::1"})
    assert (job.nnodes, job.node_rank, job.host, job.port, job.rdzv_id) == (2, 1, "fe80::1", 29500, "m40")
    assert job.endpoint == "[fe80::1]:29500"
    single = multinode.resolve(options("--rdzv-endpoint", "localhost:29500"), {})  # one node, through the rendezvous
    assert (single.nnodes, single.node_rank, single.endpoint) == (1, 0, "localhost:29500")


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (("--nnodes", "2"), {}, "2 nodes (--nnodes) but no rendezvous: pass --rdzv-endpoint HOST:PORT"),
        (("--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"), {}, "--node-rank=2: a node rank is in 0..1"),
        (("--rdzv-endpoint", "h:99999"), {}, "port 99999 is not in 1..65535"),
        (("--rdzv-endpoint", "h:1", "--rdzv-id", "a b"), {}, "rendezvous id 'a b' (--rdzv-id)"),
        ((), {"SLURM_NNODES": "two", "MASTER_ADDR": "h"}, "SLURM_NNODES='two' is not a whole number"),
        (("--rdzv-timeout", "0"), {}, "--rdzv-timeout 0: must be more than 0 seconds"),  # not the default's 300
        (("--node-rank", "3"), {}, "--node-rank=3: a node rank is in 0..0 for 1 node(s)"),  # never dropped
        (("--nnodes", "1", "--node-rank", "3"), {}, "--node-rank=3: a node rank is in 0..0 for 1 node(s)"),
    ],
)
def test_bad_job_settings_are_one_line(argv, env, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        multinode.resolve(options(*argv), env)
    assert "\n" not in str(err.value)


def test_torchrun_options_for_a_node():
    job = multinode.resolve(
        options("--nnodes", "2", "--rdzv-endpoint", "head:29400", "--rdzv-id", "j1", "--rdzv-timeout", "2.5"), {}
    )
    assert multinode.torchrun_args(job, 8) == [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "head:29400",
        "--rdzv-id",
        "j1",
        "--rdzv-conf",
        "join_timeout=3,read_timeout=3",
        "--max-restarts",
        "0",
    ]


# --------------------------------------------------------------------------- an unreachable rendezvous


def test_unresolvable_endpoint_fails_at_once_naming_it():
    job = multinode.resolve(options("--nnodes", "2", "--rdzv-endpoint", "no-such-node.invalid:29500"), {})
    line = multinode.reach(job)
    assert line.startswith("rendezvous endpoint no-such-node.invalid:29500: the host name does not resolve")


def test_silent_endpoint_fails_after_the_deadline_not_a_hang():
    """A non-local address nothing answers on: connects are retried until --rdzv-timeout, then one line."""
    job = multinode.resolve(options("--nnodes", "2", "--rdzv-endpoint", "192.0.2.1:29500", "--rdzv-timeout", "1.5"), {})
    assert not multinode.is_local("192.0.2.1")  # TEST-NET-1: never this machine's address
    now = [0.0]

    def sleep(s):
        now[0] += s

    line = multinode.reach(job, clock=lambda: now[0], sleep=sleep)
    assert line.startswith("cannot reach the rendezvous at 192.0.2.1:29500 within 1.5 s (--rdzv-timeout; last error:")
    assert 1.5 <= now[0] < 3


def test_this_machine_hosts_the_store_so_nothing_is_tried_first():
    assert multinode.is_local("127.0.0.1") and multinode.is_local("localhost")
    job = multinode.resolve(options("--rdzv-endpoint", "127.0.0.1:1"), {})
    assert multinode.reach(job) is None


def test_torchrun_rendezvous_errors_become_one_line():
    job = multinode.resolve(options("--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-id", "j"), {})
    console = "Traceback ...\ntorch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n"
    assert multinode.rendezvous_failure(console, job) == (
        "the rendezvous at h:1 (id j) did not form a job of 2 node(s) within 300 s (RendezvousTimeoutError); "
        "start every node with the same --nnodes, --rdzv-endpoint and --rdzv-id"
    )
    assert multinode.rendezvous_failure("ValueError: something else", job) is None


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 100_000, "nested too deep to read"),
        (b'[{"status": "pass"}]', "not a JSON object"),
        (b'{"status": "pass", "reason": "\xff"}', "not UTF-8"),
        (None, "not a regular file"),  # a folder in its place
    ],
    ids=["deep", "list", "not-utf8", "folder"],
)
def test_an_allreduce_result_that_cannot_be_read_is_a_fail_line_naming_why(tmp_path, monkeypatch, body, why):
    def tee(cmd, log, **kw):  # the check ran, exit 0, and left this result
        path = tmp_path / multinode.CHECK_RESULT
        path.mkdir() if body is None else path.write_bytes(body)
        return 0

    monkeypatch.setattr(multinode, "reach", lambda job: None)
    monkeypatch.setattr(multinode.proc, "tee", tee)
    job = multinode.resolve(options("--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-id", "j"), {})
    ok, reason, figures = multinode.allreduce_across_nodes(tmp_path, job, Path(sys.executable), 2)
    assert (ok, figures) == (False, {})
    assert reason.startswith(
        f"the all-reduce across nodes exited with code 0 but its {multinode.CHECK_RESULT} cannot be read ({why}"
    ), reason
    assert reason.endswith(f"; see {layout.ALLREDUCE_NODES_LOG}") and "\n" not in reason


def test_an_allreduce_result_whose_reason_is_no_text_fails_with_the_exit_code_instead(tmp_path, monkeypatch):
    def tee(cmd, log, **kw):
        (tmp_path / multinode.CHECK_RESULT).write_text('{"status": "fail", "reason": {"a": [1]}, "world_size": 4}')
        return 1

    monkeypatch.setattr(multinode, "reach", lambda job: None)
    monkeypatch.setattr(multinode.proc, "tee", tee)
    job = multinode.resolve(options("--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-id", "j"), {})
    assert multinode.allreduce_across_nodes(tmp_path, job, Path(sys.executable), 2) == (
        False,
        f"the all-reduce across nodes exited with code 1; see {layout.ALLREDUCE_NODES_LOG}",
        {"world_size": 4, "rdzv_id": "j"},
    )


@pytest.fixture
def venv_python(monkeypatch):
    """The stage runs `.venv-gpu`'s python; here it is this test's interpreter (CPU torch)."""
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: Path(sys.executable))


def test_train_stage_alone_on_two_nodes_fails_at_the_join_timeout_in_one_line(tmp_path, venv_python, capsys):
    """Node 0 of 2 hosts the rendezvous; node 1 never comes: torchrun's join timeout, never a hang."""
    code = stage.main(
        "train",
        [
            "--run-dir",
            str(tmp_path / "m40_v1"),
            "--train-device",
            "cpu",
            "--nnodes",
            "2",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            "--rdzv-id",
            "lonely",
            "--rdzv-timeout",
            "3",
            *sum((["--train-override", o] for o in TINY), []),
        ],
    )
    rec = records.read(tmp_path / "m40_v1", "train")
    assert code == layout.EXIT_STAGE["train"] and rec.status == "fail"
    assert (
        rec.reason.startswith("the rendezvous at 127.0.0.1:")
        and "(id lonely) did not form a job of 2 node(s) within 3 s (RendezvousTimeoutError)" in rec.reason
    )
    assert rec.figures["rdzv_id"] == "lonely" and rec.figures["nnodes"] == 2
    assert rec.duration_s < 120


# --------------------------------------------------------------------------- two nodes on localhost


def free_port() -> int:
    """A free port whose next one is free too (cuda_check's all-reduce across nodes rendezvous there)."""
    while True:
        with socket.socket() as s, socket.socket() as t:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                t.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


# One node: cuda_check's all-reduce across nodes (its checks of this node's GPUs cannot run on a CPU), then the
# train stage, both as the stages run them, with .venv-gpu's python replaced by this CPU-torch one.
NODE = """
import argparse, sys
from pathlib import Path
from tasks import layout, multinode, records, stage
from tasks.records import StageRecord, StageStatus
layout.gpu_python = lambda venv=None: Path(sys.executable)
parser = argparse.ArgumentParser()
multinode.add_arguments(parser)
job = multinode.resolve(parser.parse_known_args(sys.argv[1:])[0], {})
run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
ok, reason, figures = multinode.allreduce_across_nodes(run_dir, job, layout.gpu_python(), 2, device="cpu", mib=1,
                                                       timeout=120)
status = StageStatus.PASS if ok else StageStatus.FAIL
records.write(run_dir, StageRecord("cuda_check", status, reason, figures={"gpus_checked": 0, **figures}))
sys.exit(stage.main("train", sys.argv[1:]) if ok else 30)
"""


def stand_in_gpu_stages(run_dir: Path, host: str) -> None:
    """probe and install cannot run on a CPU: their records stand in, so evidence can judge."""
    figures = {"probe": {"host": host, "driver": "none", "gpu_count": 0}, "install": {"channel": "none (CPU test)"}}
    for name, fig in figures.items():
        records.write(run_dir, StageRecord(name, StageStatus.PASS, "", figures=fig))
    for name in ("probe", "install", "cuda_check"):
        for f in layout.STAGE_FILES[name]:
            (run_dir / f).write_text(f"{name}: stand-in file of tests/test_multinode.py (no GPU here)\n")
    # a passing stage needs its own file too, agreeing with its record (the verdict holds the record to it)
    gpus = {"schema": 1, "source": None, "driver": None, "gate": {"passed": True, "line": "stand-in"}, "gpus": []}
    (run_dir / layout.GPUS_JSON).write_text(json.dumps(gpus))
    (run_dir / layout.CUDA_CHECK_JSON).write_text(json.dumps({"exit_code": 0, "gpus_checked": 0}))


def test_two_nodes_on_localhost_train_as_one_job_and_the_fleet_reads_both(tmp_path, monkeypatch):
    """Two "nodes" (two processes each, gloo) run cuda_check's all-reduce across nodes and then the train stage,
    each as one torchrun job through a c10d rendezvous on a free port (the check on the next port); each node
    seals its own run folder; the fleet report names the job."""
    monkeypatch.delenv(evidence.STEP_SUMMARY_ENV, raising=False)
    endpoint, nodes = f"127.0.0.1:{free_port()}", []
    for rank in range(2):
        run_dir = tmp_path / "collected" / f"node{rank}" / "m40_v1"
        run_dir.mkdir(parents=True)
        stand_in_gpu_stages(run_dir, f"node{rank}")
        argv = [
            "--run-dir",
            str(run_dir),
            "--train-device",
            "cpu",
            "--nproc",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            "sim42",
            "--rdzv-timeout",
            "120",
            *sum((["--train-override", o] for o in TINY), []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(tmp_path / f"node{rank}.out", "w") as out:  # a file, not a pipe: a full pipe would stall a node
            nodes.append(
                subprocess.Popen(
                    [sys.executable, "-c", NODE, *argv],
                    cwd=layout.ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        codes = [p.wait(timeout=600) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the stage's own process group: torchrun ends its workers
    outputs = [(tmp_path / f"node{rank}.out").read_text() for rank in range(2)]
    assert codes == [0, 0], "\n\n".join(outputs)

    ranks = set()
    for rank in range(2):
        run_dir = tmp_path / "collected" / f"node{rank}" / "m40_v1"
        rec = records.read(run_dir, "train")
        assert rec.status == StageStatus.PASS, rec.reason
        fig = rec.figures
        assert (fig["nnodes"], fig["world_size"], fig["rdzv_id"], fig["nproc"]) == (2, 4, "sim42", 2)
        ranks.add(fig["node_rank"])
        log = (run_dir / layout.TRAIN_LOG).read_text()  # each node's leader (local rank 0) writes its own log
        assert "x 4 process(es)" in log and log.rstrip().splitlines()[-1].startswith("PASS: gpt2")
        assert "--rdzv-backend c10d" in (run_dir / layout.TRAIN_CONSOLE).read_text()
        check = records.read(run_dir, "cuda_check")
        assert check.status == StageStatus.PASS and check.figures["rdzv_id"] == "sim42"
        assert (check.figures["nnodes"], check.figures["world_size"]) == (2, 4)
        assert check.figures["nodes_allreduce_busbw_gbs"] > 0
        assert json.loads((run_dir / multinode.CHECK_RESULT).read_text())["wrong"] == 0
        with runs.locked(run_dir):
            assert stage.execute("evidence", run_dir, argparse.Namespace()).ok
        # Sealed, and honest: stand-in GPU stages and training on the CPU never make a full PASS.
        assert json.loads((run_dir / layout.SUMMARY_FILE).read_text())["verdict"] == "PARTIAL"
    assert ranks == {0, 1}  # the rendezvous gave each node its own rank

    out = tmp_path / "report"
    assert fleet.main([str(tmp_path / "collected"), "--out", str(out)]) == layout.EXIT_FLEET_NOT_PASS
    doc = json.loads((out / "fleet.json").read_text())
    assert doc["counts"] == {"PARTIAL": 2}
    assert sorted((r["host"], r["rdzv_id"], r["nnodes"], r["world_size"]) for r in doc["rows"]) == [
        ("node0", "sim42", 2, 4),
        ("node1", "sim42", 2, 4),
    ]
    assert all(r["tok_s"] and r["tok_s"] > 0 and r["nodes_allreduce_busbw_gbs"] > 0 for r in doc["rows"])
    md = (out / "fleet.md").read_text()
    print(md)
    assert "sim42, node 0" in md and "sim42, node 1" in md and "/ 2, world 4 |" in md


def test_stage_command_across_nodes_uses_c10d():
    args = argparse.Namespace(train_config=layout.TRAIN_CONFIG, train_device="auto", train_override=[])
    job = multinode.resolve(options("--rdzv-endpoint", "localhost:29500"), {})
    cmd = train_stage.command(Path("/venv/bin/python"), 1, args, Path("/runs/m40_v1"), job)
    assert cmd[:4] == ["/venv/bin/python", "-m", "torch.distributed.run", "--nnodes"]
    assert "--standalone" not in cmd and cmd[cmd.index("--rdzv-backend") + 1] == "c10d"


def test_cuda_check_keeps_its_own_failure_reason_in_a_job_of_two_nodes(tmp_path, monkeypatch):
    from tasks import cuda_check
    from tasks.records import Outcome, StageStatus

    monkeypatch.setenv("SLURM_NNODES", "2")  # no rendezvous: resolve would raise
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    out = Outcome(StageStatus.FAIL, "1 check(s) FAIL: build: broken .venv-gpu", {"gpus_checked": 0}, ["x"])
    got = cuda_check.across_nodes(tmp_path, options(), tmp_path / "python", out, {})
    assert got is out and got.reason == "1 check(s) FAIL: build: broken .venv-gpu"
