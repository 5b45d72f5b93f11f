"""The interpreter boundary: `tasks/` runs in nox's Python and never imports torch; everything that does
lives in `training_pt/` and is started as `python -m training_pt.<module>` in an isolated environment."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tasks import layout, proc

TASKS = layout.ROOT / "tasks"
CONFIGURATOR = layout.ROOT / "training_pt" / "configurator.py"  # torch-free: tasks/validate.py imports it


def torch_imports(path: Path) -> list[str]:
    """`import torch...` / `from torch... import` statements anywhere in the file (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno}" for a in node.names if a.name.split(".")[0] == "torch"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch":
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_module_in_tasks_imports_torch():
    files = sorted(TASKS.rglob("*.py"))
    assert len(files) > 10 and TASKS / "train.py" in files
    assert [hit for f in files for hit in torch_imports(f)] == []
    assert torch_imports(CONFIGURATOR) == []


def test_the_scan_sees_torch_imports_in_functions_too(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\ndef f():\n    from torch.nn import functional\n    import torch.cuda as c\n")
    assert torch_imports(bad) == ["bad.py:3", "bad.py:4"]


def test_every_tasks_module_imports_where_torch_cannot():
    modules = sorted(f"tasks.{p.stem}" for p in TASKS.glob("*.py") if p.stem != "__init__")
    modules.append("training_pt.configurator")
    code = (
        "import importlib, sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is not importable in nox\\'s interpreter (test)')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "for m in sys.argv[1:]:\n"
        "    importlib.import_module(m)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']\n"
        "print('imported', len(sys.argv) - 1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=120, cwd=layout.ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"imported {len(modules)}"


def test_training_pt_is_a_package_that_says_where_it_runs():
    import training_pt

    assert ".venv-gpu" in training_pt.__doc__ and "imports torch" in training_pt.__doc__
    for module in (layout.TRAIN_MODULE, layout.BENCH_MODULE, layout.GPU_CHECKS_MODULE, layout.VERIFY_MODULE):
        assert (layout.ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    assert not (TASKS / "gpu_checks.py").exists() and not (TASKS / "verify_torch.py").exists()


def test_the_launcher_isolates_the_child(monkeypatch):
    for name, value in (
        ("PYTHONPATH", "/elsewhere"),
        ("PYTHONHOME", "/h"),
        ("PYTHONSTARTUP", "/s.py"),
        ("PYTHONUSERBASE", "/u"),
        ("PYTHONINSPECT", "1"),
    ):
        monkeypatch.setenv(name, value)
    env = proc.gpu_env({"OMP_NUM_THREADS": "4", "PYTHONPATH": "/sneaked/in"})
    python_vars = {k: v for k, v in env.items() if k.startswith("PYTHON")}
    assert python_vars == {
        "PYTHONPATH": str(layout.ROOT),
        "PYTHONNOUSERSITE": "1",
        "PYTHONSAFEPATH": "1",
        "PYTHONUNBUFFERED": "1",
    }
    assert env["OMP_NUM_THREADS"] == "4" and env["NCCL_NVLS_ENABLE"] == "0" and env["PATH"] == os.environ["PATH"]
    assert proc.gpu_command(Path("/v/bin/python"), layout.BENCH_MODULE, ["--help"]) == [
        "/v/bin/python",
        "-m",
        "training_pt.bench",
        "--help",
    ]


def test_a_torch_on_pythonpath_is_not_the_one_the_child_imports(tmp_path, monkeypatch, capsys):
    """The launcher's child (here install's verifier) imports the venv's torch, not a stand-in on PYTHONPATH."""
    import json

    import torch

    standin = tmp_path / "standin"
    (standin / "torch").mkdir(parents=True)
    (standin / "torch" / "__init__.py").write_text(f"open({str(standin / 'imported')!r}, 'w').close()\n")
    monkeypatch.setenv("PYTHONPATH", str(standin))
    log = tmp_path / "verify.log"
    assert proc.run_gpu(Path(sys.executable), layout.VERIFY_MODULE, [], log) == 0
    facts = json.loads(log.read_text().splitlines()[-1])
    assert facts["torch_file"] == torch.__file__ and not (standin / "imported").exists()
    assert facts["torch_identity"]["version"] == torch.__version__ and facts["torch_identity"]["record_sha256"]
    capsys.readouterr()


def test_no_file_of_the_project_holds_a_merge_conflict():
    """docs/install.md once kept both sides of a rebase conflict: a newcomer read two versions of a step."""
    listed = subprocess.run(["git", "-C", str(layout.ROOT), "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:
        return  # not a git checkout (an unpacked release): nothing to list
    markers = ("<<<<<<< ", ">>>>>>> ")
    found = [
        f"{name}:{number}"
        for name in listed.stdout.splitlines()
        if name.endswith((".md", ".py", ".yaml", ".j2", ".toml", ".sh", ".txt")) and (layout.ROOT / name).is_file()
        for number, line in enumerate((layout.ROOT / name).read_text(errors="replace").splitlines(), 1)
        if line.startswith(markers)
    ]
    assert found == []
