"""What the installed torch says about itself, as one JSON object on stdout.

Run by the install stage with `.venv-gpu`'s own Python (`python -m training_pt.verify_torch`, isolated,
by tasks/proc.py's launcher): nox's side never imports torch.
Standard library (and tasks/identity.py, training_pt/quick_exit.py) only; it judges nothing (tasks/install.py does).
A failure to import torch is reported in the JSON ("import_error"), not as a crash.
`--env` prints the venv instead (no torch import): its Python tags, purelib, and the distributions
it sees, the first of each name in sys.path order.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import sys
import sysconfig

from tasks import identity  # torch-free, standard library only
from training_pt import quick_exit


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # report what torch said, keep going
        return f"error: {type(e).__name__}: {e}"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def facts() -> dict:
    out = {
        "python": platform.python_version(),
        "python_tag": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "platform": sysconfig.get_platform(),
        "executable": sys.executable,
        "prefix": sys.prefix,
    }
    try:
        import torch
    except Exception as e:
        out["import_error"] = f"{type(e).__name__}: {e}"
        return out
    out.update(
        torch_version=str(torch.__version__),
        torch_file=getattr(torch, "__file__", None),
        torch_identity=identity.of_torch(torch.__file__, torch.__version__)
        if getattr(torch, "__file__", None)
        else None,
        cuda=torch.version.cuda,
        git_version=getattr(torch.version, "git_version", None),
        cudnn=_call(torch.backends.cudnn.version),
        cuda_built=_call(torch.backends.cuda.is_built),
        cuda_available=_call(torch.cuda.is_available),
        arch_list=_call(torch.cuda.get_arch_list),
        devices=[],
        triton=_dist_version("triton") or _dist_version("pytorch-triton"),
        torchvision=_dist_version("torchvision"),
    )
    if out["cuda_available"] is True:
        for i in range(torch.cuda.device_count()):
            cap = _call(torch.cuda.get_device_capability, i)
            out["devices"].append(
                {
                    "index": i,
                    "name": _call(torch.cuda.get_device_name, i),
                    "capability": list(cap) if isinstance(cap, tuple) else cap,
                }
            )
    return out


def env() -> dict:
    seen, dists = set(), []
    for d in importlib.metadata.distributions():
        name = d.metadata["Name"]
        key = re.sub(r"[-_.]+", "-", name or "").lower()
        if not name or key in seen:
            continue
        seen.add(key)
        dists.append({"name": name, "version": d.version, "location": str(d.locate_file(""))})
    return {
        "dists": dists,
        "purelib": sysconfig.get_paths()["purelib"],
        "prefix": sys.prefix,
        "python_tag": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "platform": sysconfig.get_platform(),
        "version": platform.python_version(),
    }


if __name__ == "__main__":
    print(json.dumps(env() if sys.argv[1:] == ["--env"] else facts()))
    quick_exit.exit_quickly(0)
