"""`nox -s fleet`: one report over many nodes' run folders, built here by the real stage records and evidence."""

from __future__ import annotations

import argparse
import csv
import json
import os

import fake_gpu
import pytest

from tasks import cuda_check, evidence, fleet, layout, records, runs, stage
from tasks.records import StageRecord, StageStatus

MODEL, NAME = "H100 SXM", "NVIDIA H100 80GB HBM3"


@pytest.fixture(autouse=True)
def no_step_summary(monkeypatch):
    monkeypatch.delenv(evidence.STEP_SUMMARY_ENV, raising=False)


# What a healthy node's stages record besides their figures (tasks/verdict.py: a full PASS).
TORCH_ID = {"version": "2.11.0+cu130", "file": "/m/.venv-gpu/torch/__init__.py", "record_sha256": "0" * 64}


def checker_result(gpus: int, bf16: float, copy: float, failed: bool = False) -> dict:
    """cuda_check.json as the checker writes it (the parts the stage's figures come from)."""
    checks = []
    for i in range(gpus):  # the slowest GPU sets the node's figure: GPU 0 a little faster than the rest
        checks.append(
            {"name": "speed.matmul_bf16", "gpu": i, "status": "PASS", "data": {"tflops": bf16 + 5.0 * (i == 0)}}
        )
        checks.append({"name": "speed.copy", "gpu": i, "status": "PASS", "data": {"tbs": copy + 0.1 * (i == 0)}})
    if gpus > 1:
        checks.append({"name": "allreduce", "gpu": None, "status": "PASS", "data": {"busbw_gbs": 360.0}})
    return {
        "exit_code": 1 if failed else 0,
        "gpus_checked": gpus,
        "counts": {"PASS": len(checks)},
        "versions": {"torch": "2.11.0+cu130"},
        "torch_identity": TORCH_ID,
        "checks": checks,
    }


def make_node(
    root,
    host: str,
    *,
    gpus: int = 8,
    model: str = MODEL,
    bf16: float = 700.0,
    copy: float = 2.9,
    tok_s_per_gpu: int = 90_000,
    fail: tuple[str, str] | None = None,
    seal: bool = True,
    train_extra: dict | None = None,
):
    """A node's run folder (root/host/m40_v1) as the stages leave it (each stage's own file and the record it
    took from that file), sealed by the real evidence stage."""
    run_dir = root / host / "m40_v1"
    run_dir.mkdir(parents=True)
    failed_at = fail[0] if fail else None
    gpu = fake_gpu.probe_gpu(name=NAME, model=model)
    gate = {"passed": failed_at != "probe", "line": "driver 580.95.05 supports CUDA 13.0 >= 12.8"}
    gpu_doc = {"schema": 1, "source": "nvml", "driver": "580.95.05", "driver_cuda": "13.0", "gate": gate}
    gpu_doc["gpus"] = [dict(gpu, index=i) for i in range(gpus)]
    checker = checker_result(gpus, bf16, copy, failed=failed_at == "cuda_check")
    train_figures = {
        "tok_s": tok_s_per_gpu * gpus,
        "tok_s_per_gpu": tok_s_per_gpu,
        "mfu_pct": 41.5,
        "device": "cuda",
        "torch_identity": TORCH_ID,
        "steps": 30,
        "thresholds": {"checks.first_loss_tol": 0.5, "checks.final_window": 5, "checks.min_loss_drop": 2.0},
        **(train_extra or {}),
    }
    trained = {"status": "fail", "exit_code": 3} if failed_at == "train" else {"status": "pass", "exit_code": 0}
    own = {"probe": gpu_doc, "cuda_check": checker, "train": {**trained, "figures": train_figures}}
    figures = {
        "probe": {"host": host, "source": "nvml", "driver": "580.95.05", "driver_cuda": "13.0", "gpu_count": gpus},
        "install": {"channel": "cu130", "torch": "2.11.0+cu130", "torch_identity": TORCH_ID},
        "cuda_check": cuda_check.figures_from(checker),
        "train": {**train_figures, "nproc": gpus},
    }
    for name in ("probe", "install", "cuda_check", "train"):
        if failed_at and layout.STAGES.index(name) > layout.STAGES.index(failed_at):
            records.write(run_dir, StageRecord(name, StageStatus.SKIP, f"not run: {failed_at} failed"))
            continue
        status, reason = (StageStatus.FAIL, fail[1]) if name == failed_at else (StageStatus.PASS, "")
        records.write(run_dir, StageRecord(name, status, reason, duration_s=1.0, figures=figures[name]))
        for f in layout.STAGE_FILES[name]:
            (run_dir / f).write_text(f"{name} output\n")
        if name in layout.STAGE_EVIDENCE:
            (run_dir / layout.STAGE_EVIDENCE[name]).write_text(json.dumps(own[name]))
    if seal:
        with runs.locked(run_dir):
            assert stage.execute("evidence", run_dir, argparse.Namespace()).ok
    return run_dir


@pytest.fixture
def fleet_dir(tmp_path):
    """Eight nodes of one model: five healthy, one slow, one FAIL (its reason holds markdown), one
    tampered after sealing, one never sealed; and a single node of another model."""
    root = tmp_path / "results"
    for i in range(1, 6):
        make_node(root, f"node0{i}", bf16=700.0 + i, copy=2.9 + i / 100, tok_s_per_gpu=90_000 + 100 * i)
    make_node(root, "node06", bf16=520.0, tok_s_per_gpu=70_000)  # the slow one: ~26% below on bf16, ~22% on tok/s
    make_node(root, "node07", fail=("cuda_check", "gpu3 speed.copy: 0.8 TB/s | <b>27%</b> of datasheet"), copy=2.9)
    tampered = make_node(root, "node08")
    summary = json.loads((tampered / layout.SUMMARY_FILE).read_text())
    (tampered / layout.SUMMARY_FILE).write_text(json.dumps({**summary, "verdict": "PASS", "reason": ""}) + " ")
    make_node(root, "node09", seal=False)
    make_node(
        root, "odd01", gpus=1, model="A100 SXM4 80GB", bf16=300.0
    )  # one node of its model: no median, never an outlier
    return root


def report(tmp_path, *paths) -> tuple[int, dict, str, list[dict]]:
    out = tmp_path / "report"
    code = fleet.main([*map(str, paths), "--out", str(out)])
    doc = json.loads((out / "fleet.json").read_text())
    with open(out / "fleet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return code, doc, (out / "fleet.md").read_text(), rows


def row_of(doc: dict, host: str) -> dict:
    return next(r for r in doc["rows"] if r["host"] == host)


# --------------------------------------------------------------------------- the report over fixtures


def test_fleet_report_names_every_node_its_verdict_and_the_slow_one(tmp_path, fleet_dir, capsys):
    code, doc, md, csv_rows = report(tmp_path, fleet_dir)
    print(md)  # shown with -s: the report the lead pastes
    assert code == layout.EXIT_FLEET_NOT_PASS == 60
    assert doc["counts"] == {"TAMPERED": 1, "UNSEALED": 1, "FAIL": 1, "PASS": 7}
    assert [r["host"] for r in doc["rows"][:3]] == ["node08", "node09", "node07"]  # problems first

    good = row_of(doc, "node03")
    assert good["verdict"] == "PASS" and good["gpu_model"] == MODEL and good["gpu_count"] == 8
    assert good["bf16_tflops"] == 703.0 and good["copy_tbs"] == pytest.approx(2.93)  # min over GPUs, not GPU 0's
    assert good["allreduce_busbw_gbs"] == 360.0 and good["tok_s"] == 8 * 90_300 and good["mfu_pct"] == 41.5
    assert good["driver"] == "580.95.05" and good["torch"] == "2.11.0+cu130" and good["run"] == "node03/m40_v1"

    failed = row_of(doc, "node07")
    assert failed["verdict"] == "FAIL" and failed["failed_stage"] == "cuda_check"
    assert failed["reason"].startswith("gpu3 speed.copy: 0.8 TB/s") and failed["tok_s"] is None
    assert "gpu3 speed.copy: 0.8 TB/s \\| &lt;b>27%&lt;/b> of datasheet" in md  # escaped: no broken table, no HTML

    tampered, unsealed = row_of(doc, "node08"), row_of(doc, "node09")
    assert tampered["verdict"] == "TAMPERED" and "1 changed (summary.json)" in tampered["reason"]
    assert tampered["bf16_tflops"] is None and tampered["gpu_model"] is None  # never trusted
    assert unsealed["verdict"] == "UNSEALED" and "no SHA256SUMS" in unsealed["reason"]

    slow = [o for o in doc["outliers"] if o["host"] == "node06"]
    assert {o["figure"] for o in slow} == {"bf16_tflops", "tok_s_per_gpu"}
    assert {o["host"] for o in doc["outliers"]} == {"node06"}  # node07's copy is healthy; odd01 has no peers
    bf16 = next(o for o in slow if o["figure"] == "bf16_tflops")
    assert bf16["median"] == 702.5 and bf16["nodes"] == 6 and bf16["below_pct"] == 26.0
    assert "| node06 | node06/m40_v1 | H100 SXM | bf16 TFLOP/s per GPU (min) | 520.0 | 702.5 (6) | 26.0% |" in md
    assert "| TAMPERED | 1 |" in md and "| PASS | 7 |" in md

    assert [r["host"] for r in csv_rows] == [r["host"] for r in doc["rows"]]
    assert csv_rows[0]["bf16_tflops"] == "" and row_of({"rows": csv_rows}, "node06")["outliers"].startswith(
        "bf16_tflops"
    )
    assert "fleet:   FAIL        node07 (node07/m40_v1): gpu3 speed.copy" in capsys.readouterr().out


def test_a_missing_figure_is_a_dash_not_a_crash(tmp_path):
    """A node whose probe failed: sealed, FAIL, and no figure at all (not even its host)."""
    other = tmp_path / "r2" / "m40_v1"
    other.mkdir(parents=True)
    records.write(other, StageRecord("probe", StageStatus.FAIL, "no NVIDIA driver", figures={}))
    with runs.locked(other):
        stage.execute("evidence", other, argparse.Namespace())
    code, doc, md, _ = report(tmp_path, tmp_path / "r2")
    row = doc["rows"][0]
    assert code == 60 and row["verdict"] == "FAIL" and row["failed_stage"] == "probe"
    assert row["bf16_tflops"] is None and row["host"] is None
    assert "| – | m40_v1 | – | – | – | **FAIL** | probe | no NVIDIA driver | – | – | – | – | – | – | – |" in md


def test_all_pass_exits_0_and_outliers_alone_exit_61(tmp_path):
    root = tmp_path / "ok"
    for i in range(3):
        make_node(root, f"n{i}", bf16=700.0 + i)
    code, doc, md, _ = report(tmp_path, f"{root}/*/m40_v*")  # a glob, as a shell would pass it quoted
    assert code == 0 and doc["counts"] == {"PASS": 3} and doc["outliers"] == [] and "None: no node is" in md
    make_node(root, "n3", bf16=400.0)
    out = tmp_path / "second"
    assert fleet.main([str(root), "--out", str(out)]) == layout.EXIT_FLEET_OUTLIER == 61


def test_default_out_is_a_new_fleet_folder_and_nothing_is_overwritten(tmp_path, monkeypatch, capsys):
    make_node(tmp_path / "runs", "n0")
    monkeypatch.setattr(layout, "RUNS_DIR", tmp_path / "submission_runs")
    assert fleet.main([str(tmp_path / "runs")]) == 0
    assert fleet.main([str(tmp_path / "runs")]) == 0
    assert sorted(p.name for p in (tmp_path / "submission_runs").iterdir()) == ["fleet_v1", "fleet_v2"]
    capsys.readouterr()
    assert fleet.main([str(tmp_path / "runs"), "--out", str(tmp_path / "submission_runs" / "fleet_v1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleet: error: --out") and "already holds fleet.md" in err and len(err.splitlines()) == 1


def test_no_run_folder_is_a_one_line_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert fleet.main([str(tmp_path / "empty")]) == 2
    assert fleet.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fleet: error: no run folder") and err[1].startswith("fleet: error: ")
    assert "no such file or folder" in err[1]


def test_a_file_added_or_removed_after_sealing_is_tampered(tmp_path):
    run_dir = make_node(tmp_path / "a", "n0")
    (run_dir / "extra.txt").write_text("slipped in later")
    assert fleet.check_seal(run_dir) == ("TAMPERED", "SHA256SUMS does not match: 1 not in the seal (extra.txt)")
    (run_dir / "extra.txt").unlink()
    assert fleet.check_seal(run_dir) == (None, "")
    (run_dir / "training_log.txt").unlink()
    assert fleet.check_seal(run_dir)[1] == "SHA256SUMS does not match: 1 missing (training_log.txt)"
    (run_dir / layout.SUMS_FILE).write_text("not a sums file\n")
    assert fleet.check_seal(run_dir)[0] == "TAMPERED"


def test_sums_parser_undoes_sha256sums_escapes():
    digest = "a" * 64
    text = evidence.sums_line(digest, "plain.txt") + evidence.sums_line(digest, "odd\\name\nx")
    assert fleet.parse_sums(text) == {"plain.txt": digest, "odd\\name\nx": digest}


def test_multi_node_job_is_shown(tmp_path):
    job = {"rdzv_id": "job42", "nnodes": 2, "node_rank": 1, "node_rank_given": 0, "world_size": 16}
    make_node(tmp_path / "j", "n1", train_extra=job)
    code, doc, md, _ = report(tmp_path, tmp_path / "j")
    assert {k: row_of(doc, "n1")[k] for k in job} == job
    assert "| job42, node 1 (scheduler's 0) / 2, world 16 |" in md  # c10d numbered the node, not Slurm


def test_a_node_of_a_job_whose_run_never_arrived_is_a_row_and_no_pass(tmp_path):
    """The job's train records name 3 nodes; 2 runs reached the results: the report says so and is no PASS
    (the Slurm example makes fleet's exit code the job's)."""
    job = {"rdzv_id": "job7", "nnodes": 3, "world_size": 24}
    make_node(tmp_path / "j", "n1", train_extra={**job, "node_rank": 0})
    make_node(tmp_path / "j", "n2", train_extra={**job, "node_rank": 1})
    code, doc, _, _ = report(tmp_path, tmp_path / "j")
    missing = [r for r in doc["rows"] if r["run"] == "job7: 1 node(s) missing"]
    assert code == layout.EXIT_FLEET_NOT_PASS and len(missing) == 1
    assert missing[0]["verdict"] == "UNREADABLE" and missing[0]["reason"] == (
        "job job7 names 3 nodes, and 2 of them have a run here (n1, n2); copy the missing nodes' run folders in"
    )
    make_node(tmp_path / "j", "n3", train_extra={**job, "node_rank": 2})
    out = tmp_path / "all"
    assert fleet.main([str(tmp_path / "j"), "--out", str(out)]) == 0


@pytest.mark.parametrize("where", ["the run itself", "a folder inside the run"])
def test_the_report_never_goes_into_a_run_folder(tmp_path, capsys, where):
    """`--out submission_runs/m40_v1` wrote fleet.md/.json/.csv into the sealed run, which the next report
    then called TAMPERED (bench refuses the same)."""
    run_dir = make_node(tmp_path / "r", "n1")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    out = run_dir if where == "the run itself" else run_dir / "reports"
    assert fleet.main([str(run_dir), "--out", str(out)]) == layout.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("pass another folder" in err[0] or "pass a folder outside every run" in err[0]), err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert fleet.main([str(run_dir), "--out", str(tmp_path / "elsewhere")]) == 0


def test_two_jobs_under_one_rendezvous_id_are_no_pass(tmp_path):
    """Two 2-node jobs both left --rdzv-id at its default (m40) and only node 0 of each arrived: two hosts, two
    node ranks 0. Counting hosts alone saw the job whole; the ranks say it is not."""
    job = {"rdzv_id": "m40", "nnodes": 2, "world_size": 16, "node_rank": 0}
    make_node(tmp_path / "j", "a1", train_extra=job)
    make_node(tmp_path / "j", "b1", train_extra=job)
    code, doc, _, _ = report(tmp_path, tmp_path / "j")
    bad = [r for r in doc["rows"] if r["run"].startswith("m40: ")]
    assert code == layout.EXIT_FLEET_NOT_PASS and len(bad) == 1 and bad[0]["verdict"] == "UNREADABLE"
    assert bad[0]["reason"] == (
        "job m40 names 2 nodes, but its runs here are not one node each: node rank 0 on a1 and b1; "
        "give each job its own --rdzv-id, or copy in one job's runs"
    )


def test_a_job_claimed_by_more_hosts_than_nodes_or_with_two_world_sizes_is_no_pass(tmp_path):
    make_node(tmp_path / "j", "n1", train_extra={"rdzv_id": "job9", "nnodes": 2, "world_size": 16, "node_rank": 0})
    make_node(tmp_path / "j", "n2", train_extra={"rdzv_id": "job9", "nnodes": 2, "world_size": 16, "node_rank": 1})
    make_node(
        tmp_path / "j", "n3", gpus=2, train_extra={"rdzv_id": "job9", "nnodes": 2, "world_size": 4, "node_rank": 1}
    )
    code, doc, _, _ = report(tmp_path, tmp_path / "j")
    bad = next(r for r in doc["rows"] if r["run"].startswith("job9: "))
    assert code == layout.EXIT_FLEET_NOT_PASS and bad["verdict"] == "UNREADABLE"
    assert "3 hosts for 2 nodes" in bad["reason"] and "node rank 1 on n2 and n3" in bad["reason"]
    assert "world sizes 4 and 16" in bad["reason"]


def test_a_node_with_fewer_gpus_than_its_peers_is_an_outlier(tmp_path):
    """A GPU the driver never enumerated (a link down at boot, a container given 7 of 8) passes the node's own
    run, whose every check covers the GPUs it has: only its peers show one is missing."""
    for i in range(1, 5):
        make_node(tmp_path / "f", f"node0{i}")
    make_node(tmp_path / "f", "node05", gpus=7)
    code, doc, md, _ = report(tmp_path, tmp_path / "f")
    assert code == layout.EXIT_FLEET_OUTLIER
    short = [o for o in doc["outliers"] if o["figure"] == "gpu_count"]
    assert [(o["host"], o["value"], o["median"]) for o in short] == [("node05", 7, 8)]
    assert row_of(doc, "node05")["outliers"] == ["7 GPUs where its peers have 8"]
    make_node(tmp_path / "g", "solo", gpus=7)  # one node alone has no peers to fall short of
    assert fleet.main([str(tmp_path / "g"), "--out", str(tmp_path / "g-out")]) == 0
    for i in range(1, 4):  # a cloud's VM sizes: three 2-GPU nodes and one 8-GPU node of one model
        make_node(tmp_path / "v", f"small{i}", gpus=2)
    make_node(tmp_path / "v", "big", gpus=8)
    _, doc, _, _ = report(tmp_path / "v-rep", tmp_path / "v")
    assert [o for o in doc["outliers"] if o["figure"] == "gpu_count"] == []


def test_hostile_text_cannot_break_the_table_or_a_spreadsheet(tmp_path):
    make_node(tmp_path / "h", "=HYPERLINK(1)|x\n\x1b[31m", fail=("train", "@cmd <script>"))
    _, doc, md, csv_rows = report(tmp_path, tmp_path / "h")
    line = next(x for x in md.splitlines() if "HYPERLINK" in x)
    assert line.count("|") - line.count("\\|") == 16 and "\x1b" not in md and "<script>" not in md
    assert csv_rows[0]["host"].startswith("'=HYPERLINK") and csv_rows[0]["reason"] == "'@cmd <script>"


def test_bad_fleet_config_is_a_one_line_error(tmp_path, capsys):
    make_node(tmp_path / "c", "n0")
    bad = tmp_path / "fleet.yaml"
    bad.write_text("outlier_share: 2\nmin_nodes: 3\noutlier_figures: [bf16_tflops]\n")
    assert fleet.main([str(tmp_path / "c"), "--config", str(bad)]) == 2
    assert "outlier_share must be a number in (0, 0.99]" in capsys.readouterr().err


def test_fleet_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, tasks.fleet; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=layout.ROOT).returncode == 0


def test_a_long_reason_is_cut_in_the_table_and_whole_in_the_json(tmp_path):
    long = "deviation " * 60
    make_node(tmp_path / "l", "n0", fail=("train", long))
    _, doc, md, csv_rows = report(tmp_path, tmp_path / "l")
    assert doc["rows"][0]["reason"] == long.strip() and csv_rows[0]["reason"] == long.strip()
    row = next(x for x in md.splitlines() if x.startswith("| n0 |"))
    assert "deviation deviation … (whole in fleet.json) |" in row and row.count("deviation") == 200 // len("deviation ")


@pytest.mark.parametrize("argv", [[], ["--no-such-option", "x"], ["runs", "--out"]])
def test_a_bad_or_missing_option_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        fleet.main(argv)
    assert e.value.code == layout.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nox -s fleet -- error: ") and "usage:" not in err


def reseal(run_dir):
    """What anyone can do to a run: SHA256SUMS has no key, so edit a file and write the sums again."""
    from tasks import evidence

    (run_dir / layout.SUMS_FILE).unlink(missing_ok=True)
    evidence.seal(run_dir)


def test_a_summary_that_disagrees_with_the_stage_records_is_never_a_pass(tmp_path):
    """fleet judges each node from its stage records, as the evidence stage did, not from summary.json alone."""
    lied = make_node(tmp_path / "r", "liar")
    record = json.loads(layout.stage_record_path(lied, "train").read_text())
    layout.stage_record_path(lied, "train").write_text(json.dumps({**record, "status": "fail", "reason": "no"}))
    reseal(lied)
    bare = tmp_path / "r" / "bare" / "m40_v1"  # nothing but a summary that says PASS
    bare.mkdir(parents=True)
    (bare / layout.SUMMARY_FILE).write_text(json.dumps({"verdict": "PASS"}))
    reseal(bare)
    make_node(tmp_path / "r", "honest")
    code, doc, _, _ = report(tmp_path, tmp_path / "r")
    verdicts = {r["run"]: (r["verdict"], r["reason"]) for r in doc["rows"]}
    assert verdicts["honest/m40_v1"][0] == "PASS" and code != 0
    assert verdicts["liar/m40_v1"] == (
        "TAMPERED",
        "summary.json says PASS, but the stage records give FAIL at train: no",
    )
    assert verdicts["bare/m40_v1"][0] == "TAMPERED" and verdicts["bare/m40_v1"][1].startswith(
        "summary.json says PASS, but the stage records give FAIL at probe"
    )


def forge(run_dir, stage_name: str, **changes) -> None:
    """A forgery that stays within the records: stages/<stage>.json and summary.json say pass with `changes` to
    the stage's figures, and SHA256SUMS is written again; the stage's own file is left as the stage wrote it."""
    path = layout.stage_record_path(run_dir, stage_name)
    record = json.loads(path.read_text())
    record.update(status="pass", reason="", figures={**record["figures"], **changes})
    path.write_text(json.dumps(record))
    summary = json.loads((run_dir / layout.SUMMARY_FILE).read_text())
    summary.update(verdict="PASS", exit_code=0, failed_stage=None, reason="", deviations=[])
    summary["stages"][stage_name].update(status="pass", reason="", figures=record["figures"])
    (run_dir / layout.SUMMARY_FILE).write_text(json.dumps(summary))
    reseal(run_dir)


def test_a_forged_pass_over_a_training_that_failed_is_never_a_pass(tmp_path):
    """The node failed in train; its record and summary.json are edited to say PASS and the run sealed again:
    train_result.json, as train.py wrote it, still says fail."""
    forged = make_node(tmp_path / "r", "forged", fail=("train", "the loss did not fall"))
    forge(forged, "train")
    make_node(tmp_path / "r", "honest")
    code, doc, _, _ = report(tmp_path, tmp_path / "r")
    verdicts = {r["run"]: (r["verdict"], r["reason"]) for r in doc["rows"]}
    assert verdicts["honest/m40_v1"][0] == "PASS" and code == layout.EXIT_FLEET_NOT_PASS
    assert verdicts["forged/m40_v1"] == (
        "TAMPERED",
        "summary.json says PASS, but the stage records give FAIL at train: "
        "stages/train.json says pass but train_result.json says fail (exit 3)",
    )


def test_a_figure_raised_in_the_record_and_the_summary_is_tampered_and_never_in_the_median(tmp_path):
    """tok/s doubled in stages/train.json and summary.json, sealed again: train_result.json says otherwise."""
    for i in range(1, 4):
        make_node(tmp_path / "r", f"node0{i}")
    faster = make_node(tmp_path / "r", "faster")
    forge(faster, "train", tok_s=8 * 180_000, tok_s_per_gpu=180_000)
    code, doc, _, _ = report(tmp_path, tmp_path / "r")
    row = next(r for r in doc["rows"] if r["run"] == "faster/m40_v1")
    assert row["verdict"] == "TAMPERED" and row["tok_s"] is None and code == layout.EXIT_FLEET_NOT_PASS
    assert row["reason"] == (
        "summary.json says PASS, but the stage records give FAIL at train: stages/train.json says tok_s=1440000 "
        "but train_result.json says tok_s=720000 (1 more figure differs: tok_s_per_gpu)"
    )


def test_the_example_runs_in_the_docs_are_judged_as_the_readme_says(tmp_path):
    """docs/example-runs: the H200 run (this version) PASS; the H100 runs, sealed by an earlier version whose
    records lack figures today's verdict reads, PARTIAL under today's rules (so their PASS is TAMPERED); the two
    failed installs FAIL. Their own files agree with their records."""
    code, doc, _, _ = report(tmp_path, layout.ROOT / "docs" / "example-runs")
    rows = {r["run"]: r for r in doc["rows"]}
    assert code == layout.EXIT_FLEET_NOT_PASS and len(rows) == 5
    assert rows["h200"]["verdict"] == "PASS"
    for old in ("h100", "2xh100"):
        assert rows[old]["verdict"] == "TAMPERED"
        assert rows[old]["reason"].startswith("summary.json says PASS, but the stage records give PARTIAL: ")
    for failed in ("h100-fail-no-index", "h100-fail-cuda-visible-devices-empty"):
        assert (rows[failed]["verdict"], rows[failed]["failed_stage"]) == ("FAIL", "install")


@pytest.mark.parametrize(
    "summary",
    [
        '{"stages": "x", "verdict": "PASS"}',
        "[" * 100_000 + "]" * 100_000,
        '{"verdict": "PASS", "gpus": 5}',
        '{"verdict": "PASS", "stages": {"train": {"figures": {"tok_s": 1%s}}}}' % ("0" * 400),  # > any float
    ],
)
def test_a_hostile_node_is_its_own_row_never_a_crash_of_the_report(tmp_path, summary):
    node = make_node(tmp_path / "r", "odd")
    (node / layout.SUMMARY_FILE).write_text(summary)
    reseal(node)
    make_node(tmp_path / "r", "fine")
    code, doc, _, _ = report(tmp_path, tmp_path / "r")
    verdicts = {r["run"]: r["verdict"] for r in doc["rows"]}
    assert verdicts["fine/m40_v1"] == "PASS" and verdicts["odd/m40_v1"] != "PASS" and code != 0


def test_a_file_in_a_run_that_is_not_a_regular_file_is_never_read(tmp_path):
    """A FIFO would hang the hash (and /dev/zero fill the memory): named, not read."""
    node = make_node(tmp_path / "r", "fifo")
    os.mkfifo(node / "pipe")
    assert fleet.check_seal(node) == ("TAMPERED", "pipe is not a regular file: not read")


def test_a_folder_name_that_is_not_utf8_is_written_escaped_not_a_crash(tmp_path):
    """A Latin-1 node name (é as one byte) reaches the report as an escape; the report is whole."""
    make_node(tmp_path / "r" / "n\udce92", "latin")  # the folder's name holds the byte 0xe9
    make_node(tmp_path / "r", "fine")
    code, doc, md, _ = report(tmp_path, tmp_path / "r")
    assert code == 0 and len(doc["rows"]) == 2 and "n\\udce92" in md


def test_a_node_folder_that_is_a_link_is_a_row_not_silently_left_out(tmp_path):
    """fleet searches real folders only; a link in the results tree is named, so the report cannot PASS
    over a node nobody read."""
    make_node(tmp_path / "r", "real")
    make_node(tmp_path / "elsewhere", "linked")
    (tmp_path / "r" / "linked").symlink_to(tmp_path / "elsewhere" / "linked")
    code, doc, _, _ = report(tmp_path, tmp_path / "r")
    rows = {r["run"]: (r["verdict"], r["reason"]) for r in doc["rows"]}
    assert rows["real/m40_v1"][0] == "PASS" and code != 0
    assert rows["linked"] == (
        "UNREADABLE",
        f"a symbolic link (to {tmp_path / 'elsewhere' / 'linked'}): not followed; copy the run in",
    )


def test_a_node_that_ran_m40_three_times_is_one_node_in_the_median(tmp_path):
    """Three runs of the slow host must not pull the median down to themselves and hide it."""
    root = tmp_path / "r"
    make_node(root, "n1", bf16=700.0)
    make_node(root, "n2", bf16=705.0)
    for again in ("a", "b", "c"):
        make_node(root / again, "slow", bf16=500.0)
    code, doc, _, _ = report(tmp_path, root)
    flagged = {(o["run"], o["figure"]) for o in doc["outliers"]}
    assert code == layout.EXIT_FLEET_OUTLIER
    assert {run for run, figure in flagged if figure == "bf16_tflops"} == {f"{x}/slow/m40_v1" for x in "abc"}
    assert {o["nodes"] for o in doc["outliers"] if o["figure"] == "bf16_tflops"} == {3}  # hosts, not folders


def seal_with(run_dir, file: str, body: str) -> None:
    """The node's own `file` replaced by `body` (a corrupted disk, a hostile copy), then sealed by evidence."""
    (run_dir / file).write_text(body)
    with runs.locked(run_dir):
        assert stage.execute("evidence", run_dir, argparse.Namespace()).ok


@pytest.mark.parametrize("depth", [450, 900])
def test_a_node_whose_own_files_are_hostile_is_a_fail_row_not_unreadable(tmp_path, depth):
    """Files nested deep or naming a GPU index no machine has: evidence renders FAIL at the stage, and fleet
    reads the sealed run as any FAIL (it judges the records again beside the same files)."""
    deep = "[" * depth + "]" * depth
    trained = {"status": "pass", "exit_code": 0, "figures": {"thresholds": "DEEP"}}
    checker = checker_result(8, 700.0, 2.9)
    checker["checks"] += [{"name": "health", "gpu": g, "status": "SKIP", "data": {}} for g in (0, 1, 10**12)]
    gpu_doc = {"schema": 1, "source": "DEEP", "gate": {"passed": True, "line": "ok"}, "gpus": [{}] * 8}
    for host, file, doc in (
        ("train", layout.TRAIN_RESULT, trained),
        ("probe", layout.GPUS_JSON, gpu_doc),
        ("cuda_check", layout.CUDA_CHECK_JSON, checker),
    ):
        seal_with(make_node(tmp_path / "r", host, seal=False), file, json.dumps(doc).replace('"DEEP"', deep))
    make_node(tmp_path / "r", "fine")
    code, doc, _, _ = report(tmp_path, tmp_path / "r")
    rows = {r["host"]: r for r in doc["rows"]}
    assert rows["fine"]["verdict"] == "PASS" and code == layout.EXIT_FLEET_NOT_PASS
    for host in ("train", "probe", "cuda_check"):
        assert (rows[host]["verdict"], rows[host]["failed_stage"]) == ("FAIL", host), rows[host]["reason"]
        assert rows[host]["reason"].startswith(f"stages/{host}.json says pass but "), rows[host]["reason"]
