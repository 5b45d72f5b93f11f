"""Benchmark GPT-2 training speed on one GPU, in one process: HF's defaults vs our smoke config vs compiled.

    python -m training_pt.bench [--config configs/submission_local_gpu_gpt2.yaml] [--compile] [--steps 20]
                                  [--warmup 5] [--batch-size 32] [--compile-mode default] [--out DIR]
                                  [--set key=value ...] [--device cpu]

Rows (configs/bench.yaml says what each one is): hf-default (the baseline), smoke (the YAML as it is),
smoke-eager (when the YAML compiles), and with --compile the `compiled` row (the YAML, compiled, at a
larger batch). Every row trains the same way on the same text: forward, backward, gradient clipping,
AdamW, each step's loss read one step late (train.py's step loop, training_pt/steps.py). Warm-up steps
(torch.compile happens there) are timed apart; then at least --steps timed steps and bench.yaml's min_timed_s.
A row that fails (out of memory, a compile error) is reported in the table and the others still run.
Writes bench.json and bench.md into --out and prints the table last.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from tasks import layout
from tasks.config import ConfigError, gpu_spec_for, load_yaml
from training_pt import bench_options, fabric, gelu_mlp, quick_exit, tuned_gemm
from training_pt import data as D
from training_pt import model as M  # the model, compile and FLOPs code train.py runs
from training_pt import steps as steps_mod  # ... and its step loop
from training_pt.configurator import EXIT_INPUT, TrainError, apply_override, check_values, load_config
from training_pt.nvml_sampler import NvmlSampler, clock_cell


def load_bench_settings(path: Path) -> dict:
    """bench.yaml, checked: TrainError (one line, exit 2) naming the file and the key."""
    try:
        data = load_yaml(path, empty_ok=True)
    except ConfigError as e:
        raise TrainError(EXIT_INPUT, str(e)) from None
    for key in ("timed_steps", "warmup_steps", "compile_batch_size"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise TrainError(EXIT_INPUT, f"{path}: {key} must be a positive integer")
    if not isinstance(data.get("min_timed_s"), (int, float)) or data["min_timed_s"] < 0:
        raise TrainError(EXIT_INPUT, f"{path}: min_timed_s must be a number of seconds >= 0")
    levers, targets = data.get("levers") or {}, data.get("targets") or {}
    if not isinstance(levers, dict) or not isinstance(targets, dict):
        raise TrainError(EXIT_INPUT, f"{path}: levers and targets must be mappings (name: ...)")
    for name, lever in levers.items():
        sets = lever.get("set", []) if isinstance(lever, dict) else None
        if (
            not isinstance(lever, dict)
            or set(lever) - {"set", "sync_each_step"}
            or not isinstance(sets, list)
            or not all(isinstance(item, str) for item in sets)
        ):
            raise TrainError(
                EXIT_INPUT, f"{path}: levers.{name} takes `set: [key=value, ...]` and `sync_each_step: true`"
            )
    for model, t in targets.items():
        for key in ("smoke_tok_s", "smoke_vs_baseline", "compiled_tok_s"):
            if not isinstance(t, dict) or not isinstance(t.get(key), (int, float)):
                raise TrainError(EXIT_INPUT, f"{path}: targets.{model}.{key} must be a number")
    data["levers"], data["targets"] = levers, targets
    return data


@contextlib.contextmanager
def no_compile_caches():
    """Compile from scratch: a row that prefers another SDPA kernel differs from the others only in the
    kernel picked while tracing, which the compile caches' keys may not see."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    saved = inductor_config.fx_graph_cache, getattr(functorch_config, "enable_autograd_cache", None)
    inductor_config.fx_graph_cache = False
    if saved[1] is not None:
        functorch_config.enable_autograd_cache = False
    try:
        yield
    finally:
        inductor_config.fx_graph_cache = saved[0]
        if saved[1] is not None:
            functorch_config.enable_autograd_cache = saved[1]


def free_memory() -> None:
    gc.collect()
    torch._dynamo.reset()  # each compiled row compiles afresh, with static shapes
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_steps(
    stepper,
    lr: float,
    warmup: int,
    steps: int,
    min_s: float,
    device,
    sync_each_step: bool = False,
    nvml_s: float = 0.05,
) -> dict:
    """`warmup` steps (compiling happens there), then at least `steps` timed steps and at least `min_s` seconds
    of them, as train.py runs them: no sync between steps (unless `sync_each_step`, the old way, a lever row),
    each step's end a CUDA event; tok/s from the GPU time between the events. On a GPU, NVML is sampled every
    `nvml_s` seconds over the timed steps (the SM clock and why it is below boost: the power cap, say)."""
    sampler = NvmlSampler(device, nvml_s) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    clock, hosts = steps_mod.StepClock(device), []
    clock.mark()
    try:
        for n in range(warmup + steps * 20):  # the cap: 20 x steps timed steps, whatever min_s says
            hosts.append(steps_mod.to_host(stepper(lr)))
            clock.mark()
            if sync_each_step or n + 1 == warmup:
                clock.wait(n + 1)
            if n + 1 == warmup:
                t1 = time.perf_counter()
                if sampler:
                    sampler.start()
            if n + 1 >= warmup + steps and time.perf_counter() - t1 >= min_s:
                break
        clock.wait(len(clock.marks) - 1)
    finally:  # a row that fails (out of memory, say) leaves no sampler thread behind
        if sampler:
            sampler.stop()
    losses = [h[0].item() for h in hosts]
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite loss in the steps: {losses}")
    timed = clock.spread(warmup, len(hosts))
    return {
        "warmup_s": clock.seconds(0, warmup),
        "timed_s": timed["seconds"],
        "timed_steps": timed["steps"],
        "step_ms_median": timed["median_ms"],
        "step_ms_min": timed["min_ms"],
        "step_ms_max": timed["max_ms"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "nvml": sampler.summary() if sampler else None,
    }


def hf_default_row(cfg: dict, device: torch.device, batches, timing: dict) -> dict:
    """The baseline: GPT2Config() defaults (sizes as the YAML's), SDPA, bf16 autocast, HF's loss, torch AdamW."""
    from transformers import AutoModelForCausalLM, GPT2Config

    sizes = {
        k: cfg["model"]["config"][k]
        for k in ("n_layer", "n_head", "n_embd", "n_positions")
        if k in cfg["model"]["config"]
    }
    conf = GPT2Config(**sizes)  # everything else: HF's defaults (dropout 0.1, gelu_new, vocab 50257, use_cache)
    torch.set_float32_matmul_precision("highest")  # PyTorch's default: no TF32
    torch.manual_seed(cfg["seed"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa")
    model.train()
    t = {**cfg["train"], "grad_accum": 1, "autocast": "bfloat16", "sdpa_backend": "auto", "compile": False}

    def forward(x, y):
        return model(input_ids=x, labels=x).loss  # HF shifts the labels itself

    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"])
    stepper = steps_mod.Stepper(forward, model, opt, batches, t, device)
    fpt, _ = M.model_flops(model, "gpt2", t["block_size"])
    kernel = M.attention_kernel(device, model, t["block_size"], "auto")
    out = time_steps(stepper, t["lr"], device=device, **timing)  # the model is freed when this returns
    return {
        **out,
        "flops_per_token": fpt,
        "compile": "off",
        "attention": kernel,
        "loss": "HF's (fp32 logits)",
        "residual": "float32",
        "mlp": "plain",
        "gemm": "torch",
    }


def ours_row(cfg: dict, device: torch.device, batches, timing: dict) -> dict:
    """Our settings from the YAML, built, compiled and stepped by train.py's own code."""
    t = cfg["train"]
    torch.set_float32_matmul_precision("high" if t["tf32"] else "highest")
    torch.manual_seed(cfg["seed"])
    model, _ = M.build_model(cfg, device, print)
    net = M.NextTokenLoss(model, t["loss"] == "fused", t["loss_chunk_tokens"])
    forward, _ = M.compile_net(net, model, t)
    stepper = steps_mod.Stepper(forward, model, steps_mod.make_optimizer(model, t, device), batches, t, device)
    fpt, _ = M.model_flops(model, cfg["model"]["family"], t["block_size"])
    kernel = M.attention_kernel(device, model, t["block_size"], t["sdpa_backend"])
    with no_compile_caches() if t["compile"] and t["sdpa_backend"] != "auto" else contextlib.nullcontext():
        out = time_steps(stepper, t["lr"], device=device, **timing)
    mode = f"{t['compile_mode']}, {t['compile_scope']}" if t["compile"] else "off"
    if tuned_gemm.in_use(model) and (times := tuned_gemm.timings(model)):
        print(f"tuned GEMMs: {times}", flush=True)
    return {
        **out,
        "flops_per_token": fpt,
        "compile": mode,
        "attention": kernel,
        "loss": net.describe(),
        "residual": M.residual_dtype(cfg),
        "mlp": gelu_mlp.path(model),
        "gemm": tuned_gemm.path(model),
    }


def run_row(name: str, fn, cfg: dict, device: torch.device, tokens: torch.Tensor, timing: dict, peak) -> dict:
    """One row: `fn` builds and times it. Out of memory halves the batch until it fits, as train.py's first
    step does (HF's defaults at batch 64 need 89.5 GiB: more than an 80 GB card), and the row says so; any
    other failure (a compile error, out of memory even at batch 1) is the row's result."""
    first = cfg["train"]["batch_size"]
    while True:
        row = attempt_row(name, fn, cfg, device, tokens, timing, peak)
        batch = cfg["train"]["batch_size"]
        if not row.pop("oom", False) or batch == 1 or row.get("context_lost"):
            break
        print(f"bench: {name}: out of memory at batch {batch}; trying {batch // 2}", flush=True)
        cfg = {**cfg, "train": {**cfg["train"], "batch_size": batch // 2}}
    if cfg["train"]["batch_size"] != first:
        row["batch_halved_from"] = first
    return row


def attempt_row(name: str, fn, cfg: dict, device: torch.device, tokens: torch.Tensor, timing: dict, peak) -> dict:
    """One attempt at a row at cfg's batch; "oom": True when it ran out of memory."""
    t, row = cfg["train"], row_head(name, cfg)
    print(
        f"bench: {name}: batch {t['batch_size']} x {t['block_size']}, {timing['warmup']} warm-up + "
        f">= {timing['steps']} timed steps (>= {timing['min_s']:g} s)",
        flush=True,
    )
    batches = D.Batches(tokens, t["batch_size"], t["block_size"], cfg["seed"], device)
    try:
        out = fn(cfg, device, batches, timing)
    except torch.OutOfMemoryError:
        row.update(error=f"out of memory at batch_size={t['batch_size']}", oom=True)
    except Exception as e:
        traceback.print_exc()
        row["error"] = fabric.first_line(e)[:240]
    else:
        tok_s = t["batch_size"] * t["block_size"] * t["grad_accum"] * out["timed_steps"] / out["timed_s"]
        row.update(out, tok_s=tok_s, mfu=M.mfu(out["flops_per_token"], tok_s, peak) if peak else None)
    try:
        free_memory()
    except Exception as e:  # a sticky CUDA error (an illegal memory access): this process can run no more rows
        row["error"] = f"{row.get('error') or fabric.first_line(e)[:240]}; the CUDA context is lost"
        row["context_lost"] = True
    print(
        f"bench: {name}: " + (row.get("error") or f"{row['tok_s']:,.0f} tok/s, warm-up {row['warmup_s']:.1f} s"),
        flush=True,
    )
    return row


def row_head(name: str, cfg: dict) -> dict:
    """What a row is before it runs: its name, batch and context length."""
    t = cfg["train"]
    return {"variant": name, "batch_size": t["batch_size"], "block_size": t["block_size"], "compile": "?"}


def verdicts(rows: dict, target: dict | None) -> dict:
    """PASS/MISS per target (None: no target for this GPU, or the row did not run)."""
    if not target:
        return {}
    base, smoke = rows.get("hf-default", {}), rows.get("smoke", {})
    compiled = [r for name, r in rows.items() if name.startswith("compiled") and "tok_s" in r]
    comp = max(compiled, key=lambda r: r["tok_s"]) if compiled else {}  # the best benchmark-mode row
    out = {}
    if "tok_s" in smoke:
        out["smoke_tok_s"] = smoke["tok_s"] >= target["smoke_tok_s"]
        if "tok_s" in base:
            out["smoke_vs_baseline"] = smoke["tok_s"] / base["tok_s"] >= target["smoke_vs_baseline"]
    if "tok_s" in comp:
        out["compiled_tok_s"] = comp["tok_s"] >= target["compiled_tok_s"]
    return out


def table(rows: list[dict], base_tok_s: float | None) -> str:
    head = (
        "| variant | compile | attention | loss | residual | MLP | GEMMs | batch x T | tok/s | MFU | "
        "step ms median (min-max) | SM clock MHz median (clock events) | "
        "timed | warm-up s | peak alloc GiB | vs hf-default | loss first -> last |\n"
        "|---|---|---|---|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in rows:
        bt = f"{r['batch_size']} x {r['block_size']}"
        if r.get("batch_halved_from"):
            bt += f" (halved from {r['batch_halved_from']}: out of memory)"
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['compile']} | | | | | | {bt} | failed: {r['error']} | | | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_alloc_gib']:.1f}" if r.get("peak_alloc_gib") is not None else "n/a"
        ratio = f"{r['tok_s'] / base_tok_s:.2f}x" if base_tok_s else "n/a"
        lines.append(
            f"| {r['variant']} | {r['compile']} | {r.get('attention', '')} | {r.get('loss', '')} | "
            f"{r.get('residual', '')} | {r.get('mlp', '')} | {r.get('gemm', '')} | {bt} | "
            f"{r['tok_s']:,.0f} | {mfu} | "
            f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | "
            f"{clock_cell(r.get('nvml'))} | "
            f"{r['timed_steps']} steps, {r['timed_s']:.1f} s | {r['warmup_s']:.1f} | {peak} | {ratio} | "
            f"{r['first_loss']:.2f} -> {r['last_loss']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = bench_options.parser(__doc__.split("\n\n")[0]).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_bench_settings(args.bench_config)
        check_options(args)
        cfg, device = checked_inputs(args)
        tokens = D.tokenize(D.gpt2_tokenizer(cfg["tokenizer"]["files_dir"]), D.load_documents(cfg["data"])[0])
        total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
        plan = plan_rows(cfg, args, settings, total_gib, device)
    except TrainError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {name for name, *_ in plan}
    if unknown:
        names = ", ".join(name for name, *_ in plan)
        print(f"bench: --only names no row {', '.join(sorted(unknown))}; the rows here: {names}", file=sys.stderr)
        return 2
    out_dir = args.out or layout.RUNS_DIR / f"bench_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    context, spec = describe(args, settings, device, out_dir)
    rows: list[dict] = []
    lines: list[str] = []
    for name, fn, c, sync in plan:
        if only and name not in only:
            continue
        timing = {
            "warmup": context["warmup_steps"],
            "steps": context["timed_steps"],
            "min_s": settings["min_timed_s"],
            "sync_each_step": sync,
            "nvml_s": c["nvml"]["interval_s"],
        }
        if any(r.get("context_lost") for r in rows):
            why = "not run: an earlier row lost the CUDA context (run it alone with --only)"
            rows.append({**row_head(name, c), "error": why})
        else:
            rows.append(run_row(name, fn, c, device, tokens, timing, context["peak_bf16_tflops"]))
        lines = write_report(out_dir, rows, context, spec, args.bench_config.name)  # kept if a later row hangs
    print("\n" + "\n".join(lines), flush=True)
    return 0 if all("error" not in r for r in rows) else 1


def check_options(args) -> None:
    """Counts that must be positive (--steps, --warmup, --batch-size): TrainError (one line, exit 2) if not."""
    for name in ("steps", "warmup", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TrainError(EXIT_INPUT, f"--{name.replace('_', '-')} must be at least 1, got {value}")


def checked_inputs(args) -> tuple[dict, torch.device]:
    """The smoke config (with --set) and the device; TrainError (one line, exit 2) when either is unusable."""
    cfg = load_config(args.config, args.overrides)
    if cfg["model"]["family"] != "gpt2":
        raise TrainError(EXIT_INPUT, "the benchmark compares GPT-2 settings; --config must have model.family gpt2")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainError(EXIT_INPUT, "no CUDA device; the benchmark needs one GPU (--device cpu only tests the script)")
    if not cfg["hub"]:
        os.environ["HF_HUB_OFFLINE"] = "1"
    return cfg, torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")


def describe(args, settings: dict, device: torch.device, out_dir: Path) -> tuple[dict, object]:
    """What the report says about this run (GPU, versions, steps, targets), printed first; and the GPU's spec."""
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = gpu_spec_for(gpu) if device.type == "cuda" else None
    peak = spec.bf16_tflops if spec else None
    peak_text = f"{spec.model}, {peak:g} TFLOP/s bf16" if spec and peak else "no datasheet peak: no MFU"
    print(
        f"bench: {gpu} ({peak_text}); torch {torch.__version__}, "
        f"transformers {transformers.__version__}; out {out_dir}",
        flush=True,
    )
    context = {
        "gpu": gpu,
        "gpu_model": spec.model if spec else None,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "config": str(args.config),
        "overrides": args.overrides,
        "timed_steps": args.steps if args.steps is not None else settings["timed_steps"],
        "warmup_steps": args.warmup if args.warmup is not None else settings["warmup_steps"],
        "min_timed_s": settings["min_timed_s"],
        "targets": settings["targets"].get(spec.model) if spec else None,
    }
    return context, spec


def plan_rows(cfg: dict, args, settings: dict, total_gib: float, device: torch.device) -> list[tuple]:
    """(name, row function, config, sync each step) per row, in order: the baseline, the smoke config
    (and eager), with --compile the benchmark rows, with --levers one row per lever of bench.yaml."""
    plan = [("hf-default", hf_default_row, cfg, False), ("smoke", ours_row, cfg, False)]
    if cfg["train"]["compile"]:
        plan.append(("smoke-eager", ours_row, changed(cfg, ["train.compile=false"]), False))
    if args.compile:
        sets = ["train.compile=true", "train.compile_scope=model"]  # the most fusion
        if args.compile_mode:
            sets.append(f"train.compile_mode={args.compile_mode}")
        if args.batch_size is not None:
            sets.append(f"train.batch_size={args.batch_size}")
        elif total_gib >= 40:
            sets.append(f"train.batch_size={settings['compile_batch_size']}")
        comp = changed(cfg, sets)
        plan.append(("compiled", ours_row, comp, False))
        if comp["train"]["sdpa_backend"] != "cudnn" and device.type == "cuda":
            plan.append(("compiled-cudnn", ours_row, changed(comp, ["train.sdpa_backend=cudnn"]), False))
    if args.levers:
        for name, lever in settings["levers"].items():
            try:
                lever_cfg = changed(cfg, lever.get("set", []))
            except TrainError as e:
                raise TrainError(EXIT_INPUT, f"{args.bench_config}: levers.{name}: {e}") from None
            plan.append((f"lever {name}", ours_row, lever_cfg, lever.get("sync_each_step", False)))
    return plan


def changed(cfg: dict, overrides: list[str]) -> dict:
    """A copy of `cfg` with `key=value` overrides applied and checked as the command line's are."""
    out = copy.deepcopy(cfg)
    for item in overrides:
        apply_override(out, item)
    check_values(out)
    return out


def write_report(out_dir: Path, rows: list[dict], context: dict, spec, settings_name: str) -> list[str]:
    """bench.json and bench.md for the rows so far; returns bench.md's lines."""
    by_name = {r["variant"]: r for r in rows}
    base = by_name.get("hf-default", {}).get("tok_s")
    target = context["targets"]
    result = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **context,
        "rows": rows,
        "verdicts": verdicts(by_name, target),
    }
    peak = context["peak_bf16_tflops"]
    where = f"{spec.model}, {peak:g} TFLOP/s dense bf16" if spec and peak else "no datasheet peak"
    lines = [
        f"GPT-2 training speed on one {context['gpu']} ({where}), torch {context['torch']} "
        f"(CUDA {context['cuda']}), transformers {context['transformers']}; {context['warmup_steps']} warm-up + "
        f"{context['timed_steps']} timed steps per row, one process, one GPU.",
        "",
        table(rows, base),
        "",
    ]
    if target:
        v = result["verdicts"]

        def word(key):
            return "n/a" if key not in v else ("PASS" if v[key] else "MISS")

        lines.append(
            f"Targets ({spec.model}): smoke >= {target['smoke_tok_s']:,} tok/s: {word('smoke_tok_s')}; "
            f"smoke >= {target['smoke_vs_baseline']}x hf-default: {word('smoke_vs_baseline')}; "
            f"best compiled row >= {target['compiled_tok_s']:,} tok/s: {word('compiled_tok_s')}"
        )
    else:
        lines.append(f"No speed targets for {context['gpu']} in {settings_name}: numbers only.")
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    quick_exit.exit_quickly(main())
