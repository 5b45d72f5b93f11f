"""training_pt/train.py on the CPU (a real 2-layer GPT-2 and Gemma on the shipped corpus) and the train stage."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from tasks import layout, verdict
from tasks import train as stage
from training_pt import model
from training_pt import train as T

MODULE = ["-m", layout.TRAIN_MODULE]  # run from the repository root, as tasks/proc.py's launcher does
GEMMA_YAML = layout.CONFIGS / "submission_local_gpu_gemma2b.yaml"
# A 2-layer, 64-wide GPT-2 on 8 x 64-token batches: a few CPU seconds, and its loss falls.
TINY = [
    "model.config.n_layer=2",
    "model.config.n_head=2",
    "model.config.n_embd=64",
    "model.config.n_positions=64",
    "train.block_size=64",
    "train.batch_size=8",
    "train.steps=10",
    "train.lr=3e-3",
    "train.lr_warmup_steps=2",
    "train.timing_warmup=2",
    "train.compile=false",
    "train.autocast=none",  # float32: bf16 autocast on a CPU without bf16 instructions is ~2.5x slower per run
    "checks.min_loss_drop=0.3",
]


def train_py(out: Path, *extra: str, device: str | None = "cpu", config: Path | None = None, env=None):
    cmd = [sys.executable, *MODULE, "--out", str(out)]
    if config:
        cmd += ["--config", str(config)]
    if device:
        cmd += ["--device", device]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300, cwd=layout.ROOT, env=env)


def fail_line(proc) -> str:
    return [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.startswith("FAIL:")][-1]


def result(out: Path) -> dict:
    return json.loads((out / layout.TRAIN_RESULT).read_text())


# --------------------------------------------------------------------------- end to end on the CPU


def test_tiny_gpt2_trains_on_cpu_and_writes_every_file(tmp_path):
    out = tmp_path / "run"
    proc = train_py(out, *TINY, "train.autocast=bfloat16")  # the GPU's numerics, end to end, once
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / layout.TRAIN_LOG).read_text()
    assert log.count("| loss ") == 10 and "grad-norm" in log and "tok/s" in log
    assert "throughput:" in log and "MFU: not computed: CPU run" in log
    assert log.rstrip().splitlines()[-1].startswith("PASS: gpt2")

    metrics = [json.loads(line) for line in (out / layout.TRAIN_METRICS).read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10))
    assert set(metrics[0]) == {"step", "loss", "grad_norm", "lr", "ms", "tok_s"}
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)

    res = result(out)
    assert res["status"] == "pass" and res["exit_code"] == 0
    fig = res["figures"]
    assert abs(fig["first_loss"] - math.log(50257)) < 0.5
    assert fig["final_loss"] < fig["first_loss"] - 0.3
    assert fig["tok_s"] > 0 and fig["steps"] == 10 and fig["compile"] == "off"
    assert fig["residual"] == "bfloat16" and "residual stream bfloat16" in log  # the YAML's, built by build_model
    # the YAML asks for the fused MLP; a CPU has no cuBLASLt, so the run says so and trains the plain one
    assert fig["mlp"] == "plain" and "MLP plain, " in log
    assert "train.mlp fused: the plain MLP instead (cuBLASLt's GELU epilogue needs a CUDA GPU, not cpu)" in log
    # the timed window: steps 2..9 (8 steps), its step-time spread, and tok/s over exactly that window
    assert fig["step_ms_min"] <= fig["step_ms_median"] <= fig["step_ms_max"]
    assert sum(m["ms"] for m in metrics[2:]) / 1000 == pytest.approx(fig["timed_s"], rel=1e-3, abs=2e-3)
    assert fig["tok_s"] == pytest.approx(8 * 8 * 64 / fig["timed_s"], rel=1e-2)
    assert "step time: median" in log and "over 8 timed steps (wall clock)" in log
    # where the seconds went: every phase on one line and in the figures, in order
    phases_line = next(line for line in log.splitlines() if line.startswith("phases: "))
    for label in ("start (interpreter, imports)", "setup", "data", "model (transformers, build)", "first step"):
        assert label in phases_line
    keys = [k for k in fig if k.startswith("phase_")]
    assert keys[:4] == ["phase_start_s", "phase_setup_s", "phase_data_s", "phase_model_s"]
    assert fig["phase_timed_steps_s"] == pytest.approx(fig["timed_s"], abs=0.01)

    svg = ET.fromstring((out / layout.TRAIN_LOSS_PLOT).read_text())
    polyline = next(e for e in svg.iter() if e.tag.endswith("polyline"))
    assert len(polyline.get("points").split()) == 10


def test_tiny_gemma_config_trains_on_cpu(tmp_path):
    """The Gemma-2B YAML's code path (GemmaConfig, bf16 weights, multi-query attention) at toy size."""
    out = tmp_path / "run"
    proc = train_py(
        out,
        "model.config.vocab_size=50257",
        "model.config.pad_token_id=50303",
        "model.config.hidden_size=64",
        "model.config.intermediate_size=128",
        "model.config.num_hidden_layers=2",
        "model.config.num_attention_heads=4",
        "model.config.head_dim=16",
        "train.block_size=64",
        "train.batch_size=8",
        "train.steps=10",
        "train.lr=1e-2",
        "train.lr_warmup_steps=2",
        "train.timing_warmup=2",
        "checks.first_loss_tol=2.0",
        "checks.min_loss_drop=0.2",
        config=GEMMA_YAML,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = result(out)
    assert res["figures"]["model"] == "gemma" and res["figures"]["dtype"] == "bfloat16"
    assert "gemma random init" in (out / layout.TRAIN_LOG).read_text()


def test_no_learning_fails_with_the_step_and_values(tmp_path):
    out = tmp_path / "run"
    proc = train_py(out, *TINY, "train.steps=3", "checks.final_window=2", "checks.min_loss_drop=50")
    assert proc.returncode == T.EXIT_CHECK
    line = fail_line(proc)
    assert line.startswith("FAIL: step 2: mean loss of the last 2 steps") and "by 50.0" in line
    assert (out / layout.TRAIN_LOG).read_text().rstrip().endswith(line)
    assert result(out)["status"] == "fail" and result(out)["exit_code"] == T.EXIT_CHECK
    assert (out / layout.TRAIN_LOSS_PLOT).exists()  # the curve of the steps that ran


def test_non_finite_loss_fails_at_its_step(tmp_path):
    out = tmp_path / "run"
    proc = train_py(out, *TINY, "model.config.initializer_range=1e30")  # fp32 overflows at once
    assert proc.returncode == T.EXIT_CHECK
    line = fail_line(proc)
    assert line.startswith("FAIL: step 0: loss nan") and "is not finite" in line


def test_a_failing_compile_falls_back_to_eager_and_says_so(tmp_path):
    """A machine whose torch.compile breaks (no C compiler for Triton, say) still gets its smoke test."""
    out = tmp_path / "run"
    code = (
        "import sys, torch; from training_pt import train\n"
        "class Broken(torch.nn.Module):\n"  # torch.compile gives a module for a module, a function otherwise
        "    def forward(self, *a, **k):\n"
        "        raise RuntimeError('InductorError: no C compiler found')\n"
        "def broken(model, **kw):\n"
        "    def call(*a, **k):\n"
        "        raise RuntimeError('InductorError: no C compiler found')\n"
        "    return Broken() if isinstance(model, torch.nn.Module) else call\n"
        "torch.compile = broken\n"
        "sys.exit(train.main(sys.argv[1:]))\n"
    )
    tiny = [o for o in TINY if o != "train.compile=false"]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--device",
            "cpu",
            "--out",
            str(out),
            *tiny,
            "train.steps=4",
            "checks.final_window=2",
            "checks.min_loss_drop=0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=layout.ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / layout.TRAIN_LOG).read_text()
    assert (
        "torch.compile failed at the first step (RuntimeError: InductorError: no C compiler found); "
        "continuing without compile"
    ) in log
    assert result(out)["figures"]["compile"] == "failed (RuntimeError), ran eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_the_cpu_unless_asked(tmp_path):
    out = tmp_path / "run"
    proc = train_py(out, device=None)
    assert proc.returncode == T.EXIT_INPUT
    assert fail_line(proc) == "FAIL: no CUDA device; pass --device cpu to train on the CPU (slow)"
    assert "FAIL: no CUDA device" in (out / layout.TRAIN_LOG).read_text()


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["train.steps=ten"], "FAIL: override 'train.steps=ten': train.steps must be an integer, got 'ten'"),
        (["train.stpes=3"], "FAIL: override 'train.stpes=3': unknown key 'train.stpes'"),
        (["data.path=/nonexistent/corpus.txt"], "FAIL: data.path /nonexistent/corpus.txt does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, expect):
    out = tmp_path / "run"
    proc = train_py(out, *extra)
    assert proc.returncode == T.EXIT_INPUT, proc.stdout + proc.stderr
    assert fail_line(proc).startswith(expect)
    assert (out / layout.TRAIN_LOG).read_text().rstrip().splitlines()[-1].startswith(expect)
    assert result(out)["exit_code"] == T.EXIT_INPUT


# --------------------------------------------------------------------------- config validation


def test_shipped_configs_load():
    gpt2 = T.load_config(layout.TRAIN_CONFIG, [])
    gemma = T.load_config(GEMMA_YAML, [])
    assert gpt2["model"]["config"]["n_layer"] == 12 and gpt2["train"]["batch_size"] == 64
    assert gemma["model"]["family"] == "gemma" and gemma["model"]["config"]["num_key_value_heads"] == 1
    model.check_model_config("gpt2", gpt2["model"]["config"])
    model.check_model_config("gemma", gemma["model"]["config"])


# --------------------------------------------------------------------------- tokenizer


# --------------------------------------------------------------------------- arithmetic and pieces


def test_oom_message_names_the_batch_and_a_smaller_one():
    msg = T.oom_message("at step 3", {"batch_size": 16, "block_size": 1024}, torch.device("cpu"), False)
    assert "at step 3 with batch_size=16 x block_size=1024" in msg
    assert "try batch_size=8 or model.gradient_checkpointing=true" in msg


# TINY for 3 steps: enough to see the step after the retries; no learning is judged in 3 steps
SHORT = [*TINY, "train.steps=3", "train.timing_warmup=1", "checks.final_window=2", "checks.min_loss_drop=0"]


def test_oom_at_the_first_step_halves_the_micro_batch_and_keeps_tokens_per_step(tmp_path):
    """An 8-12 GB GPU: micro-batch 16 runs out of memory; 4 x 4 with accumulation trains the same tokens/step."""
    out = tmp_path / "run"
    env = {**os.environ, T.OOM_TEST_ENV: "4"}  # a micro-batch above 4 raises torch.cuda.OutOfMemoryError
    short = [*SHORT, "train.batch_size=16"]
    proc = train_py(out, *short, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / layout.TRAIN_LOG).read_text()
    assert "micro-batch 16 ran out of memory on the host (CPU): 2 x 8 with gradient accumulation" in log
    assert "micro-batch 8 ran out of memory on the host (CPU): 4 x 4 with gradient accumulation" in log
    assert "(1,024 tokens/step unchanged)" in log and log.count("| loss ") == 3
    res = result(out)
    fig = res["figures"]
    assert (fig["micro_batch"], fig["grad_accum"], fig["oom_retries"]) == (4, 4, 2)
    assert fig["batch_size"] == 16 and fig["tokens_per_step"] == 16 * 64 == 4 * 4 * 64
    assert res["overrides"] == short  # the retry is not an override: the verdict sees only what the user set
    assert {"micro_batch", "grad_accum", "oom_retries", "tokens_per_step", "loss_path", "mlp", "residual"} <= set(
        stage.FIGURES
    )
    assert fig["loss_path"].startswith("fused, torch kernel (the Triton loss kernel needs a CUDA GPU, not cpu)")


def test_oom_even_at_micro_batch_1_is_one_line_naming_the_memory(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, T.OOM_TEST_ENV: "0"}  # every micro-batch runs out of memory
    proc = train_py(out, *SHORT, "train.batch_size=4", env=env)
    assert proc.returncode == T.EXIT_OOM, proc.stdout + proc.stderr
    line = fail_line(proc)
    assert "even at micro-batch 1 (2 retries)" in line and "host memory" in line, line
    assert "Traceback" not in proc.stderr
    assert result(out)["figures"]["oom_retries"] == 2


# --------------------------------------------------------------------------- the stage


def stage_args(**kw):
    base = {
        "train_config": layout.TRAIN_CONFIG,
        "train_override": [],
        "nproc": None,
        "train_device": "auto",
        "train_timeout": 600.0,
    }
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def venv_python(monkeypatch):
    """The stage runs `.venv-gpu`'s python; here it is this test's interpreter (CPU torch)."""
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: Path(sys.executable))


def test_stage_runs_two_processes_under_torchrun(tmp_path, venv_python, monkeypatch):
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    standin = tmp_path / "standin"
    (standin / "torch").mkdir(parents=True)
    (standin / "torch" / "__init__.py").write_text(f"open({str(standin / 'imported')!r}, 'w').close()\n")
    monkeypatch.setenv("PYTHONPATH", str(standin))  # the ranks run isolated: never this torch
    # every rank's memory holds 4 of TINY's 8 sequences: the ranks settle on 4 before DDP (no rank retries mid-step)
    monkeypatch.setenv(T.OOM_TEST_ENV, "4")
    out = stage.run(
        run_dir,
        stage_args(nproc=2, train_device="cpu", train_override=[*TINY, "train.steps=6", "checks.min_loss_drop=0.2"]),
    )
    assert out.status == "pass", out.reason
    assert out.figures["nproc"] == 2 and out.figures["tok_s"] > 0 and out.figures["steps"] == 6
    assert out.figures["torch_identity"]["file"] == str(Path(torch.__file__).resolve())
    assert out.figures["torch_identity"]["version"] == torch.__version__ and not (standin / "imported").exists()
    assert out.figures["device"] == "cpu" and out.figures["thresholds"]["checks.min_loss_drop"] == 0.2
    assert out.figures["overrides"][-1] == "checks.min_loss_drop=0.2"
    assert out.figures["config_path"] == "configs/submission_local_gpu_gpt2.yaml"  # the verdict knows it as ours
    assert set(out.files) >= {
        layout.TRAIN_LOG,
        layout.TRAIN_METRICS,
        layout.TRAIN_LOSS_PLOT,
        layout.TRAIN_RESULT,
        layout.TRAIN_CONSOLE,
    }
    console = (run_dir / layout.TRAIN_CONSOLE).read_text()
    assert (
        console.startswith("$ NCCL_NVLS_ENABLE=0")
        and "torch.distributed.run --standalone --nproc-per-node 2" in console
    )
    assert f"PYTHONPATH={layout.ROOT} PYTHONNOUSERSITE=1 " in console and f"-m {layout.TRAIN_MODULE} " in console
    log = (run_dir / layout.TRAIN_LOG).read_text()
    assert "x 2 process(es)" in log and log.count("per GPU: ") == 1 and "PASS: gpt2" in log
    assert "the ranks agreed on the micro-batch that fits every GPU: 2 x 4 with gradient accumulation" in log
    assert (out.figures["micro_batch"], out.figures["grad_accum"], out.figures["batch_size"]) == (4, 2, 8)
    said = stage.file_says(json.loads((run_dir / layout.TRAIN_RESULT).read_text()))  # as the verdict reads it
    assert said.failure == "" and said.figures["tok_s"] == out.figures["tok_s"]
    assert verdict.differing_figures(out.figures, said.figures) == []


def test_stage_without_gpu_names_the_cpu_option(tmp_path, venv_python):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = stage.run(tmp_path, stage_args())
    assert out.status == "fail"
    assert "torch.cuda.device_count() = 0" in out.reason and "--train-device cpu" in out.reason


def test_stage_reports_the_rank_that_failed(tmp_path):
    """Rank 1 runs out of memory; torchrun then stops rank 0, whose own reason is only "interrupted"."""
    (tmp_path / layout.TRAIN_LOG).write_text(
        "step    0/30 | loss ...\n[rank 1] FAIL: CUDA out of memory at step 0 with batch_size=64 x block_size=1024 "
        "(79.0 GiB allocated, 79.1 GiB on the GPU); try batch_size=32\n"
        "FAIL: interrupted (Ctrl-C or SIGTERM) before training finished\n"
    )
    interrupted = {"reason": "interrupted (Ctrl-C or SIGTERM) before training finished"}
    reason = stage.failure_reason(tmp_path, 1, 600, interrupted)
    assert reason.startswith("[rank 1] FAIL: CUDA out of memory at step 0 with batch_size=64")
    assert stage.failure_reason(tmp_path, 3, 600, {"reason": "step 5: loss nan"}) == "step 5: loss nan"
    assert stage.failure_reason(tmp_path, 124, 600, None).startswith("training did not finish within 600 s")


def test_stage_ddp_check_failure_is_rank_0s_one_line(tmp_path, venv_python):
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    out = stage.run(
        run_dir,
        stage_args(
            nproc=2,
            train_device="cpu",
            train_override=[*TINY, "train.steps=3", "checks.final_window=2", "checks.min_loss_drop=50"],
        ),
    )
    assert out.status == "fail" and out.reason.startswith("step 2: mean loss of the last 2 steps")
    log = (run_dir / layout.TRAIN_LOG).read_text()
    assert log.count("FAIL:") == 1 and "[rank 1]" not in log


def test_stage_command_single_process_and_torchrun():
    args = stage_args(train_override=["train.steps=5"])
    single = stage.command(Path("/venv/bin/python"), 1, args, Path("/runs/m40_v1"))
    assert single == [
        "/venv/bin/python",
        "-m",
        "training_pt.train",
        "--config",
        str(layout.TRAIN_CONFIG),
        "--out",
        "/runs/m40_v1",
        "--device",
        "auto",
        "train.steps=5",
    ]
    multi = stage.command(Path("/venv/bin/python"), 8, args, Path("/runs/m40_v1"))
    assert multi[:8] == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "8",
        "-m",
        "training_pt.train",
    ]


def test_stage_gpu_count_comes_from_the_gpus_cuda_check_ran_on(tmp_path, monkeypatch):
    """Not from probe's NVML count: with MIG, NVML counts physical GPUs that torch does not see."""
    from tasks import records

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    records.write(tmp_path, records.StageRecord(stage="probe", status="pass", figures={"gpu_count": 8}))
    records.write(tmp_path, records.StageRecord(stage="cuda_check", status="pass", figures={"gpus_checked": 2}))
    assert stage.gpu_count(tmp_path, Path("/nonexistent/python")) == (2, "cuda_check")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # narrowed since: ask torch (here: no python to ask)
    assert stage.gpu_count(tmp_path, Path("/nonexistent/python"))[0] is None


def test_the_gpu_count_is_asked_of_venv_gpu_torch_isolated_not_a_torch_on_pythonpath(tmp_path, monkeypatch):
    standin = tmp_path / "standin"
    (standin / "torch").mkdir(parents=True)
    (standin / "torch" / "__init__.py").write_text(f"open({str(standin / 'imported')!r}, 'w').close()\n")
    monkeypatch.setenv("PYTHONPATH", str(standin))
    assert stage.torch_gpu_count(Path(sys.executable)) == (torch.cuda.device_count(), "torch.cuda.device_count()")
    assert not (standin / "imported").exists()


def test_stage_without_venv_says_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: tmp_path / "no-venv" / "bin" / "python")
    out = stage.run(tmp_path, stage_args())
    assert out.status == "fail" and "nox -s install" in out.reason


def test_train_py_refuses_to_write_into_a_sealed_run(tmp_path):
    sealed = tmp_path / "m40_v1"
    sealed.mkdir()
    (sealed / layout.SUMS_FILE).write_text("")
    done = subprocess.run(
        [sys.executable, *MODULE, "--out", str(sealed), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=layout.ROOT,
    )
    assert done.returncode == 2
    assert "is a sealed run folder" in done.stderr and not (sealed / layout.TRAIN_LOG).exists()


def test_a_torch_compile_that_refuses_outright_leaves_an_eager_run_that_says_so(monkeypatch):
    """torch.compile can raise when called (an unsupported Python, say), before any step: the run goes eager."""
    from tasks.config import load_yaml
    from training_pt import configurator
    from training_pt.report import Log

    def refuse(*a, **k):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    cfg = configurator.load_config(layout.TRAIN_CONFIG, TINY[:5])
    cfg["train"]["compile"] = True
    lines = []
    log = Log.__new__(Log)  # no file: the lines are kept here
    log.leader, log.rank = True, 0
    monkeypatch.setattr(Log, "__call__", lambda self, text="", **k: lines.append(text))
    run = T.Run(cfg, None, log, {"figures": {}, "losses": []}, torch.device("cpu"), 0, 0, 1)
    lm, _ = model.build_model(cfg, run.device, log)
    tokens = torch.randint(0, 50257, (4096,))
    run.batches = T.Batches(tokens, 2, cfg["train"]["block_size"], 0, run.device)
    stepper, eager = T.wrap_model(run, lm)
    assert (
        "torch.compile failed (RuntimeError: Dynamo is not supported on this Python); continuing without compile"
        in lines
    )
    assert run.figures["compile"] == "failed (RuntimeError), ran eager"
    assert stepper.forward is eager() and torch.isfinite(stepper(1e-3)).all()
    assert load_yaml(layout.TRAIN_CONFIG)["train"]["compile_scope"] == "blocks"  # the scope this guards


def test_out_of_memory_after_the_first_step_is_one_line_and_exit_4():
    """Memory that grows (or a fragmented allocator) can run out at step 3: one line naming the step, exit 4."""

    class Full:
        batches = T.Batches(torch.arange(200), 4, 8, 0, torch.device("cpu"))

        def __call__(self, lr):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = {
        "train": {"batch_size": 4, "block_size": 8, "lr": 1e-3, "min_lr": 1e-4, "lr_warmup_steps": 1, "steps": 5},
        "model": {"gradient_checkpointing": False},
    }
    run = T.Run(cfg, None, None, {"figures": {"oom_retries": 0}}, torch.device("cpu"), 0, 0, 1)
    with pytest.raises(T.TrainError) as e:
        T.later_step(run, Full(), 3)
    assert e.value.code == T.EXIT_OOM
    assert str(e.value).startswith("CUDA out of memory at step 3 with batch_size=4 x block_size=8 (host memory)")


# --------------------------------------------------------------------------- started ahead by m40


def test_a_train_started_ahead_imports_waits_then_trains_when_released(tmp_path, venv_python):
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    args = stage_args(train_device="cpu", train_override=[*TINY, "train.steps=6", "checks.min_loss_drop=0.2"])
    args.train_prestarted = stage.start_waiting(run_dir, Path(sys.executable), args)
    with pytest.raises(subprocess.TimeoutExpired):
        args.train_prestarted.wait(3)  # it waits for "go": no file written meanwhile
    assert not (run_dir / layout.TRAIN_LOG).exists() and not (run_dir / layout.TRAIN_RESULT).exists()
    out = stage.run(run_dir, args)
    assert out.status == "pass", out.reason
    assert args.train_prestarted is None  # taken by the stage
    assert out.figures["phase_ahead_s"] > 0 and out.figures["phase_wait_s"] >= 0
    before_go = sum(out.figures[f"phase_{name}_s"] for name in ("start", "ahead", "wait"))
    assert before_go >= 2.9  # released >= 3 s after it was spawned: its start-up, its imports ahead, its wait
    assert out.figures["phase_model_s"] < out.figures["phase_ahead_s"]  # transformers was imported already
    log = (run_dir / layout.TRAIN_LOG).read_text()
    assert "model code imported ahead (during cuda_check)" in log and "waiting to start (cuda_check, then" in log
    assert "PASS: gpt2" in log and (run_dir / layout.TRAIN_CONSOLE).read_text().startswith("$ NCCL_NVLS_ENABLE=0")


def test_a_train_started_ahead_and_cancelled_ends_writing_nothing(tmp_path, venv_python):
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    args = stage_args(train_device="cpu", train_override=TINY)
    early = stage.start_waiting(run_dir, Path(sys.executable), args)
    started = time.perf_counter()
    stage.cancel(early)  # mid-import: ended at once, not when its imports are done
    assert time.perf_counter() - started < 2 and early.returncode is not None
    assert sorted(p.name for p in run_dir.iterdir()) == []


def test_a_train_started_ahead_for_one_process_is_cancelled_when_the_run_needs_two(tmp_path, venv_python, monkeypatch):
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    args = stage_args(nproc=2, train_device="cpu", train_override=TINY)
    early = args.train_prestarted = stage.start_waiting(run_dir, Path(sys.executable), args)
    monkeypatch.setattr(stage, "launch", lambda *a: 3)  # the torchrun launch itself is tested above
    stage.run(run_dir, args)
    assert early.returncode is not None and not (run_dir / layout.TRAIN_LOG).exists()  # ended, not trained


def test_prestart_only_where_the_run_will_be_one_process_on_one_gpu(tmp_path, venv_python):
    from tasks import records
    from tasks.records import StageRecord, StageStatus

    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    assert stage.prestart(run_dir, stage_args()) is None  # no probe record: the GPU count is unknown
    records.write(run_dir, StageRecord("probe", StageStatus.PASS, figures={"gpu_count": 2}))
    assert stage.prestart(run_dir, stage_args()) is None
    records.write(run_dir, StageRecord("probe", StageStatus.PASS, figures={"gpu_count": 1}))
    assert stage.prestart(run_dir, stage_args(train_device="cpu")) is None
    assert stage.prestart(run_dir, stage_args(nproc=2)) is None
    early = stage.prestart(run_dir, stage_args())
    assert early is not None and early.returncode is None
    stage.cancel(early)


def test_a_failure_after_the_pass_line_was_due_leaves_a_failed_result(tmp_path, monkeypatch):
    """The last log line can still fail (a full disk, a SIGTERM): train_result.json then says fail, as the exit
    code does, never "pass" with exit code 1."""
    from training_pt.report import Log

    def trained(cfg, args, log, result):
        result["summary"] = "gpt2 trained"

    def write(self, text="", **k):
        if text.startswith("PASS:"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "train", trained)
    monkeypatch.setattr(Log, "__call__", write)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler alone
    code = T.main(["--out", str(tmp_path / "run"), "--device", "cpu"])
    saved = result(tmp_path / "run")
    assert code == T.EXIT_ERROR and saved["exit_code"] == T.EXIT_ERROR
    assert saved["status"] == "fail" and saved["reason"].startswith("unexpected OSError")


def test_pretrained_weights_record_the_first_loss_check_as_skipped_so_a_config_file_cannot_hide_it():
    """--train-config with model.pretrained turns the first-loss check off: the checks in force say so, and
    the verdict reads it as a deviation (PARTIAL), as it does the same setting given as an override."""
    from tasks import verdict
    from tasks.records import StageRecord, StageStatus
    from training_pt import configurator

    cfg = configurator.load_config(layout.TRAIN_CONFIG, ["model.pretrained=/models/gpt2"])
    used = T.checks_in_force(cfg)
    assert used["checks.first_loss_tol"] == "skipped (model.pretrained)"
    train = StageRecord("train", StageStatus.PASS, "", figures={"thresholds": used, "steps": 40})
    default_tol = configurator.load_config(layout.TRAIN_CONFIG, [])["checks"]["first_loss_tol"]
    assert verdict.training_check_deviations({"train": train}, verdict.load_rules()) == [
        f"train ran with checks.first_loss_tol=skipped (model.pretrained), not the default {default_tol} "
        "(--train-config)"
    ]
    plain = T.checks_in_force(configurator.load_config(layout.TRAIN_CONFIG, []))
    assert plain == {f"checks.{k}": v for k, v in cfg["checks"].items()}  # a random init: every check in force


def test_the_mlp_and_gemm_figures_and_log_name_a_shape_left_to_torch_mid_run(monkeypatch):
    from types import SimpleNamespace

    from training_pt import gelu_mlp, tuned_gemm

    class Lm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            mlp = SimpleNamespace(c_fc=torch.nn.Linear(2, 2), c_proj=torch.nn.Linear(2, 2), dropout=torch.nn.Identity())
            self.mlp = gelu_mlp.FusedGeluMLP(mlp)
            self.m40_tuned_gemm = set()

    lines = []
    tuned = "tuned (cuBLASLt, each shape's fastest algorithm)"
    run = SimpleNamespace(figures={"mlp": "fused (cuBLASLt GELU epilogue)", "gemm": tuned}, log=lines.append)
    monkeypatch.setattr(gelu_mlp, "LEFT_TO_TORCH", {})
    monkeypatch.setattr(tuned_gemm, "LEFT_TO_TORCH", {})
    T.note_paths(run, Lm())
    assert lines == [] and run.figures == {"mlp": "fused (cuBLASLt GELU epilogue)", "gemm": tuned}
    gelu_mlp.LEFT_TO_TORCH["32768 x 3072 x 768"] = "LtError: cublasLtMatmul returned cuBLAS status 13"
    tuned_gemm.LEFT_TO_TORCH["65536 x 768 x 50304"] = (
        "LtError: no cuBLASLt DEFAULT algorithm at 65536 x 768 x 50304 ran"
    )
    T.note_paths(run, Lm())
    want = (
        "fused (cuBLASLt GELU epilogue); torch's kernels at 32768 x 3072 x 768 "
        "(LtError: cublasLtMatmul returned cuBLAS status 13)"
    )
    left = "LtError: no cuBLASLt DEFAULT algorithm at 65536 x 768 x 50304 ran"
    want_gemm = f"{tuned}; torch's kernels at 65536 x 768 x 50304 ({left})"
    assert lines == [f"train.mlp: {want}", f"train.gemm: {want_gemm}"]
    assert run.figures == {"mlp": want, "gemm": want_gemm}
