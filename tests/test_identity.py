"""tasks/identity.py: which torch a stage ran, down to the wheel."""

from __future__ import annotations

from tasks import identity


def fake_site(root, version="2.11.0+cu128", record="torch/__init__.py,sha256=abc,10\n"):
    site = root / "site-packages"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("")
    info = site / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "RECORD").write_text(record)
    return site / "torch" / "__init__.py"


def test_the_identity_names_the_version_the_file_and_the_wheels_record(tmp_path):
    got = identity.of_torch(fake_site(tmp_path), "2.11.0+cu128")
    assert got["version"] == "2.11.0+cu128" and got["file"].endswith("site-packages/torch/__init__.py")
    assert len(got["record_sha256"]) == 64


def test_another_wheel_with_the_same_version_has_another_identity(tmp_path):
    a = identity.of_torch(fake_site(tmp_path / "a"), "2.11.0")
    b = identity.of_torch(fake_site(tmp_path / "b", record="torch/__init__.py,sha256=def,10\n"), "2.11.0")
    assert a["record_sha256"] != b["record_sha256"]


def test_no_record_beside_the_package_is_an_empty_hash(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    assert identity.of_torch(tmp_path / "torch" / "__init__.py", "2.5.0")["record_sha256"] == ""


def test_cuda_check_records_the_identity_of_the_torch_its_checker_imported(tmp_path):
    from tasks import cuda_check

    torch_file = fake_site(tmp_path)
    result = {"exit_code": 0, "versions": {"torch": "2.11.0+cu128", "torch_file": str(torch_file)}}
    figures = cuda_check.outcome_from(result, 0, "", 60.0, []).figures
    assert figures["torch_identity"] == identity.of_torch(torch_file, "2.11.0+cu128")
    assert "torch_identity" not in cuda_check.outcome_from({"versions": {"torch": "2.11.0"}}, 0, "", 60.0, []).figures
    # what the checker wrote is the file's own figure; one derived from the disk here is not (tasks/verdict.py)
    assert "torch_identity" not in cuda_check.file_says(result).figures


def test_the_record_reader_finds_a_dist_under_any_spelling_of_its_name_at_its_version(tmp_path):
    info = tmp_path / "nvidia_cublas_cu12-12.8.4.1.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("nvidia/cublas/__init__.py,,\n")
    assert identity.record_in(tmp_path, "nvidia-cublas-cu12", "12.8.4.1") == info / "RECORD"
    assert identity.record_in(tmp_path, "Nvidia.Cublas_cu12") == info / "RECORD"
    assert identity.record_in(tmp_path, "nvidia-cublas-cu12", "12.6.0") is None


def test_two_records_of_one_dist_are_no_answer(tmp_path):
    for version in ("2.10.0", "2.11.0"):
        (tmp_path / f"torch-{version}.dist-info").mkdir()
        (tmp_path / f"torch-{version}.dist-info" / "RECORD").write_text(version)
    assert identity.record_in(tmp_path, "torch") is None
    assert identity.record_in(tmp_path, "torch", "2.11.0") == tmp_path / "torch-2.11.0.dist-info" / "RECORD"
