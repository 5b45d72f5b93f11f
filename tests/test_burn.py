"""The long level's GPU-side code run on the CPU (training_pt/burn.py): the burn compares every
product bit for bit and catches a flipped bit; the memory patterns read back, and catch a flipped bit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
burn = pytest.importorskip("training_pt.burn")

CPU = torch.device("cpu")


def test_a_clean_burn_compares_every_product_and_times_windows():
    a, b = burn.burn_inputs(64, seed=3)
    r = burn.burn(CPU, a, b, duration_s=0.3, window_s=0.05)
    assert r["iterations"] > 4 and r["bad_iterations"] == 0 and r["bad_elements"] == 0 and r["nonfinite"] == 0
    assert r["tflops"] > 0 and len(r["windows"]) >= 2 and r["elements"] == 64 * 64


def test_a_flipped_bit_in_one_burn_product_is_caught():
    a, b = burn.burn_inputs(64, seed=3)
    calls = {"n": 0}

    def faulty(x, y, out=None):
        result = torch.matmul(x, y, out=out)
        calls["n"] += 1
        if calls["n"] == 3:  # the second product after the reference
            result.view(torch.int16)[5, 7] ^= 1
        return result

    r = burn.burn(CPU, a, b, duration_s=0.2, window_s=0.05, matmul=faulty)
    assert r["bad_iterations"] == 1 and r["bad_elements"] == 1


def test_inputs_and_checksum_are_the_same_bits_for_the_same_seed():
    a1, b1 = burn.burn_inputs(32, 9)
    a2, b2 = burn.burn_inputs(32, 9)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert burn.checksum(a1 @ b1) == burn.checksum(a2 @ b2)
    c = (a1 @ b1).clone()
    c.view(torch.int16)[0, 0] ^= 1
    assert burn.checksum(c) != burn.checksum(a1 @ b1)


def test_memory_patterns_read_back_across_a_ragged_last_chunk():
    out = burn.memory_patterns(CPU, words=1000, seed=5, chunk=256)
    assert out == {"walking_ones": 0, "random": 0, "address": 0}
    walking = burn.expected("walking_ones", 60, 68, CPU, 0, 0).tolist()
    assert walking[3] == -(1 << 63) and walking[4] == 1 and walking[5] == 2
    assert burn.expected("address", 2, 4, CPU, 0, 4096).tolist() == [4096 + 16, 4096 + 24]
    rand = burn.expected("random", 0, 1000, CPU, 5, 0)
    assert len(set(rand.tolist())) == 1000 and torch.equal(rand, burn.expected("random", 0, 1000, CPU, 5, 0))


def test_a_flipped_bit_in_memory_is_caught_in_the_pattern_and_its_inverse():
    def flip(buf):
        buf[777] ^= 1 << 40

    out = burn.memory_patterns(CPU, words=1000, seed=5, chunk=256, patterns=("random",), after_write=flip)
    assert out == {"random": 2}  # the word reads back wrong, and so does its inverse


def test_the_checker_at_the_long_level_without_a_gpu_skips_every_long_check_by_name(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tasks import layout

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = str(layout.ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            layout.GPU_CHECKS_MODULE,
            "--out",
            str(tmp_path),
            "--seed",
            "7",
            "--level",
            "long",
            "--duration",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    result = json.loads((tmp_path / layout.CUDA_CHECK_JSON).read_text())
    assert proc.returncode == 1 and result["level"] == "long" and result["duration_s"] == 1
    by_name = {c["name"]: c for c in result["checks"]}
    for name in burn.QUICK_CHECKS + burn.LONG_CHECKS:
        assert by_name[name]["status"] == "SKIP" and "CPU build" in by_name[name]["reason"], name
    assert not (tmp_path / layout.BURN_SAMPLES).exists()  # nothing burned, nothing claimed


class FakeChecker:
    """The parts of training_pt/gpu_checks.Checker the long level uses, without a GPU or NVML."""

    def __init__(self, out_dir, gpus: int) -> None:
        from tasks import config

        self.burnin, self.out_dir, self.checks, self.lines = config.load_burnin(), out_dir, [], []
        self.gpus = [{"index": i, "name": "NVIDIA H200", "nvml": None} for i in range(gpus)]
        self.long_samples: list[dict] = []

    def emit(self, line: str = "") -> None:
        self.lines.append(line)

    def add(self, name, gpu, verdict, seconds: float = 0.0):
        from tasks.cuda_rules import Check

        self.checks.append(Check.of(name, gpu, verdict, seconds))

    def run(self, name, gpu, fn, *args):
        from tasks.cuda_rules import FAIL, Verdict

        try:
            verdict = fn(*args)
        except Exception as e:
            verdict = Verdict(FAIL, "", str(e))
        self.add(name, gpu, verdict)

    def by_name(self) -> dict:
        return {(c.name, c.gpu): c for c in self.checks}


def burn_result(checksum="aa", tflops=700.0, bad=0, memory_bad=0):
    return {
        "burn_error": "",
        "memory_error": "",
        "free_gib": 130.0,
        "words": 1 << 30,
        "memory_s": 4.0,
        "memory": {"walking_ones": 0, "random": memory_bad, "address": 0},
        "burn": {
            "iterations": 900,
            "bad_iterations": bad,
            "bad_elements": bad,
            "elements": 8192 * 8192,
            "nonfinite": 0,
            "checksum": checksum,
            "windows": [(1.0, tflops)],
            "tflops": tflops,
        },
    }


def test_the_long_levels_report_names_a_throttle_a_flipped_bit_and_a_slow_gpu_among_peers(tmp_path):
    checker = FakeChecker(tmp_path, gpus=3)
    throttled = {"sm_mhz": 1100, "sm_max_mhz": 1980, "power_w": 700.0, "temp_c": 90.0, "reasons": 0x40}
    checker.long_samples = [
        {
            "t_s": t,
            "gpu": g,
            "phase": "burn",
            "tflops": 700.0,
            "sm_mhz": 1980,
            "sm_max_mhz": 1980,
            "power_w": 690.0,
            "temp_c": 60.0,
            "reasons": 0,
        }
        | (throttled if g == 1 and t > 50 else {})
        for g in range(3)
        for t in range(60)
    ]
    results = {0: burn_result(), 1: burn_result(bad=1), 2: burn_result(checksum="ab", tflops=550.0)}
    for g in checker.gpus:
        burn.per_gpu_long(checker, g, None, results[g["index"]], None, 60.0)
    burn.across_gpus(checker, results)
    c = checker.by_name()
    assert c[("burn.compare", 0)].status == "PASS" and "median 700.0 TFLOP/s" in c[("burn.compare", 0)].value
    assert c[("burn.compare", 1)].status == "FAIL" and c[("burn.clocks", 1)].status == "FAIL"
    assert "hw_thermal_slowdown in 9 of 60 samples" in c[("burn.clocks", 1)].reason
    assert c[("burn.clocks", 0)].status == "PASS" and c[("memory.patterns", 0)].status == "PASS"
    assert c[("burn.peers", None)].status == "FAIL" and c[("burn.peers", None)].data["odd"] == [2]
    assert c[("peers.burn_tflops", None)].status == "FAIL" and c[("peers.burn_tflops", None)].data["outliers"] == [2]
    assert c[("nvlink", 0)].status == "SKIP" and c[("pcie.link_burn", 0)].status == "SKIP"
    assert any(line.startswith("gpu1 burn over time:") for line in checker.lines)


def test_a_gpu_whose_thread_left_no_result_fails_both_long_checks(tmp_path):
    checker = FakeChecker(tmp_path, gpus=1)
    burn.per_gpu_long(checker, checker.gpus[0], None, {}, None, 1.0)
    c = checker.by_name()
    assert c[("burn.compare", 0)].status == "FAIL" and "no result" in c[("burn.compare", 0)].reason
    assert c[("memory.patterns", 0)].status == "FAIL" and "did not run" in c[("memory.patterns", 0)].reason
