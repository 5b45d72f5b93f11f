"""`nox -s bench` on the CPU at toy size: the rows run, the table and JSON are written; targets and ratios."""

from __future__ import annotations

import json
import sys

import pytest

from tasks import bench as bench_task
from tasks import layout
from training_pt import bench

TOY = [
    "--set",
    "model.config.n_layer=2",
    "--set",
    "model.config.n_head=2",
    "--set",
    "model.config.n_embd=64",
    "--set",
    "train.block_size=64",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.compile=false",
]


def test_bench_runs_every_row_and_writes_the_table(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    code = bench_task.main(
        ["--python", sys.executable, "--out", str(out), "--device", "cpu", "--steps", "2", "--warmup", "1", *TOY]
    )
    assert code == 0, (out / "bench_console.txt").read_text()
    data = json.loads((out / "bench.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["hf-default", "smoke"]
    base, smoke = data["rows"]
    assert base["tok_s"] > 0 and smoke["tok_s"] > 0 and base["compile"] == "off"
    assert base["flops_per_token"] > 0 and base["mfu"] is None  # no datasheet peak on a CPU
    assert data["verdicts"] == {} and data["targets"] is None
    md = (out / "bench.md").read_text()
    assert "| variant | compile | attention | loss | residual | MLP | GEMMs | batch x T | tok/s | MFU |" in md
    assert "| hf-default | off | " in md and (base["residual"], smoke["residual"]) == ("float32", "bfloat16")
    assert base["mlp"] == smoke["mlp"] == "plain"  # the smoke config asks for the fused MLP: no CUDA here
    assert base["gemm"] == smoke["gemm"] == "torch"  # ... and for tuned GEMMs
    assert "1.00x" in md and "No speed targets for cpu" in md
    assert base["nvml"] is None and "| SM clock MHz median (clock events) |" in md  # no NVML on a CPU: n/a
    console = (out / "bench_console.txt").read_text()
    assert console.rstrip().endswith("No speed targets for cpu in bench.yaml: numbers only.")


def test_bench_without_interpreter_is_a_usage_error(tmp_path, capsys):
    assert bench_task.main(["--python", str(tmp_path / "none" / "python")]) == layout.EXIT_USAGE
    assert "is missing; run `nox -s install -p CHANNEL` first" in capsys.readouterr().err


def test_bench_help_lists_every_option_and_exits_0_before_gpu_venv_exists(tmp_path, capsys):
    # issue 16.4: --help needs no .venv-gpu; bench.py's own options come from its torch-free parser
    assert bench_task.main(["--python", str(tmp_path / "none" / "python"), "--help"]) == layout.EXIT_OK
    out = capsys.readouterr()
    for option in ("--python", "--out", "--compile", "--steps", "--warmup", "--batch-size", "--only", "--set"):
        assert option in out.out
    assert out.err == ""


def test_verdicts_against_the_h100_targets():
    target = bench.load_bench_settings(layout.BENCH_FILE)["targets"]["H100 SXM"]
    rows = {"hf-default": {"tok_s": 164_000}, "smoke": {"tok_s": 330_000}, "compiled": {"tok_s": 465_000}}
    assert bench.verdicts(rows, target) == {"smoke_tok_s": True, "smoke_vs_baseline": True, "compiled_tok_s": False}
    rows["smoke"]["tok_s"] = 319_000
    assert bench.verdicts(rows, target)["smoke_tok_s"] is False
    assert bench.verdicts({"smoke": {"error": "out of memory"}}, target) == {}
    assert bench.verdicts(rows, None) == {}


def test_table_shows_failed_rows_and_ratios():
    rows = [
        {
            "variant": "hf-default",
            "compile": "off",
            "batch_size": 16,
            "block_size": 1024,
            "tok_s": 160_000.0,
            "mfu": 0.138,
            "attention": "flash_attention",
            "loss": "HF's (fp32 logits)",
            "residual": "float32",
            "mlp": "plain",
            "gemm": "torch",
            "step_ms_median": 102.4,
            "step_ms_min": 101.0,
            "step_ms_max": 110.25,
            "timed_steps": 20,
            "timed_s": 2.05,
            "warmup_s": 3.0,
            "peak_alloc_gib": 20.5,
            "first_loss": 10.99,
            "last_loss": 8.1,
            "nvml": {"samples": 40, "sm_clock_mhz": [1365, 1650, 1785], "clock_events_pct": {"sw_power_cap": 97}},
        },
        {
            "variant": "smoke",
            "compile": "off",
            "batch_size": 16,
            "block_size": 1024,
            "tok_s": 320_000.0,
            "mfu": None,
            "step_ms_median": 51.2,
            "step_ms_min": 50.0,
            "step_ms_max": 52.0,
            "timed_steps": 40,
            "timed_s": 2.05,
            "warmup_s": 1.0,
            "peak_alloc_gib": None,
            "first_loss": 10.99,
            "last_loss": 8.1,
            "nvml": {"samples": 40, "sm_clock_mhz": [1980, 1980, 1980], "clock_events_pct": {}},
        },
        {
            "variant": "compiled",
            "compile": "default",
            "batch_size": 32,
            "block_size": 1024,
            "error": "out of memory at batch_size=32",
        },
    ]
    text = bench.table(rows, 160_000.0)
    assert (
        "| hf-default | off | flash_attention | HF's (fp32 logits) | float32 | plain | torch | 16 x 1024 | 160,000 | "
        "13.8% | "
        "102.4 (101.0-110.2) | 1650 (sw_power_cap 97%) | 20 steps, 2.0 s | "
        "3.0 | 20.5 | 1.00x | "
        "10.99 -> 8.10 |"
    ) in text
    assert "| 51.2 (50.0-52.0) | 1980 | 40 steps, 2.0 s | 1.0 | n/a | 2.00x |" in text  # boost clock, no events
    unreadable = {"samples": 3, "sm_clock_mhz": [1600, 1650, 1700], "clock_events_pct": None}
    assert bench.clock_cell(unreadable) == "1650 (events n/a)"
    assert bench.clock_cell({**unreadable, "clock_events_pct": {"hw_slowdown": 0.3}}) == "1650 (hw_slowdown <1%)"
    assert bench.clock_cell(None) == "n/a"  # a CPU row
    assert "| compiled | default | | | | | | 32 x 1024 | failed: out of memory at batch_size=32 |" in text


def test_an_option_without_its_value_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench_task.main(["--python"])
    assert e.value.code == layout.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nox -s bench -- error: ") and "usage:" not in err


def test_a_bad_lever_or_missing_tokenizer_files_is_one_line_and_exit_2(tmp_path, capsys):
    settings = tmp_path / "bench.yaml"
    text = layout.BENCH_FILE.read_text().replace("train.batch_size=16]", "train.batch_sise=16]")
    settings.write_text(text)
    code = bench.main(["--device", "cpu", "--levers", "--bench-config", str(settings), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"bench: {settings}: levers.batch-16: ") and "batch_sise" in err
    code = bench.main(["--device", "cpu", "--set", f"tokenizer.files_dir={tmp_path}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "tokenizer.files_dir: cannot read" in err
    code = bench.main(["--device", "cpu", "--warmup", "0", "--out", str(tmp_path / "o")])
    assert code == 2 and capsys.readouterr().err == "bench: --warmup must be at least 1, got 0\n"
    code = bench.main(["--device", "cpu", "--only", "smoke,nosuch", *TOY, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bench: --only names no row nosuch; the rows here: hf-default, smoke")
    settings.write_text(layout.BENCH_FILE.read_text().replace("{set: [train.batch_size=16]}", "{set: null}"))
    assert bench.main(["--device", "cpu", "--bench-config", str(settings)]) == 2  # the README's exit 2, not 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bench: {settings}: levers.batch-16 takes `set: [key=value, ...]`")
    settings.write_text("")
    assert bench.main(["--device", "cpu", "--bench-config", str(settings)]) == 2
    assert capsys.readouterr().err == f"bench: {settings}: timed_steps must be a positive integer\n"


def test_an_unknown_option_is_named_before_a_missing_venv_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(SystemExit) as e:
        bench_task.main(["--compile", "--bogus"])
    assert e.value.code == layout.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "nox -s bench -- error: unrecognized arguments: --bogus; see `nox -s bench -- --help`\n"


def test_a_row_that_loses_the_cuda_context_ends_the_bench_with_the_table(tmp_path, monkeypatch):
    # Seen on the H200: max-autotune's Triton candidates for the 65536 x 50304 LM head hit an illegal memory
    # access; the error is sticky, so cleaning up after the row raised again and the bench died with no table.
    def lost(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "hf_default_row", lost)
    monkeypatch.setattr(bench, "free_memory", lost)
    out = tmp_path / "o"
    code = bench.main(["--device", "cpu", "--steps", "1", "--warmup", "1", *TOY, "--out", str(out)])
    assert code == 1
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["hf-default", "smoke"]
    assert rows[0]["error"].startswith("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert "the CUDA context is lost" in rows[0]["error"]
    assert rows[1]["error"] == "not run: an earlier row lost the CUDA context (run it alone with --only)"
    assert "| smoke | ? | | | | | | 4 x 64 | failed: not run: an earlier row lost" in (out / "bench.md").read_text()


def test_a_row_out_of_memory_halves_its_batch_until_it_fits_and_says_so(tmp_path, monkeypatch):
    # HF's defaults at batch 64 took 89.5 GiB on the H200: an 80 GB card must still get its baseline row.
    import torch

    real = bench.hf_default_row

    def fits_at_2(cfg, device, batches, timing):
        if cfg["train"]["batch_size"] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return real(cfg, device, batches, timing)

    monkeypatch.setattr(bench, "hf_default_row", fits_at_2)
    out = tmp_path / "o"
    code = bench.main(
        ["--device", "cpu", "--steps", "1", "--warmup", "1", *TOY, "--out", str(out), "--only", "hf-default"]
    )
    assert code == 0
    (row,) = json.loads((out / "bench.json").read_text())["rows"]
    assert row["batch_size"] == 2 and row["batch_halved_from"] == 4 and row["tok_s"] > 0 and "error" not in row
    assert "| hf-default | off | " in (md := (out / "bench.md").read_text())
    assert "| 2 x 64 (halved from 4: out of memory) | " in md
