"""Training across nodes: the options, the scheduler's environment, and torchrun's c10d rendezvous.

    nox -s m40 -- --nnodes N --rdzv-endpoint HOST:PORT [--rdzv-id ID] [--node-rank R] [--rdzv-timeout S]

Every node runs the same command; torchrun's c10d rendezvous at HOST:PORT (hosted by the node whose
address it is) joins them into one job. Explicit options win; else Slurm's SLURM_NNODES, SLURM_NODEID
and SLURM_JOB_ID, else torchrun-style NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT are used when
set. The endpoint is taken from the environment only for more than one node, so a stray MASTER_ADDR
never turns a one-box run into a rendezvous. c10d assigns node ranks itself (torchrun ignores
--node-rank for it): the rank a node got is what train.py records; the one given is recorded beside it.

A node that cannot reach the endpoint fails with one line naming it and the deadline: a TCP connect
is tried until --rdzv-timeout before torchrun starts (skipped on the node that hosts the store), and
torchrun's own join timeout is the same number. This module never imports torch.
"""

from __future__ import annotations

import argparse
import math
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from tasks import jsonfile, layout, proc

DEFAULT_PORT = 29500  # torchrun's default rendezvous port
DEFAULT_TIMEOUT_S = 300.0  # long enough for a scheduler to start every node's task; short enough not to hang a job
RDZV_FAILURES = (
    "RendezvousTimeoutError",
    "RendezvousConnectionError",
    "RendezvousClosedError",
    "RendezvousStateError",
    "DistNetworkError",
)


@dataclass(frozen=True)
class Job:
    nnodes: int
    node_rank: int
    host: str
    port: int
    rdzv_id: str
    timeout_s: float
    source: str  # where the settings came from, for the log

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def figures(self) -> dict:
        """What the stage records before torchrun says more (train.py's own figures replace these)."""
        return {
            "nnodes": self.nnodes,
            "node_rank": self.node_rank,
            "node_rank_given": self.node_rank,
            "rdzv_id": self.rdzv_id,
            "rdzv_endpoint": self.endpoint,
        }


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--nnodes",
        type=positive_int,
        default=None,
        metavar="N",
        help="nodes in the training job (default: $SLURM_NNODES, else $NNODES, else 1)",
    )
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        metavar="R",
        help="this node's rank as the scheduler numbers it (default: $SLURM_NODEID, else $NODE_RANK, "
        "else 0); recorded; the c10d rendezvous assigns the rank the job uses",
    )
    parser.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="torchrun's c10d rendezvous, on one of the nodes (default with N > 1: $MASTER_ADDR:$MASTER_PORT)",
    )
    parser.add_argument(
        "--rdzv-id",
        default=None,
        metavar="ID",
        help="the job's name, the same on every node (default: $SLURM_JOB_ID, else m40)",
    )
    parser.add_argument(
        "--rdzv-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up when the rendezvous is not reached or not full after this long (default {DEFAULT_TIMEOUT_S:g})",
    )


def first(*pairs: tuple[object, str]) -> tuple[object, str]:
    """The first (value, source) whose value is set."""
    return next(((v, s) for v, s in pairs if v not in (None, "")), (None, ""))


def resolve(args, env: Mapping[str, str]) -> Job | None:
    """The job this node joins, or None for a run on this machine alone. ValueError: one line."""
    nnodes, n_src = first(
        (getattr(args, "nnodes", None), "--nnodes"),
        (env.get("SLURM_NNODES"), "SLURM_NNODES"),
        (env.get("NNODES"), "NNODES"),
    )
    nnodes = 1 if nnodes is None else whole(nnodes, n_src)
    if nnodes < 1:
        raise ValueError(f"{n_src}={nnodes}: a job has 1 node or more; pass --nnodes N")
    given = getattr(args, "rdzv_timeout", None)
    timeout = DEFAULT_TIMEOUT_S if given is None else float(given)
    if not (math.isfinite(timeout) and timeout > 0):  # refused on one node too: the option is wrong either way
        raise ValueError(f"--rdzv-timeout {timeout:g}: must be more than 0 seconds")
    endpoint, e_src = first((getattr(args, "rdzv_endpoint", None), "--rdzv-endpoint"))
    if endpoint is None and nnodes > 1 and env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"] if ":" not in env["MASTER_ADDR"] else f"[{env['MASTER_ADDR']}]"  # IPv6
        endpoint, e_src = f"{addr}:{env.get('MASTER_PORT') or DEFAULT_PORT}", "MASTER_ADDR/MASTER_PORT"
    rank, r_src = first(
        (getattr(args, "node_rank", None), "--node-rank"),
        (env.get("SLURM_NODEID"), "SLURM_NODEID"),
        (env.get("NODE_RANK"), "NODE_RANK"),
    )
    rank = 0 if rank is None else whole(rank, r_src)
    if nnodes == 1 and r_src != "--node-rank":  # one node alone: a scheduler's rank for its allocation is not ours
        rank, r_src = 0, ""
    if rank >= nnodes:  # a --node-rank given on one node too: never dropped silently
        raise ValueError(f"{r_src}={rank}: a node rank is in 0..{nnodes - 1} for {nnodes} node(s)")
    if endpoint is None:
        if nnodes > 1:
            raise ValueError(
                f"{nnodes} nodes ({n_src}) but no rendezvous: pass --rdzv-endpoint HOST:PORT "
                "(node 0's address) or set MASTER_ADDR; --nnodes 1 runs on this node alone"
            )
        return None
    host, port = split_endpoint(str(endpoint), e_src)
    rdzv_id, i_src = first(
        (getattr(args, "rdzv_id", None), "--rdzv-id"), (env.get("SLURM_JOB_ID"), "SLURM_JOB_ID"), ("m40", "default")
    )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", str(rdzv_id)):
        raise ValueError(f"rendezvous id {rdzv_id!r} ({i_src}): use letters, digits, '_', '.', '-' (64 at most)")
    source = ", ".join(dict.fromkeys(s for s in (n_src or "default", e_src, r_src or "default", i_src)))
    return Job(nnodes, rank, host, port, str(rdzv_id), timeout, source)


def whole(value, source: str) -> int:
    text = str(value).strip()
    if not text.isdigit():
        raise ValueError(f"{source}={value!r} is not a whole number >= 0")
    return int(text)


def split_endpoint(text: str, source: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^\s:\[\]]+)(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"rendezvous endpoint {text!r} ({source}): write HOST:PORT, e.g. node0:29500")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4) or str(DEFAULT_PORT))
    if not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous endpoint {text!r} ({source}): port {port} is not in 1..65535")
    return host, int(port)


def torchrun_args(job: Job, nproc: int) -> list[str]:
    """torchrun's options for this node (no --node-rank: c10d assigns ranks and warns about it)."""
    seconds = max(1, math.ceil(job.timeout_s))  # torchrun reads whole seconds
    conf = f"join_timeout={seconds},read_timeout={seconds}"
    return [
        "--nnodes",
        str(job.nnodes),
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        job.endpoint,
        "--rdzv-id",
        job.rdzv_id,
        "--rdzv-conf",
        conf,
        "--max-restarts",
        "0",
    ]


# --------------------------------------------------------------------------- reaching the rendezvous


def is_local(host: str) -> bool:
    """Whether `host` names this machine (loopback, or an address an interface here holds): this node
    may host the c10d store, so there is nothing to connect to before torchrun starts."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _type, _proto, _name, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))  # binding works only to this machine's own addresses
            return True
        except OSError:
            continue
    return False


def reach(job: Job, *, clock=time.monotonic, sleep=time.sleep) -> str | None:
    """None when the endpoint accepts a TCP connection (or is this machine) before the deadline; else one line."""
    try:
        socket.getaddrinfo(job.host, job.port, type=socket.SOCK_STREAM)
    except OSError as e:
        return (
            f"rendezvous endpoint {job.endpoint}: the host name does not resolve ({e.strerror or e}); "
            "pass --rdzv-endpoint with node 0's address"
        )
    if is_local(job.host):
        return None
    deadline = clock() + job.timeout_s
    last = ""
    while True:
        left = deadline - clock()
        try:
            socket.create_connection((job.host, job.port), timeout=max(0.1, min(5.0, left))).close()
            return None
        except OSError as e:
            last = e.strerror or type(e).__name__
        if clock() >= deadline:
            return (
                f"cannot reach the rendezvous at {job.endpoint} within {job.timeout_s:g} s (--rdzv-timeout; "
                f"last error: {last}); start node 0's run, check the address and that the port is open"
            )
        sleep(min(1.0, max(0.0, deadline - clock())))


def rendezvous_failure(console: str, job: Job) -> str | None:
    """One line when torchrun's console shows the rendezvous failed (not full in time, unreachable)."""
    hit = next((name for name in RDZV_FAILURES if name in console), None)
    if hit is None:
        return None
    return (
        f"the rendezvous at {job.endpoint} (id {job.rdzv_id}) did not form a job of {job.nnodes} node(s) within "
        f"{job.timeout_s:g} s ({hit}); start every node with the same --nnodes, --rdzv-endpoint and --rdzv-id"
    )


# --------------------------------------------------------------------------- cuda_check across nodes

CHECK_RESULT = "allreduce_nodes.json"  # written by training_pt/allreduce_nodes.py into each node's run folder


def check_job(job: Job) -> Job:
    """The all-reduce check's own rendezvous: the next port and its own id, so that a node that finishes
    the check early never meets the closing store of another node's check when the train stage starts."""
    return replace(job, port=job.port + 1, rdzv_id=f"{job.rdzv_id}-check")


def allreduce_across_nodes(
    run_dir: Path, job: Job, python: Path, nproc: int, *, device: str = "auto", mib: int = 256, timeout: float = 600.0
) -> tuple[bool, str, dict]:
    """Run `-m training_pt.allreduce_nodes` as one torchrun job over every node: (passed, one line, figures)."""
    check = check_job(job)
    result_path = run_dir / CHECK_RESULT
    result_path.unlink(missing_ok=True)
    if (unreachable := reach(check)) is not None:
        return False, unreachable, {}
    cmd = proc.gpu_command(
        python,
        layout.ALLREDUCE_NODES_MODULE,
        ["--out", run_dir, "--mib", mib, "--timeout", timeout, "--device", device],
        nproc,
        torchrun_args(check, nproc),
    )
    log = run_dir / layout.ALLREDUCE_NODES_LOG
    log.write_text(f"$ {' '.join(cmd)}\n")
    rc = proc.tee(
        cmd,
        log,
        env=proc.gpu_env(python=python),
        inherit_env=False,
        cwd=layout.ROOT,
        timeout=check.timeout_s + timeout + 60,
        append=True,
    )
    try:
        result = jsonfile.read(result_path)
    except jsonfile.Unreadable as e:
        return False, no_result(result_path, e, rc, log, check), {}
    figures = {
        "nodes_allreduce_busbw_gbs": result.get("busbw_gbs"),
        "world_size": result.get("world_size"),
        "nnodes": result.get("nnodes"),
        "node_rank": result.get("node_rank"),
        "rdzv_id": job.rdzv_id,
    }
    figures = {k: v for k, v in figures.items() if v is not None}
    if result.get("status") == "pass" and rc == 0:
        return True, "", figures
    reason = result.get("reason")
    if not isinstance(reason, str) or not reason:
        reason = f"the all-reduce across nodes exited with code {rc}; see {log.name}"
    return False, reason, figures


def no_result(path: Path, why: jsonfile.Unreadable, rc: int, log: Path, job: Job) -> str:
    """One line for an all-reduce that left no result jsonfile can read (`why`): the rendezvous that never
    formed, a result it never wrote, or one that cannot be read."""
    head = f"the all-reduce across nodes exited with code {rc}"
    if (failed := rendezvous_failure(log.read_text(errors="replace"), job)) is not None:
        return failed
    if not path.exists():
        return f"{head} and wrote no {CHECK_RESULT}; see {log.name}"
    return f"{head} but its {CHECK_RESULT} cannot be read ({why}); see {log.name}"
