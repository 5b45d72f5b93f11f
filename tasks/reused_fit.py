"""Whether the packages a `system` (provisioned) channel reuses meet gpu_packages, and one line on any that does not.

Install pins every package the reused interpreter already has to its version (that environment is never
changed), so a gpu_packages entry that such a package fails (a transformers older than configs/m40.yaml
asks for) cannot be met in .venv-gpu, whatever the source holds. torch is fine then; the line names the
package, the version found, the version required (and by which package), and the fix: upgrade it in that
environment, or take a channel that installs its own packages.

- `unmet(requirements, dists)`: the first gpu_packages entry a reused distribution fails, before pip runs;
- `from_conflict(causes)`: the same, read from pip's conflict causes, for a dependency of a gpu_package;
- `Unmet.detail(python, torch)`: the line.

Nothing here runs a command or imports torch.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from tasks.identity import normalize

# pip's "The conflict is caused by:" lines: the pin of a reused package, and what asks for another version of it.
_PIN = re.compile(r"The user requested \(constraint\) (?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)")
_NEED = re.compile(
    r"(?:(?P<by>.+?) depends on|The user requested) (?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?(?P<spec>[^;]*)"
)


@dataclass(frozen=True)
class Unmet:
    name: str  # the reused distribution
    found: str  # its version there
    required: str  # the requirement it fails, e.g. "transformers>=4.46"
    required_by: str = ""  # the package that requires it ("m40-top 1.0"); "" for a gpu_packages entry itself

    def detail(self, python: str, torch: str) -> str:
        by = f" by {self.required_by}" if self.required_by else ""
        return (
            f"{self.name} {self.found} of {python}, needed {self.required}{by}; its torch {torch} is fine: "
            f"upgrade {self.name} there ({python} -m pip install {shlex.quote(self.required)}; install never "
            "changes that environment), or use a channel that installs its own (-p auto)"
        )


def unmet(requirements: Iterable[str], dists: list[dict]) -> Unmet | None:
    """The first of `requirements` that a distribution of `dists` (name, version: what the venv imports) fails."""
    have: dict[str, dict] = {}
    for d in dists:
        have.setdefault(normalize(d["name"]), d)
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue  # config.py refuses these when the settings load
        found = have.get(normalize(req.name))
        if found is None or (req.marker is not None and not req.marker.evaluate()):
            continue
        try:
            met = req.specifier.contains(Version(found["version"]), prereleases=True)  # as pip judges an installed one
        except InvalidVersion:
            continue
        if not met:
            return Unmet(found["name"], found["version"], text.split(";", 1)[0].strip())
    return None


def from_conflict(causes: Iterable[str]) -> Unmet | None:
    """The pinned (reused) package that pip's conflict causes name, and the first requirement of it they state."""
    causes = [c.strip() for c in causes]
    pins = {normalize(m["name"]): m for c in causes if (m := _PIN.fullmatch(c))}
    for c in causes:
        m = _NEED.fullmatch(c)
        if m is None or normalize(m["name"]) not in pins or normalize(m["name"]) == "torch":
            continue  # torch itself too old for a package: pip's own words name it already
        spec = m["spec"].strip().replace(" and ", ",")
        if spec:
            pin = pins[normalize(m["name"])]
            return Unmet(pin["name"], pin["version"], f"{m['name']}{spec}", m["by"] or "")
    return None
