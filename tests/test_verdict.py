"""tasks/verdict.py: PASS only for the whole claim; PARTIAL names each deviation; FAIL for a stage that did
not pass or a torch that changed between stages. A table of stage records → verdict."""

from __future__ import annotations

import argparse
import json

import pytest

from tasks import config, layout, verdict
from tasks.records import StageRecord, StageStatus

TORCH = {
    "version": "2.11.0+cu128",
    "file": "/m/.venv-gpu/lib/python3.12/site-packages/torch/__init__.py",
    "record_sha256": "a" * 64,
}
OTHER_TORCH = {**TORCH, "version": "2.5.0", "file": "/home/u/stand-in/torch/__init__.py", "record_sha256": "b" * 64}


# the checks of configs/submission_local_gpu_gpt2.yaml, as train.py records them (`thresholds`)
CHECKS = {f"checks.{k}": v for k, v in config.load_yaml(layout.TRAIN_CONFIG)["checks"].items()}


def run(probe=None, install=None, cuda_check=None, train=None, statuses=None, hosts=None):
    """Records of a healthy 8-GPU run on host nodeA, with the figures (and hosts) of each stage updated by
    the arguments."""
    figures = {
        "probe": {"source": "nvml", "gpu_count": 8, **(probe or {})},
        "install": {"torch_identity": TORCH, **(install or {})},
        "cuda_check": {"gpus_checked": 8, "overrides": [], "torch_identity": TORCH, **(cuda_check or {})},
        "train": {
            "device": "cuda",
            "nproc": 8,
            "overrides": [],
            "torch_identity": TORCH,
            "thresholds": dict(CHECKS),
            "steps": 30,
            **(train or {}),
        },
    }
    statuses = statuses or {}
    return {
        s: StageRecord(
            s,
            statuses.get(s, StageStatus.PASS),
            "" if s not in statuses else f"{s} says why",
            started="2026-12-01T00:00:00+00:00",
            figures=f,
            host=(hosts or {}).get(s, "nodeA"),
        )
        for s, f in figures.items()
    }


RULES = verdict.load_rules()


def own_files(recs: dict[str, StageRecord]) -> dict[str, str]:
    """Each stage's own file (layout.STAGE_EVIDENCE) as the stage leaves it beside its record, agreeing with it:
    probe's gate passed on its GPUs, the checker exited 0, train.py said pass with the figures the record took."""
    probe, check, train = (recs[s].figures if s in recs else {} for s in ("probe", "cuda_check", "train"))
    count = probe.get("gpu_count")
    gpus = [{"index": i} for i in range(count if isinstance(count, int) else 0)]
    return {
        layout.GPUS_JSON: json.dumps(
            {"schema": 1, "source": probe.get("source"), "gate": {"passed": True, "line": "driver ok"}, "gpus": gpus}
        ),
        layout.CUDA_CHECK_JSON: json.dumps(
            {"exit_code": 0, "gpus_checked": check.get("gpus_checked"), "torch_identity": check.get("torch_identity")}
        ),
        layout.TRAIN_RESULT: json.dumps({"status": "pass", "exit_code": 0, "figures": train}),
    }


def judged(recs: dict[str, StageRecord], files: dict[str, str | None] | None = None) -> verdict.Verdict:
    """The verdict of records beside their own files (own_files), some replaced by `files` (None: removed)."""
    own = own_files(recs) | (files or {})
    return verdict.judge(recs, RULES, {name: body for name, body in own.items() if body is not None})


TABLE = [
    # (case, records, verdict word, the stage it names, what the deviations / reason must say)
    ("healthy", run(), "PASS", None, []),
    (
        "batch size and steps inside 10-50 are harmless",
        run(train={"overrides": ["train.batch_size=8", "steps=20"]}),
        "PASS",
        None,
        [],
    ),
    ("cpu training", run(train={"device": "cpu", "nproc": 1}), "PARTIAL", None, ["train ran on cpu, not on CUDA"]),
    (
        "one process on 8 checked GPUs",
        run(train={"nproc": 1}),
        "PARTIAL",
        None,
        ["train ran 1 process(es) on 8 GPUs that cuda_check checked (--nproc 1)"],
    ),
    (
        "weakened loss check",
        run(train={"overrides": ["checks.min_loss_drop=0.3"]}),
        "PARTIAL",
        None,
        ["train ran with checks.min_loss_drop=0.3: a changed check"],
    ),
    (
        "stricter loss check is not the default either",
        run(train={"overrides": ["min_loss_drop=3.0"]}),
        "PARTIAL",
        None,
        ["train ran with min_loss_drop=3.0"],
    ),
    (
        "weakened speed share",
        run(cuda_check={"overrides": ["speed_share=0.01"]}),
        "PARTIAL",
        None,
        ["cuda_check ran with speed_share=0.01"],
    ),
    (
        "steps outside 10-50",
        run(train={"overrides": ["train.steps=3"]}),
        "PARTIAL",
        None,
        ["train ran with train.steps=3: outside the 10-50 a PASS allows"],
    ),
    (
        "GPUs hidden from torch (CUDA_VISIBLE_DEVICES=0,1 on 8)",
        run(cuda_check={"gpus_checked": 2}, train={"nproc": 2}),
        "PARTIAL",
        None,
        ["torch saw 2 of the 8 GPUs that nvml found (6 hidden from torch"],
    ),
    ("train without a device figure", run(train={"device": None}), "PARTIAL", None, ["train recorded no device"]),
    (
        "a stage without a torch identity",
        run(train={"torch_identity": None}),
        "PARTIAL",
        None,
        ["train recorded no torch identity"],
    ),
    (
        "another torch in cuda_check",
        run(cuda_check={"torch_identity": OTHER_TORCH}),
        "FAIL",
        "cuda_check",
        [
            "cuda_check ran torch 2.5.0 from /home/u/stand-in/torch/__init__.py (RECORD sha256 bbbbbbbbbbbb), "
            "but install recorded torch 2.11.0+cu128"
        ],
    ),
    (
        "same version, another wheel in train",
        run(train={"torch_identity": {**TORCH, "record_sha256": "c" * 64}}),
        "FAIL",
        "train",
        ["(RECORD sha256 cccccccccccc), but install recorded"],
    ),
    (
        "a failed stage beats every deviation",
        run(train={"device": "cpu"}, statuses={"cuda_check": StageStatus.FAIL}),
        "FAIL",
        "cuda_check",
        ["cuda_check says why"],
    ),
    ("a killed stage", run(statuses={"train": StageStatus.RUNNING}), "FAIL", "train", ["train did not finish"]),
    ("interrupted", run(statuses={"install": StageStatus.INTERRUPTED}), "INTERRUPTED", "install", []),
    ("probe without gpu_count", run(probe={"gpu_count": None}), "PARTIAL", None, ["probe recorded no gpu_count"]),
    (
        "cuda_check without gpus_checked",
        run(cuda_check={"gpus_checked": None}),
        "PARTIAL",
        None,
        ["cuda_check recorded no gpus_checked"],
    ),
    ("train without nproc", run(train={"nproc": None}), "PARTIAL", None, ["train recorded no process count"]),
    (
        "a training config file that weakens the loss check (--train-config weak.yaml)",
        run(train={"thresholds": {**CHECKS, "checks.min_loss_drop": -100}, "overrides": []}),
        "PARTIAL",
        None,
        ["train ran with checks.min_loss_drop=-100, not the default 2.0"],
    ),
    (
        "a training config file with 2 steps",
        run(train={"steps": 2}),
        "PARTIAL",
        None,
        ["train ran 2 steps: outside the 10-50 a PASS allows"],
    ),
    (
        "train without its checks in force",
        run(train={"thresholds": None}),
        "PARTIAL",
        None,
        ["the checks in force are not recorded"],
    ),
    (
        # speed_share lowered in the checkout's configs/cuda_check.yaml: the record's thresholds are the file's
        "a config file the verdict rests on edited in the checkout",
        run(cuda_check={"changed_configs": ["configs/cuda_check.yaml"]}),
        "PARTIAL",
        None,
        ["configs/cuda_check.yaml differed from this tool's git commit when the stages ran"],
    ),
    (
        "a training config of one's own (a 1-layer model on one sentence passes its checks)",
        run(train={"config_path": "/tmp/weak.yaml"}),
        "PARTIAL",
        None,
        ["train ran --train-config /tmp/weak.yaml, not a training config of this tool"],
    ),
    (
        "the Gemma config this tool ships",
        run(train={"config_path": "configs/submission_local_gpu_gemma2b.yaml"}),
        "PASS",
        None,
        [],
    ),
    (
        # a shared submission_runs/: probe, install and cuda_check on one node, train on another
        "stages of one run from two machines",
        run(hosts={"train": "nodeB"}),
        "PARTIAL",
        None,
        ["train on nodeB, but probe ran on nodeA: one run holds the stages of several hosts"],
    ),
    (
        "records from before the host field",
        run(hosts={s: "" for s in ("probe", "install", "cuda_check", "train")}),
        "PASS",
        None,
        [],
    ),
    (
        # a GPU model without datasheet figures, no NVML health counters: the checks ran but judged nothing
        "per-GPU checks cuda_check could not judge",
        run(cuda_check={"unjudged_checks": "gpu0-7 speed.copy, gpu0-7 health.ecc"}),
        "PARTIAL",
        None,
        ["cuda_check could not judge gpu0-7 speed.copy, gpu0-7 health.ecc (its reason says why)"],
    ),
]


@pytest.mark.parametrize(("case", "recs", "word", "stage", "says"), TABLE, ids=[row[0] for row in TABLE])
def test_the_verdict_of_each_kind_of_run(case, recs, word, stage, says):
    got = judged(recs)
    assert (got.word, got.stage) == (word, stage)
    text = got.reason + " | " + " | ".join(got.deviations)
    for phrase in says:
        assert phrase in text, (phrase, text)
    if word == "PASS":
        assert got.deviations == () and got.reason == ""


@pytest.mark.parametrize("stage", sorted(layout.STAGE_EVIDENCE))
def test_a_passing_stage_without_its_own_file_fails_there(stage):
    file = layout.STAGE_EVIDENCE[stage]
    got = judged(run(), {file: None})
    assert (got.word, got.stage) == ("FAIL", stage)
    assert got.reason == f"stages/{stage}.json says pass but {stage}'s file {file} is missing"


# What a stage's own file says when the stage did not pass (as probe, the checker and train.py write it).
FAILED_FILES = {
    "probe": (
        {"schema": 1, "source": "nvml", "gate": {"passed": False, "line": "need CUDA >= 12.8"}, "gpus": [{}] * 8},
        "gpus.json says its gate did not pass: need CUDA >= 12.8",
    ),
    "cuda_check": (
        {
            "exit_code": 1,
            "reason": "1 check(s) FAIL: gpu3 speed.copy: 0.8 TB/s",
            "gpus_checked": 8,
            "torch_identity": TORCH,
        },
        "cuda_check.json says exit code 1: 1 check(s) FAIL: gpu3 speed.copy: 0.8 TB/s",
    ),
    "train": (
        {"status": "fail", "exit_code": 3, "reason": "the loss did not fall", "figures": {}},
        "train_result.json says fail (exit 3): the loss did not fall",
    ),
}


@pytest.mark.parametrize("stage", sorted(layout.STAGE_EVIDENCE))
def test_a_passing_stage_whose_own_file_says_it_did_not_pass_fails_there(stage):
    """A record and summary.json edited to pass (and SHA256SUMS written again) beside the stage's own file."""
    doc, says = FAILED_FILES[stage]
    got = judged(run(), {layout.STAGE_EVIDENCE[stage]: json.dumps(doc)})
    assert (got.word, got.stage) == ("FAIL", stage)
    assert got.reason == f"stages/{stage}.json says pass but {says}"


def test_train_that_says_pass_with_a_failing_exit_code_is_no_pass():
    got = judged(run(), {layout.TRAIN_RESULT: json.dumps({"status": "pass", "exit_code": 3, "figures": {}})})
    assert (got.word, got.reason) == ("FAIL", "stages/train.json says pass but train_result.json says exit code 3")


@pytest.mark.parametrize(
    ("stage", "record", "file", "says"),
    [
        ("train", {"tok_s": 551475}, {"tok_s": 400000}, "stages/train.json says tok_s=551475 but train_result.json "),
        ("cuda_check", {}, {"gpus_checked": 4}, "stages/cuda_check.json says gpus_checked=8 but cuda_check.json says "),
        ("probe", {}, {"gpu_count": 4}, "stages/probe.json says gpu_count=8 but gpus.json says gpu_count=4"),
    ],
)
def test_a_figure_the_record_took_from_the_stages_own_file_that_differs_from_it_fails_there(stage, record, file, says):
    """The file as the stage wrote it; the record (and summary.json) with a figure changed after."""
    got = judged(run(**{stage: record}), own_files(run(**{stage: file})))
    assert (got.word, got.stage) == ("FAIL", stage)
    assert got.reason.startswith(says), got.reason


def test_every_figure_that_differs_is_counted_and_the_first_named():
    faster = {"tok_s": 900000, "tok_s_per_gpu": 112500, "mfu_pct": 80.0}
    got = judged(run(train=faster), own_files(run(train={"tok_s": 400000, "tok_s_per_gpu": 50000, "mfu_pct": 36.0})))
    assert got.reason == (
        "stages/train.json says tok_s=900000 but train_result.json says tok_s=400000 "
        "(2 more figures differ: tok_s_per_gpu, mfu_pct)"
    )


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("{not json", "stages/train.json says pass but train_result.json is not JSON ("),
        ("", "stages/train.json says pass but train_result.json is not JSON ("),
        ("[1, 2]", "stages/train.json says pass but train_result.json is not a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "stages/train.json says pass but train_result.json is nested too deep to read"),
    ],
)
def test_a_passing_stage_whose_own_file_is_not_a_json_object_fails_there(body, says):
    got = judged(run(), {layout.TRAIN_RESULT: body})
    assert (got.word, got.stage) == ("FAIL", "train") and got.reason.startswith(says), got.reason


def test_a_figure_the_record_does_not_hold_is_no_disagreement():
    """A record from an earlier version, without a figure its file holds: the figure is not recorded (PARTIAL
    names what the verdict needs), not a disagreement."""
    recs = run()
    del recs["train"].figures["device"]
    got = judged(recs, own_files(run()))  # the file says device cuda
    assert got.word == "PARTIAL" and "train recorded no device" in got.reason


def test_a_figure_that_is_not_a_number_in_both_agrees_with_itself():
    """NaN is not equal to itself in Python; a genuine run that recorded one still agrees with its file."""
    recs = run(train={"power_w_median": float("nan")})
    assert judged(recs).word == "PASS"


def test_a_stage_that_did_not_pass_is_not_held_to_its_file():
    recs = run(statuses={"train": StageStatus.FAIL})
    got = judged(recs, {layout.TRAIN_RESULT: "not json"})
    assert (got.word, got.reason) == ("FAIL", "train says why")


def test_every_stage_with_an_own_file_has_its_reading_of_it():
    assert set(verdict.FILE_READERS) == set(layout.STAGE_EVIDENCE)


def test_harmless_overrides_are_listed_not_hidden():
    got = judged(run(train={"overrides": ["train.batch_size=8", "steps=20"]}))
    assert got.harmless == ("train: train.batch_size=8", "train: steps=20")
    got = judged(run(train={"overrides": ["train.residual_dtype=float32"]}))
    assert got.word == "PASS" and got.harmless == ("train: train.residual_dtype=float32",)  # slower, same checks


def test_each_verdict_has_its_exit_code():
    assert judged(run()).exit_code == layout.EXIT_OK == 0
    assert judged(run(train={"nproc": 1})).exit_code == layout.EXIT_PARTIAL == 70
    assert judged(run(statuses={"train": StageStatus.FAIL})).exit_code == 40
    assert judged(run(statuses={"install": StageStatus.INTERRUPTED})).exit_code == 130


def test_partial_has_a_code_apart_from_every_other_documented_code():
    others = {
        layout.EXIT_OK,
        layout.EXIT_USAGE,
        layout.EXIT_LOCKED,
        layout.EXIT_INTERRUPTED,
        *layout.EXIT_STAGE.values(),
        *(v for k, v in vars(layout).items() if k.startswith("EXIT_FLEET")),
    }
    assert layout.EXIT_PARTIAL not in others | {1, 3}  # 1 and 3: nox's own failures


def test_a_malformed_rule_is_a_config_error(tmp_path):
    bad = tmp_path / "verdict.yaml"
    bad.write_text("harmless_overrides:\n  train:\n    train.steps: [10]\n")
    with pytest.raises(config.ConfigError, match="train.steps must be any or"):
        verdict.load_rules(bad)


# ------------------------------------------------------------ which stage a FAIL names (moved from test_evidence)

ALL_PASS = {s: StageStatus.PASS for s in verdict.WORK_STAGES}


def recs(**statuses):
    return {n: StageRecord(n, s, "" if s == StageStatus.PASS else f"{n} says why") for n, s in statuses.items()}


def test_verdict_pass_only_when_every_stage_passed():
    assert verdict.stage_failure(recs(**ALL_PASS)) is None


def test_verdict_names_the_first_failed_stage():
    r = recs(probe=StageStatus.PASS, install=StageStatus.FAIL, cuda_check=StageStatus.SKIP, train=StageStatus.SKIP)
    assert verdict.stage_failure(r) == ("FAIL", "install", "install says why")


def test_verdict_interrupted_names_where():
    assert verdict.stage_failure(
        recs(probe=StageStatus.PASS, install=StageStatus.PASS, cuda_check=StageStatus.INTERRUPTED)
    )[:2] == ("INTERRUPTED", "cuda_check")


def test_verdict_missing_or_skipped_stage_is_not_a_pass():
    assert verdict.stage_failure(recs(probe=StageStatus.PASS)) == (
        "FAIL",
        "install",
        "install did not run (no record in stages/)",
    )
    assert verdict.stage_failure(
        recs(probe=StageStatus.PASS, install=StageStatus.SKIP, cuda_check=StageStatus.PASS, train=StageStatus.PASS)
    )[:2] == ("FAIL", "install")
    # a real failure is named before an earlier skip
    assert (
        verdict.stage_failure(recs(probe=StageStatus.PASS, install=StageStatus.SKIP, cuda_check=StageStatus.FAIL))[1]
        == "cuda_check"
    )


def test_verdict_reads_a_running_record_as_did_not_finish():
    r = recs(probe=StageStatus.PASS, install=StageStatus.PASS, cuda_check=StageStatus.RUNNING, train=StageStatus.PASS)
    word, stage_name, reason = verdict.stage_failure(r)
    assert (word, stage_name) == ("FAIL", "cuda_check") and reason.startswith("cuda_check did not finish")


def test_a_broken_verdict_config_stops_m40_before_the_first_stage(monkeypatch, tmp_path, capsys):
    from tasks import m40

    bad = tmp_path / "verdict.yaml"
    bad.write_text("harmless_overrides: [1, 2]\n")
    monkeypatch.setattr(layout, "VERDICT_FILE", bad)
    monkeypatch.setattr(layout, "RUNS_DIR", tmp_path / "runs")
    assert m40.main([]) == layout.EXIT_USAGE
    assert "harmless_overrides must map a stage" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cuda_check_records_a_changed_setting_and_a_weaker_speed_share_is_partial():
    import argparse

    from tasks import cuda_check

    args = argparse.Namespace(check_mem_share=None, check_speed_share=0.01, check_seed=7)
    assert cuda_check.overrides(args) == ["speed_share=0.01", "seed=7"]
    got = judged(run(cuda_check={"overrides": cuda_check.overrides(args)}))
    assert got.word == "PARTIAL" and got.harmless == ("cuda_check: seed=7",)
    assert got.deviations[0].startswith("cuda_check ran with speed_share=0.01")


def test_a_cuda_check_option_given_its_default_value_is_no_override():
    from tasks import cuda_check

    share = config.load_cuda_check()["memory_share"]  # 0.5
    args = argparse.Namespace(check_mem_share=share, check_speed_share=None, check_seed=None)
    assert cuda_check.overrides(args) == []
    assert judged(run(cuda_check={"overrides": cuda_check.overrides(args)})).word == "PASS"


def test_a_train_override_equal_to_the_config_is_no_override():
    from tasks import train

    steps = f"train.steps={config.load_yaml(layout.TRAIN_CONFIG)['train']['steps']}"  # the YAML's own value
    items = ["checks.min_loss_drop=2.0", "min_loss_drop=2", steps, "steps=20", "checks.min_loss_drop=0.3"]
    assert train.changed_overrides(items, layout.TRAIN_CONFIG) == ["steps=20", "checks.min_loss_drop=0.3"]
    same = train.changed_overrides(["checks.min_loss_drop=2.0"], layout.TRAIN_CONFIG)
    assert judged(run(train={"overrides": same})).word == "PASS"


def test_the_configs_a_verdict_rests_on_exist_and_cover_the_training_configs():
    assert set(RULES.training_configs) <= set(RULES.judged_configs)
    assert layout.TRAIN_CONFIG.relative_to(layout.ROOT).as_posix() in RULES.training_configs
    for rel in RULES.judged_configs:
        assert (layout.ROOT / rel).is_file(), rel


# --------------------------------------------------------------------------- a hostile or corrupted own file


def nested(document: dict, depth: int) -> str:
    """`document` as JSON with the string "DEEP" in it replaced by lists nested `depth` deep."""
    return json.dumps(document).replace('"DEEP"', "[" * depth + "]" * depth)


# Each stage's own file as it would say pass, with a value its stage reads nested deep ("DEEP").
DEEP_FILES = {
    "probe": {"schema": 1, "source": "DEEP", "gate": {"passed": True, "line": "driver ok"}, "gpus": [{}] * 8},
    "cuda_check": {"exit_code": 0, "gpus_checked": 8, "torch_identity": "DEEP"},
    "train": {"status": "pass", "exit_code": 0, "figures": {"thresholds": "DEEP", "device": "cuda"}},
}


@pytest.mark.parametrize("depth", [450, 900, 990])
@pytest.mark.parametrize("stage", sorted(DEEP_FILES))
def test_an_own_file_nested_too_deep_is_a_fail_at_its_stage_never_a_crash(stage, depth):
    file = layout.STAGE_EVIDENCE[stage]
    got = judged(run(), {file: nested(DEEP_FILES[stage], depth)})
    assert (got.word, got.stage) == ("FAIL", stage)
    assert got.reason.startswith(f"stages/{stage}.json says pass but {file} is nested too deep to read"), got.reason
    assert "\n" not in got.reason


@pytest.mark.parametrize("error", [MemoryError, RecursionError, ZeroDivisionError])
def test_any_error_of_a_stages_reading_of_its_file_is_a_fail_there(monkeypatch, error):
    def broken(document):
        raise error("broke")

    monkeypatch.setitem(verdict.FILE_READERS, "train", broken)
    got = judged(run())
    assert (got.word, got.stage) == ("FAIL", "train")
    assert (
        got.reason
        == f"stages/train.json says pass but train_result.json is not what train writes ({error.__name__}: broke)"
    )


def test_any_error_comparing_the_file_with_the_record_is_a_fail_there(monkeypatch):
    def broken(recorded, said):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(verdict, "differing_figures", broken)
    got = judged(run())
    assert (got.word, got.stage) == ("FAIL", "probe")
    assert got.reason == (
        "stages/probe.json says pass but gpus.json cannot be compared with it "
        "(RecursionError: maximum recursion depth exceeded)"
    )


@pytest.mark.parametrize("gpu", [10**12, 128, -1, True, "3", 1.5, [0]], ids=repr)
def test_a_check_on_a_gpu_that_is_no_gpu_index_is_a_fail_naming_it(gpu):
    """A per-GPU SKIP the checker could not judge, on GPUs 0, 1 and `gpu`: a GPU index is a whole number that
    torch can hold (0-127); anything else is not what the checker writes."""
    checks = [{"name": "health", "gpu": g, "status": "SKIP", "data": {}} for g in (0, 1, gpu)]
    doc = {"exit_code": 0, "gpus_checked": 8, "torch_identity": TORCH, "checks": checks}
    got = judged(run(), {layout.CUDA_CHECK_JSON: json.dumps(doc)})
    assert (got.word, got.stage) == ("FAIL", "cuda_check")
    assert got.reason.startswith("stages/cuda_check.json says pass but cuda_check.json is not what cuda_check writes")
    assert f"check health names gpu {json.dumps(gpu)}, not a GPU index" in got.reason, got.reason
