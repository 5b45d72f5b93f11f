"""The fabric code of the long level on CPUs: the collective sweep (training_pt/fabric.py) with gloo
across real processes, judged by tasks/burn_rules.py; DCGM through a fake `dcgmi` (tasks/dcgm.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tasks import burn_rules as br
from tasks.cuda_rules import PASS

fabric = pytest.importorskip("training_pt.fabric")


def test_the_collective_sweep_runs_every_op_and_size_exactly_across_gloo_processes():
    sizes = br.sweep_sizes(8, 1 << 14)
    rows, errors = fabric.run_sweep(3, "gloo", sizes, warmup=1, iters=2, timeout=240)
    assert errors == []
    assert [(r["op"], r["bytes"]) for r in rows][:3] == [("all_reduce", 8), ("all_reduce", 16), ("all_reduce", 32)]
    assert len(rows) == 3 * len(sizes)
    assert {r["op"] for r in rows} == set(br.COLLECTIVES)
    assert all(r["wrong"] == 0 and r["seconds"] > 0 for r in rows)
    gathers = [r["bytes"] for r in rows if r["op"] == "all_gather"]
    assert gathers[0] == 12 and all(b % 12 == 0 for b in gathers)  # a multiple of 3 ranks x 4 bytes
    v = br.judge_collectives(rows, 3, errors, "pcie", {"pcie": 1e-9}, "WARN")
    assert v.status == PASS and not v.reason, v
    assert len(br.collective_lines(rows, 3)) == 2 + len(rows)


def one_hangs_one_stays_silent(rank: int, world: int, tmp: str, word: str) -> None:
    """A spawned rank for run_ranks: rank 0 writes its result, rank 1 hangs, rank 2 ends without one."""
    if rank == 0:
        Path(tmp, "rank0.json").write_text(json.dumps({"rank": 0, "word": word}))
    elif rank == 1:
        time.sleep(600)


def test_run_ranks_stops_a_hung_rank_and_names_a_rank_that_wrote_no_result():
    results, hung = fabric.run_ranks(one_hangs_one_stays_silent, 3, ("hello",), timeout=30, prefix="m40-test-")
    assert hung == [1]
    assert results[0] == {"rank": 0, "word": "hello"}
    assert results[2] == {"rank": 2, "error": "process ended with code 0 and no result"}
    assert results[1]["rank"] == 1 and "no result" in results[1]["error"]


def test_a_spawned_rank_writes_its_result_whole_then_ends_as_a_rank_does(tmp_path, monkeypatch):
    """end_worker: the result first (never half a file for the parent to read), then quick_exit.end_rank (its
    wait for the peers: tests/test_quick_exit.py), stood in for here."""
    ended = []

    def end_rank(code):
        ended.append((code, json.loads((tmp_path / "rank0.json").read_text())))
        raise SystemExit(code)

    monkeypatch.setattr(fabric.quick_exit, "end_rank", end_rank)
    with pytest.raises(SystemExit):
        fabric.end_worker(str(tmp_path), 0, {"rank": 0, "rows": [1]})
    assert ended == [(0, {"rank": 0, "rows": [1]})] and not list(tmp_path.glob("*.part"))
    with pytest.raises(SystemExit):  # a failed rank: a nonzero code, so end_rank does not wait for its peers
        fabric.end_worker(str(tmp_path), 0, {"rank": 0, "error": "CUDA out of memory"})
    assert ended[1] == (1, {"rank": 0, "error": "CUDA out of memory"})


DCGM_SAMPLE = """{"DCGM Diagnostic": {"test_categories": [
  {"category": "Deployment", "tests": [
    {"name": "software", "results": [{"entity_group": "GPU", "entity_id": 0, "status": "Pass"}],
     "test_summary": {"status": "Pass"}},
    {"name": "pcie", "results": [{"entity_group": "GPU", "entity_id": 0, "status": "Fail",
      "warnings": [{"warning": "GPU 0 PCIe link width x8 below x16", "error_id": 50}]}],
     "test_summary": {"status": "Fail"}}]}]},
 "metadata": {"version": "4.2.3"}}"""


def fake_dcgmi(bin_dir, body: str):
    """An executable `dcgmi` running the sh `body` (sh builtins only: PATH holds nothing else)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "dcgmi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return bin_dir


def test_dcgmi_diag_json_is_kept_and_summarised_per_plugin(tmp_path, monkeypatch):
    from tasks import dcgm

    (tmp_path / "sample.json").write_text(DCGM_SAMPLE + "\n")
    bin_dir = fake_dcgmi(
        tmp_path / "bin",
        f'echo "$@" > {tmp_path}/argv\n'
        f'while IFS= read -r line; do echo "$line"; done < {tmp_path}/sample.json\nexit 226\n',
    )
    monkeypatch.setenv("PATH", str(bin_dir))
    found, code, doc, error = dcgm.run_diag(2, 30, tmp_path / "dcgm_diag.json")
    assert (found, code, error) == (True, 226, "")
    assert (tmp_path / "argv").read_text().split() == ["diag", "-r", "2", "--json"]
    assert (tmp_path / "dcgm_diag.json").read_text().strip() == DCGM_SAMPLE
    v = br.judge_dcgm(found, code, doc, 2, "FAIL")
    assert v.status == "FAIL" and v.value == "dcgmi diag -r 2: software Pass, pcie Fail"
    assert "Deployment/pcie on GPU 0 (GPU 0 PCIe link width x8 below x16)" in v.reason


def test_no_dcgmi_is_one_line_and_garbage_output_is_named(tmp_path, monkeypatch):
    from tasks import dcgm

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert dcgm.run_diag(1, 30, tmp_path / "x.json") == (False, None, None, "")
    monkeypatch.setenv(
        "PATH", str(fake_dcgmi(tmp_path / "bin", "echo 'Error: unable to connect to host engine'\nexit 1\n"))
    )
    found, code, doc, error = dcgm.run_diag(1, 30, tmp_path / "x.json")
    assert found and code == 1 and doc is None and "unable to connect to host engine" in error
    assert br.judge_dcgm(found, code, doc, 1, "FAIL").status == "FAIL"


@pytest.mark.parametrize(
    ("body", "why"),
    [("[" * 100_000, "nested too deep to read"), ('[{"DCGM Diagnostic": {}}]', "not a JSON object")],
    ids=["deep", "list"],
)
def test_dcgmi_output_that_is_no_json_object_this_tool_can_read_is_named(tmp_path, monkeypatch, body, why):
    """dcgmi's stdout is held to jsonfile's rule (parse: an object, nested at most MAX_DEPTH deep): an error
    naming why, never a RecursionError or an empty reason."""
    from tasks import dcgm

    (tmp_path / "out.json").write_text(body + "\n")
    bin_dir = fake_dcgmi(tmp_path / "bin", f'while IFS= read -r line; do echo "$line"; done < {tmp_path}/out.json\n')
    monkeypatch.setenv("PATH", str(bin_dir))
    found, code, doc, error = dcgm.run_diag(1, 30, tmp_path / "x.json")
    assert (found, code, doc) == (True, 0, None)
    assert error.startswith(f"its output cannot be read ({why}"), error
    assert (tmp_path / "x.json").read_text() == body + "\n"  # kept as dcgmi wrote it


def test_dcgmi_output_that_is_not_utf8_is_named_not_a_crash(tmp_path, monkeypatch):
    from tasks import dcgm

    monkeypatch.setenv("PATH", str(fake_dcgmi(tmp_path / "bin", "printf '\\377 no such GPU\\n'\nexit 1\n")))
    found, code, doc, error = dcgm.run_diag(1, 30, tmp_path / "x.json")
    assert (found, code, doc) == (True, 1, None)
    assert error.startswith("its output cannot be read (not JSON (") and error.endswith("\ufffd no such GPU"), error


def test_the_stage_passes_level_and_duration_to_the_checker_and_refuses_a_bad_duration(capsys):
    from tasks import cuda_check, stage

    parser = stage.parser_for("nox -s cuda_check --", "x")
    cuda_check.add_arguments(parser)
    args = parser.parse_args(["--level", "long", "--duration", "120", "--dcgm-level", "2"])
    cmd = [str(x) for x in cuda_check.checker_args(cuda_check.layout.ROOT, args)]
    assert cmd[cmd.index("--level") + 1] == "long" and cmd[cmd.index("--duration") + 1] == "120.0"
    assert cmd[cmd.index("--dcgm-level") + 1] == "2"
    quick = [str(x) for x in cuda_check.checker_args(cuda_check.layout.ROOT, parser.parse_args([]))]
    assert "--level" not in quick  # the quick level's command is what it was
    for bad in ("0", "-5", "soon"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--duration", bad])
        assert e.value.code == 2
    assert "is not a number of seconds from 1 to 604800 (a week); give e.g. --duration 300" in capsys.readouterr().err


@pytest.fixture
def fake_nvml(monkeypatch):
    """NVML answers as an H200 gives them (issue 13): Gen5 x16, NVLink Not Supported on one GPU."""
    import pynvml

    answers = {
        "nvmlDeviceGetCurrPcieLinkGeneration": 5,
        "nvmlDeviceGetCurrPcieLinkWidth": 16,
        "nvmlDeviceGetMaxPcieLinkGeneration": 5,
        "nvmlDeviceGetMaxPcieLinkWidth": 16,
        "nvmlDeviceGetGpuMaxPcieLinkGeneration": 5,
        "nvmlDeviceGetPowerUsage": 690500,
        "nvmlDeviceGetTemperature": 57,
        "nvmlDeviceGetCurrentClocksEventReasons": 0x4,
    }
    for name, value in answers.items():
        monkeypatch.setattr(pynvml, name, lambda *a, v=value: v)
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetClockInfo", lambda h, kind: 1980 if kind == pynvml.NVML_CLOCK_SM else 3201
    )
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMaxClockInfo", lambda h, kind: 1980)

    def not_supported(*a):
        raise pynvml.NVMLError_NotSupported()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetNvLinkState", not_supported)
    return pynvml


def test_nvml_facts_read_as_the_h200_answers(fake_nvml):
    burn = pytest.importorskip("training_pt.burn")
    assert fabric.pcie_now("h") == (5, 16)
    assert fabric.pcie_max("h") == {"max_gen": 5, "max_width": 16, "gpu_max_gen": 5}
    links, why = fabric.nvlink_links("h")
    assert links == [] and why == "NVML answers Not Supported (no NVLink on this GPU)"
    sampler = burn.Sampler({0: "h"}, 0.01)
    sampler.phase[0], sampler.live[0] = "burn", 701.5
    s = sampler.read(0, "h")
    assert (s["sm_mhz"], s["sm_max_mhz"], s["mem_mhz"], s["power_w"], s["temp_c"]) == (1980, 1980, 3201, 690.5, 57)
    assert (s["reasons"], s["pcie_gen"], s["pcie_width"], s["tflops"], s["phase"]) == (0x4, 5, 16, 701.5, "burn")
    sampler.start()
    time.sleep(0.1)
    sampler.stop.set()
    sampler.join(5)
    assert len(sampler.of(0, "burn")) >= 2


def test_nvlink_state_nvml_cannot_read_is_no_claim_that_the_gpu_has_no_nvlink(fake_nvml, monkeypatch):
    def unknown(*a):
        raise fake_nvml.NVMLError_Unknown()

    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetNvLinkState", unknown)
    links, why = fabric.nvlink_links("h")
    assert links is None and why.startswith("NVML answers ") and "no NVLink" not in why


def test_nvlink_links_and_counters_are_read_per_link(fake_nvml, monkeypatch):
    monkeypatch.setattr(fake_nvml, "NVML_NVLINK_MAX_LINKS", 4)
    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetNvLinkState", lambda h, link: 0 if link == 2 else 1)
    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetNvLinkErrorCounter", lambda h, link, counter: link * 10 + counter)
    before, _ = fabric.nvlink_links("h")
    assert [x["active"] for x in before] == [True, True, False, True]
    assert before[1]["errors"]["replay"] == 10 + fake_nvml.NVML_NVLINK_ERROR_DL_REPLAY
    v = br.judge_nvlink(fabric.nvlink_compare(before, before), "", "FAIL", "WARN")
    assert v.status == "FAIL" and "link(s) 2 inactive" in v.reason
    # the board's links gone after the checks (NVML: Not Supported, so []): down, with their earlier state
    after = fabric.nvlink_compare(before, [])
    assert [(x["link"], x["active"], x["active_before"]) for x in after] == [(k, False, k != 2) for k in range(4)]
    assert br.judge_nvlink(after, "", "FAIL", "WARN").status == "FAIL"
    unread = fabric.nvlink_compare(None, before)  # NVML could not answer before the checks
    assert [x["active_before"] for x in unread] == [None] * 4


def test_invalid_argument_means_no_such_link(fake_nvml, monkeypatch):
    def state(h, link, last=2):
        if link >= last:
            raise fake_nvml.NVMLError_InvalidArgument()
        return 1

    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetNvLinkState", state)
    links, why = fabric.nvlink_links("h")
    assert [x["link"] for x in links] == [0, 1] and why == ""  # past the GPU's last link
    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetNvLinkState", lambda h, link: state(h, link, last=0))
    links, why = fabric.nvlink_links("h")
    assert links == [] and why.endswith("(no NVLink on this GPU)")  # no link 0: no NVLink


def test_an_nvml_error_past_the_first_link_is_no_shorter_list_of_links(fake_nvml, monkeypatch):
    def state(h, link):
        if link == 2:
            raise fake_nvml.NVMLError_Unknown()
        return 1

    monkeypatch.setattr(fake_nvml, "NVML_NVLINK_MAX_LINKS", 4)
    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetNvLinkState", state)
    links, why = fabric.nvlink_links("h")
    assert links is None and why.startswith("NVML answers ") and why.endswith("at link 2")
