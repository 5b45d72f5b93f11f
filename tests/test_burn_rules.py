"""The long level's verdicts (tasks/burn_rules.py) with faults injected on the CPU: a throttle under
load, one slow GPU of eight, an x8 link, a burn output that differs; and configs/burnin.yaml's loader."""

from __future__ import annotations

import pytest

from tasks import burn_rules as br
from tasks import config
from tasks.cuda_rules import FAIL, PASS, SKIP, WARN

H200 = "NVIDIA H200"
HW_SLOWDOWN, POWER_BRAKE, SW_POWER_CAP = 0x8, 0x80, 0x4


def sample(t, sm=1980, reasons=0, power=690.0, temp=60.0, tflops=700.0):
    return {
        "t_s": t,
        "sm_mhz": sm,
        "sm_max_mhz": 1980,
        "power_w": power,
        "temp_c": temp,
        "reasons": reasons,
        "tflops": tflops,
    }


# ---- the burn's outputs


def test_a_burn_whose_products_all_match_passes():
    v = br.judge_burn_compare(iterations=500, bad_iterations=0, bad_elements=0, elements=8192 * 8192)
    assert v.status == PASS and "500 products" in v.value


def test_a_single_mismatching_burn_output_fails():
    v = br.judge_burn_compare(iterations=500, bad_iterations=1, bad_elements=1, elements=8192 * 8192)
    assert v.status == FAIL and "1 of 499 products differ" in v.reason


def test_a_burn_that_compared_nothing_fails():
    assert br.judge_burn_compare(1, 0, 0, 4).status == FAIL


def test_one_gpu_of_eight_with_another_product_is_named():
    sums = {g: "abc" for g in range(8)} | {5: "abd"}
    v = br.judge_burn_peers(sums, {g: H200 for g in range(8)})
    assert v.status == FAIL and v.reason.startswith("gpu 5 computed") and v.data["odd"] == [5]


def test_two_gpus_that_disagree_are_both_named_and_other_models_are_not_compared():
    v = br.judge_burn_peers({0: "a", 1: "b", 2: "z"}, {0: H200, 1: H200, 2: "NVIDIA L4"})
    assert v.status == FAIL and v.data["odd"] == [0, 1]
    assert br.judge_burn_peers({0: "a", 1: "z"}, {0: H200, 1: "NVIDIA L4"}).status == SKIP
    assert br.judge_burn_peers({0: "a", 1: "a"}, {0: H200, 1: H200}).status == PASS


# ---- clocks under load


def test_a_hardware_slowdown_under_load_fails():
    samples = [sample(t) for t in range(60)] + [sample(60, sm=1200, reasons=HW_SLOWDOWN)]
    v = br.judge_clocks(samples, clock_share=0.7, low_clock_share=0.5)
    assert v.status == FAIL and "hw_slowdown in 1 of 61 samples" in v.reason


def test_a_power_brake_under_load_fails():
    v = br.judge_clocks([sample(t, reasons=POWER_BRAKE) for t in range(3)], 0.7, 0.5)
    assert v.status == FAIL and "hw_power_brake_slowdown in 3 of 3" in v.reason


def test_low_clocks_most_of_the_burn_without_an_event_warn():
    samples = [sample(t, sm=1000, reasons=SW_POWER_CAP) for t in range(40)] + [sample(t) for t in range(40, 60)]
    v = br.judge_clocks(samples, 0.7, 0.5)
    assert v.status == WARN and v.reason.startswith("SM clock below 70%")
    assert "40 of 60" in v.reason


def test_a_steady_burn_passes_and_no_samples_skip():
    v = br.judge_clocks([sample(t) for t in range(10)], 0.7, 0.5)
    assert v.status == PASS and not v.reason and "SM 1980-1980 MHz" in v.value
    assert br.judge_clocks([], 0.7, 0.5).status == SKIP


def test_timeline_cuts_the_burn_into_slices_with_their_events():
    samples = [sample(t, tflops=700 - t) for t in range(60)] + [sample(60, reasons=HW_SLOWDOWN)]
    rows = br.timeline(samples, slices=6)
    assert len(rows) == 6 and rows[0]["from_s"] == 0 and rows[-1]["to_s"] == 60
    assert rows[0]["tflops"] == pytest.approx(695.5) and rows[0]["events"] == "none"
    assert rows[-1]["events"] == "hw_slowdown"
    lines = br.timeline_lines(0, rows)
    assert len(lines) == 7 and "TFLOP/s" in lines[0]


# ---- one GPU among its peers


def test_one_slow_gpu_of_eight_is_flagged_in_both_metrics():
    tflops = {g: 700.0 + g for g in range(8)} | {3: 600.0}
    v = br.judge_peers("matmul", "TFLOP/s", tflops, {g: H200 for g in range(8)}, 0.10, FAIL)
    assert v.status == FAIL and v.data["outliers"] == [3] and v.reason.startswith("gpu3 600 TFLOP/s is 15% below")
    copy = {g: 4.2 for g in range(8)} | {7: 3.9}
    assert br.judge_peers("copy", "TB/s", copy, {g: H200 for g in range(8)}, 0.10, FAIL).status == PASS


def test_the_outlier_rule_says_how_far_below_the_median_only_past_the_share():
    assert br.below_median(600.0, 700.0, 0.10) == pytest.approx(1 / 7)
    assert br.below_median(640.0, 700.0, 0.10) is None  # 8.6% below: within the share
    assert br.below_median(0.0, 0.0, 0.10) is None  # no median to fall below


def test_peers_are_gpus_of_the_same_model_only():
    values = {0: 700.0, 1: 120.0}
    models = {0: H200, 1: "NVIDIA L4"}
    assert br.peer_outliers(values, models, 0.1) == []
    assert br.judge_peers("matmul", "TFLOP/s", values, models, 0.1, FAIL).status == SKIP
    assert br.peer_outliers({0: 700.0, 1: 600.0}, {0: H200, 1: H200}, 0.1) == [(1, 600.0, 700.0)]


def test_a_slow_peer_can_be_configured_to_warn():
    v = br.judge_peers("matmul", "TFLOP/s", {0: 700.0, 1: 700.0, 2: 500.0}, {0: H200, 1: H200, 2: H200}, 0.1, "WARN")
    assert v.status == WARN and v.reason.startswith("gpu2")


# ---- PCIe


def test_an_x8_link_under_load_fails():
    v = br.judge_pcie_link(
        [(5, 8), (5, 8)], max_gen=5, max_width=16, gpu_max_gen=5, link_severity=FAIL, slot_severity="WARN"
    )
    assert v.status == FAIL and "x8 instead of x16" in v.reason and v.value.startswith("Gen5 x8")


def test_a_link_downtrained_at_idle_counts_at_its_best_under_load():
    v = br.judge_pcie_link([(1, 16), (5, 16)], 5, 16, 5, FAIL, "WARN")
    assert v.status == PASS and v.value == "Gen5 x16 under load (max Gen5 x16)"


def test_a_gen4_slot_for_a_gen5_gpu_warns_and_gen3_warns_when_configured():
    slot = br.judge_pcie_link([(4, 16)], 4, 16, 5, FAIL, "WARN")
    assert slot.status == WARN and slot.reason.startswith("the GPU supports Gen5")
    v = br.judge_pcie_link([(3, 16)], 5, 16, 5, "WARN", "WARN")
    assert v.status == WARN and "Gen3 instead of Gen5" in v.reason
    assert br.judge_pcie_link([], None, None, None, FAIL, "WARN").status == SKIP


def test_pcie_bandwidth_against_the_link():
    assert br.pcie_theoretical_gbs(5, 16) == pytest.approx(63.0, abs=0.01)
    ok = br.judge_pcie_bandwidth(55.0, 55.4, 5, 16, 0.7, 0.4)  # issue 13's H200 numbers
    assert ok.status == PASS and "87% / 88% of Gen5 x16 (63.0 GB/s)" in ok.value
    half = br.judge_pcie_bandwidth(27.0, 55.0, 5, 16, 0.7, 0.4)
    assert half.status == WARN and half.reason.startswith("below 70%")
    assert br.judge_pcie_bandwidth(20.0, 55.0, 5, 16, 0.7, 0.4).status == FAIL
    assert "not judged" in br.judge_pcie_bandwidth(20.0, 55.0, None, None, 0.7, 0.4).reason


# ---- memory, NVLink, peer-to-peer


def test_memory_patterns_name_the_pattern_that_read_back_wrong():
    ok = br.judge_memory_patterns({"walking_ones": 0, "random": 0}, 1000, 100.0, 2.0, 120.0)
    assert ok.status == PASS and "500 GiB/s" in ok.value
    bad = br.judge_memory_patterns({"walking_ones": 0, "random": 3}, 1000, 100.0, 2.0, 120.0)
    assert bad.status == FAIL and bad.reason.startswith("random 3 wrong word(s)")


def test_nvlink_not_supported_skips_a_down_link_fails_and_growing_errors_warn():
    v = br.judge_nvlink([], "NVML answers Not Supported (no NVLink on this GPU)", FAIL, "WARN")
    assert v.status == SKIP and v.reason == "NVML answers Not Supported (no NVLink on this GPU)"
    assert v.data["nothing_to_judge"]  # a PCIe card: nothing to judge, the verdict stays PASS
    v = br.judge_nvlink(None, "NVML answers Unknown Error", FAIL, "WARN")  # NVML failed on a board that may have links
    assert v.status == SKIP and v.reason == "NVLink not checked: NVML answers Unknown Error"
    assert not v.data.get("nothing_to_judge")  # a check that could not judge its GPU: PARTIAL
    idle = [{"link": 0, "active": False, "active_before": False, "errors_before": {}, "errors_after": {}}]
    assert br.judge_nvlink(idle, "", FAIL, "WARN").data["nothing_to_judge"]  # no link active: a PCIe-only board
    # every link active before the checks and none after: the worst failure, not a PCIe board
    gone = [
        {"link": k, "active": False, "active_before": True, "errors_before": {}, "errors_after": {}} for k in (0, 1)
    ]
    v = br.judge_nvlink(gone, "", FAIL, "WARN")
    assert v.status == FAIL and v.reason.startswith("link(s) 0, 1 went down during the checks")
    assert not v.data.get("nothing_to_judge")
    # NVML could not read the links before the checks, and none is active after: nobody can say it was a PCIe board
    unknown = [{"link": 0, "active": False, "active_before": None, "errors_before": {}, "errors_after": {}}]
    v = br.judge_nvlink(unknown, "", FAIL, "WARN")
    assert v.status == SKIP and not v.data.get("nothing_to_judge") and "before the checks" in v.reason
    links = [
        {"link": k, "active": k != 2, "errors_before": {"replay": 0}, "errors_after": {"replay": 0}} for k in range(4)
    ]
    assert br.judge_nvlink(links, "", FAIL, "WARN").status == FAIL
    links[2]["active"] = True
    links[1]["errors_after"] = {"replay": 5}
    v = br.judge_nvlink(links, "", FAIL, "WARN")
    assert v.status == WARN and v.reason == "NVLink error counters grew during the checks: link 1 replay +5"


def test_p2p_matrix_flags_a_slow_pair():
    m = [[None, 400.0, 400.0], [400.0, None, 40.0], [400.0, 400.0, None]]
    v = br.judge_p2p(m, 0.5, "WARN")
    assert v.status == WARN and "1->2 40" in v.reason
    assert len(br.p2p_lines(m)) == 4
    assert br.judge_p2p([[None]], 0.5, "WARN").status == SKIP


# ---- collectives


def test_bus_bandwidth_follows_nccl_tests():
    assert br.bus_bandwidth("all_reduce", 8 * 10**9, 1.0, 8) == pytest.approx((8.0, 14.0))
    assert br.bus_bandwidth("all_gather", 8 * 10**9, 1.0, 8) == pytest.approx((8.0, 7.0))
    assert br.bus_bandwidth("reduce_scatter", 8 * 10**9, 2.0, 4) == pytest.approx((4.0, 3.0))


def test_sweep_sizes_run_from_8_bytes_to_1_gib():
    sizes = br.sweep_sizes(8, 1 << 30)
    assert sizes[0] == 8 and sizes[-1] == 1 << 30 and len(sizes) == 28
    assert br.elements_for("all_reduce", 8, 8) == 2
    assert br.elements_for("all_gather", 8, 8) == 8  # at least one element per rank
    assert br.elements_for("reduce_scatter", 1 << 20, 3) % 3 == 0


def test_collectives_fail_on_a_wrong_result_and_warn_below_the_interconnect():
    rows = [{"op": op, "bytes": 1 << 30, "seconds": 0.01, "wrong": 0} for op in br.COLLECTIVES]
    ok = br.judge_collectives(rows, 8, [], "nvlink", {"nvlink": 100}, "WARN")
    assert ok.status == PASS and ok.data["busbw_gbs"]["all_reduce"] == pytest.approx(187.9, abs=0.1)
    slow = br.judge_collectives(rows, 8, [], "nvlink", {"nvlink": 300}, "WARN")
    assert slow.status == WARN and slow.reason.startswith("all_reduce bus bandwidth 188 GB/s")
    rows[1]["wrong"] = 2
    assert br.judge_collectives(rows, 8, [], "nvlink", {}, "WARN").status == FAIL
    assert br.judge_collectives([], 2, ["rank 1: NCCL error"], "pcie", {}, "WARN").status == FAIL
    table = br.collective_lines(rows, 8)
    assert len(table) == 2 + 3 and "1073741824" in table[2]


# ---- DCGM

DCGM_DOC = {
    "DCGM Diagnostic": {
        "test_categories": [
            {
                "category": "Deployment",
                "tests": [
                    {
                        "name": "software",
                        "results": [{"entity_group": "GPU", "entity_id": 0, "status": "Pass"}],
                        "test_summary": {"status": "Pass"},
                    },
                    {
                        "name": "pcie",
                        "results": [
                            {"entity_group": "GPU", "entity_id": 0, "status": "Pass"},
                            {
                                "entity_group": "GPU",
                                "entity_id": 1,
                                "status": "Fail",
                                "warnings": [{"warning": "PCIe replay rate too high", "error_id": 39}],
                            },
                        ],
                    },
                ],
            }
        ]
    },
    "metadata": {"version": "4.2.3"},
}


def test_dcgm_is_summarised_per_plugin():
    tests = br.dcgm_tests(DCGM_DOC)
    assert [(t["test"], t["status"], t["gpus_failed"]) for t in tests] == [
        ("software", "Pass", []),
        ("pcie", "Fail", ["1"]),
    ]
    v = br.judge_dcgm(True, 226, DCGM_DOC, 1, FAIL)
    assert v.status == FAIL and "Deployment/pcie on GPU 1 (PCIe replay rate too high)" in v.reason


def test_dcgm_absent_is_one_skip_line():
    v = br.judge_dcgm(False, None, None, 1, FAIL)
    assert v.status == SKIP and v.reason.startswith("dcgmi is not on PATH")


# ---- settings


def test_burnin_config_loads_and_time_budget_grows_only_for_long():
    s = config.load_burnin()
    assert s["peers"]["below_median_share"] == 0.1 and s["duration_s"] == 300
    assert br.time_budget_s("quick", 120, 300, 900) == 300
    assert br.time_budget_s("long", 120, 300, 900) == 1320


def test_a_bad_burnin_config_is_one_line(tmp_path):
    text = (config.layout.BURNIN_FILE).read_text().replace("severity: FAIL", "severity: MAYBE", 1)
    bad = tmp_path / "burnin.yaml"
    bad.write_text(text)
    with pytest.raises(config.ConfigError, match=r"peers.severity: 'MAYBE' must be one of \['FAIL', 'WARN'\]"):
        config.load_burnin(bad)


def test_the_burn_plot_and_samples_file_are_written_without_matplotlib():
    import xml.etree.ElementTree as ET

    from tasks import burn_plot

    samples = [sample(t / 2) | {"gpu": g, "phase": "burn"} for g in range(2) for t in range(20)]
    samples[3]["reasons"] = HW_SLOWDOWN
    svg = burn_plot.burn_svg(samples, "burn on 2 GPUs")
    root = ET.fromstring(svg)
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 8  # 4 panels x 2 GPUs
    text = burn_plot.samples_csv(samples)
    lines = text.splitlines()
    assert lines[0].startswith("t_s,gpu,phase,tflops,sm_mhz") and len(lines) == 41
    assert ",0x8," in lines[4]


def test_the_long_levels_figures_reach_the_stage_record():
    from tasks import cuda_check

    checks = [
        {"name": "burn.compare", "gpu": 0, "status": "PASS", "data": {"tflops": 712.34}},
        {"name": "pcie.link", "gpu": 0, "status": "PASS", "data": {"gen": 5, "width": 16}},
        {"name": "pcie.bandwidth", "gpu": 0, "status": "PASS", "data": {"h2d_gbs": 55.04, "d2h_gbs": 55.51}},
        {"name": "memory.patterns", "gpu": 0, "status": "PASS", "data": {"gib": 112.0, "gibs": 2100.0}},
    ]
    fig = cuda_check.figures_from({"checks": checks, "counts": {"PASS": 3, "WARN": 1}})
    assert fig["gpu0_burn_tflops"] == 712.3 and fig["gpu0_pcie_link"] == "Gen5 x16"
    assert (fig["gpu0_h2d_gbs"], fig["gpu0_d2h_gbs"]) == (55.0, 55.5) and fig["gpu0_memtest_gibs"] == 2100.0
    assert fig["checks_warn"] == 1
