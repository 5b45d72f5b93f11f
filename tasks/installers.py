"""pip and uv for the install stage: isolated from the machine's config, every file's source checked.

- Isolation: children run with PIP_CONFIG_FILE=os.devnull (pip then reads no config file at all),
  UV_NO_CONFIG=1, and without PIP_*/UV_* variables except a few that carry proxies, certificates and
  timeouts. `--keep-pip-config` keeps the machine's config (for a proxy set there); the provenance
  check below still protects.
- One source per step: `--index-url URL` (never `--extra-index-url`), or `--no-index --find-links DIR`.
  Binary only (`--only-binary=:all:`): nothing is ever built from source.
- Provenance: pip writes `--report` JSON naming the URL of every file it installed; uv resolves first
  into a pylock.toml naming every file's URL, which is checked before `uv pip install` installs
  exactly that lock. A file from anywhere but the step's source is refused, naming the file. URLs are
  compared without their credentials (tasks/redact.py's credential_free): pip drops the user part of
  an index's URL from the URLs it records, and a password is no part of where a file came from.
- Failures are classified from the installer's output: index unreachable, no wheel for this Python
  and platform, or the installer's own last error line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks import jsonfile, proc, redact
from tasks.identity import normalize
from tasks.records import now_iso

# Failure categories, worded for the report.
UNREACHABLE = "index unreachable"
NO_WHEEL = "no wheel for this Python and platform"
CPU_BUILD = "CPU build"
CUDA_MISMATCH = "CUDA version mismatch"
NOT_USABLE = "not usable on this GPU"
PROVENANCE = "provenance refused"
CONFLICT = "dependency conflict"
FAILED = "install failed"
NO_TORCH = "no torch"

PIP_ENV_KEEP = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES")
UV_ENV_KEEP = ("UV_HTTP_TIMEOUT", "UV_HTTP_RETRIES", "UV_NATIVE_TLS")
PYPI_SIMPLE = "https://pypi.org/simple"
PYPI_FILES = "https://files.pythonhosted.org/packages/"
UV_MIN = (0, 6, 15)
# A source marked retired in the catalog: tried once, quickly (a DNS failure or a 404 answers at once;
# a silent host costs this many seconds, not pip's default 15 s times 5 retries).
RETIRED_TIMEOUT_S = 5  # first uv with pylock.toml in `uv pip compile` and `uv pip install -r`


class StepFailed(Exception):
    """An install step failed: `category` (one of the constants above) and a one-line `detail`; for a dependency
    conflict, `causes`: every line of pip's "The conflict is caused by:" (the detail shows the first four)."""

    def __init__(self, category: str, detail: str, causes: tuple[str, ...] = ()):
        super().__init__(f"{category}: {detail}")
        self.category, self.detail, self.causes = category, detail, causes


def redact_url(text) -> str:
    """Credentials inside URLs hidden (the one rule of tasks/redact.py)."""
    return redact.redact_url(str(text))


# --------------------------------------------------------------------------- environment


def child_env(keep_config: bool) -> tuple[dict, str]:
    """The environment for pip/uv and the python children, and one line saying what was done."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if keep_config:
        env["UV_PREVIEW_FEATURES"] = "pylock"
        return env, "kept (--keep-pip-config): the machine's pip/uv config files and PIP_*/UV_* variables apply"
    dropped = sorted(
        k
        for k in env
        if (k.startswith("PIP_") and k not in PIP_ENV_KEEP) or (k.startswith("UV_") and k not in UV_ENV_KEEP)
    )
    for k in dropped:
        del env[k]
    kept = sorted(k for k in env if k.startswith(("PIP_", "UV_")))
    env["PIP_CONFIG_FILE"] = os.devnull
    env["UV_NO_CONFIG"] = "1"
    env["UV_PREVIEW_FEATURES"] = "pylock"  # uv warns that pylock.toml is a preview feature otherwise
    return env, (
        f"isolated: PIP_CONFIG_FILE={os.devnull}, UV_NO_CONFIG=1; dropped {', '.join(dropped) or 'nothing'}; "
        f"kept {', '.join(kept) or 'nothing'}"
    )


# --------------------------------------------------------------------------- sources


def _slash(prefix: str) -> str:
    """A URL prefix files may come from: without credentials (as pip records a file's URL), ending in "/"."""
    prefix = redact.credential_free(prefix)
    return prefix if prefix.endswith("/") else prefix + "/"


@dataclass(frozen=True)
class Source:
    """Where one install step may take files from."""

    label: str
    index_url: str | None = None  # --index-url; None with find_links None: pip's default index (PyPI)
    find_links: Path | None = None  # --no-index --find-links DIR
    allowed: tuple[str, ...] = ()  # URL prefixes every installed file must start with

    def args(self) -> list[str]:
        if self.find_links is not None:
            return ["--no-index", "--find-links", str(self.find_links)]
        if self.index_url:
            return ["--index-url", self.index_url]
        return []

    def allows(self, url: str) -> bool:
        u = unquote(redact.credential_free(url or ""))
        return any(u.startswith(unquote(p)) for p in self.allowed)

    def missing(self) -> str | None:
        """Why this source cannot work at all, found without running an installer (local paths)."""
        if self.find_links is not None and not self.find_links.is_dir():
            return f"wheelhouse {self.find_links} is not a directory"
        if self.index_url and self.index_url.startswith("file:"):
            root = Path(unquote(urlsplit(self.index_url).path))
            if not root.is_dir():
                return f"{self.index_url}: no such directory"
        return None


def index_source(url: str, files_from: tuple[str, ...] = ()) -> Source:
    return Source(label=url, index_url=url, allowed=(_slash(url), *(_slash(p) for p in files_from)))


def deps_index_source(url: str) -> Source:
    """An index for the second step: files from the index's own host (and PyPI's file host for PyPI)."""
    parts = urlsplit(redact.credential_free(url))
    extra = [f"{parts.scheme}://{parts.netloc}/"] if parts.scheme in ("http", "https") else []
    if parts.netloc == "pypi.org":
        extra.append(PYPI_FILES)
    return Source(label=url, index_url=url, allowed=(_slash(url), *extra))


def wheelhouse_source(directory: Path) -> Source:
    d = Path(directory).resolve()
    return Source(label=f"wheelhouse {d}", find_links=d, allowed=(_slash(d.as_uri()),))


def default_source() -> Source:
    return Source(label=f"the default index ({PYPI_SIMPLE})", allowed=(_slash(PYPI_SIMPLE), PYPI_FILES))


# --------------------------------------------------------------------------- what was installed


@dataclass
class Installed:
    name: str
    version: str
    url: str
    sha256: str | None = None
    requested: bool = False


def parse_pip_report(path: Path) -> list[Installed]:
    """Every file pip's --report at `path` says it installed; StepFailed(PROVENANCE) when jsonfile cannot read
    it (without it, where the files came from cannot be checked)."""
    try:
        data = jsonfile.read(path)
    except jsonfile.Unreadable as e:
        raise StepFailed(PROVENANCE, f"pip's --report {Path(path).name} cannot be read ({e})") from None
    out = []
    for item in data.get("install", []):
        info = item.get("download_info") or {}
        archive = info.get("archive_info") or {}
        sha = (archive.get("hashes") or {}).get("sha256")
        if not sha and str(archive.get("hash", "")).startswith("sha256="):
            sha = archive["hash"].split("=", 1)[1]
        meta = item.get("metadata") or {}
        out.append(
            Installed(
                name=str(meta.get("name", "?")),
                version=str(meta.get("version", "?")),
                url=str(info.get("url", "")),
                sha256=sha,
                requested=bool(item.get("requested")),
            )
        )
    return out


def parse_pylock(path: Path, requested: list[str]) -> list[Installed]:
    """Every file a pylock.toml (PEP 751, as uv writes it) may install; needs tomllib (Python 3.11+)."""
    import tomllib  # type: ignore[import-not-found,unused-ignore]  # 3.11+; mypy checks as 3.10, the caller gates it

    data = tomllib.loads(Path(path).read_text())
    wanted = {normalize(re.split(r"[<>=!~\[; @]", r, maxsplit=1)[0]) for r in requested}
    out = []
    for pkg in data.get("packages", []):
        name, version = str(pkg.get("name", "?")), str(pkg.get("version", "?"))
        files = list(pkg.get("wheels") or [])
        if pkg.get("sdist"):
            files.append(dict(pkg["sdist"], sdist=True))
        if pkg.get("archive") or pkg.get("vcs") or pkg.get("directory"):
            files.append({"url": "(a direct archive, VCS or directory reference)"})
        for f in files:
            url = f.get("url") or (Path(f["path"]).resolve().as_uri() if f.get("path") else "")
            out.append(
                Installed(
                    name=name,
                    version=version,
                    url=url,
                    sha256=(f.get("hashes") or {}).get("sha256"),
                    requested=normalize(name) in wanted,
                )
            )
    return out


def check_provenance(files: list[Installed], source: Source) -> None:
    """Raise StepFailed(PROVENANCE) naming the first file that did not come from `source`."""
    for f in files:
        if not source.allows(f.url):
            raise StepFailed(
                PROVENANCE,
                f"{f.name} {f.version} came from {redact_url(f.url) or 'an unknown place'}, "
                f"not from {redact_url(source.label)}; refusing it",
            )
        if f.url.endswith((".tar.gz", ".zip", ".tar.bz2")):
            raise StepFailed(
                PROVENANCE,
                f"{f.name} {f.version} would be built from source ({redact_url(f.url)}); refusing (binary wheels only)",
            )


# --------------------------------------------------------------------------- failure classification

_NET_SIGNS = [
    (
        r"Name or service not known|failed to lookup address|Temporary failure in name resolution"
        r"|nodename nor servname|getaddrinfo failed|dns error",
        "DNS lookup failed",
    ),
    (r"Connection refused", "connection refused"),
    (r"Network is unreachable|No route to host", "network unreachable"),
    (r"ProxyError|Tunnel connection failed|proxy error", "proxy error"),
    (r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|SSLError|invalid peer certificate", "TLS certificate error"),
    (r"timed out|ConnectTimeout|ReadTimeout|operation timed out", "timed out"),
]
_HTTP_STATUS = re.compile(r"HTTP error (\d{3})|\b(\d{3}) (?:Client|Server) Error|status(?: code)?:? (\d{3})")
_NET_ANY = re.compile(
    r"NewConnectionError|Could not fetch URL|Failed to fetch|error sending request for url"
    r"|Max retries exceeded|Retrying \(Retry\(|client error \(Connect\)|HTTP error \d{3}"
    r"|\b\d{3} (?:Client|Server) Error"
)


def platform_phrase(python_tag: str, platform: str) -> str:
    """'cp312', 'linux-x86_64' -> 'cp312 manylinux x86_64'."""
    if platform.startswith("linux-"):
        return f"{python_tag} manylinux {platform.split('-', 1)[1]}"
    return f"{python_tag} {platform}"


def classify(output: str, rc: int, source: Source, where: str) -> StepFailed:
    """Turn an installer's failed output into a StepFailed; `where` is e.g. 'cp312 manylinux x86_64'."""
    label = redact_url(source.label)
    if (why := source.missing()) is not None:
        return StepFailed(UNREACHABLE, why)
    if _NET_ANY.search(output) and not _found_any(output):
        detail = next((text for pattern, text in _NET_SIGNS if re.search(pattern, output)), None)
        if detail is None and (m := _HTTP_STATUS.search(output)):
            detail = f"HTTP {next(g for g in m.groups() if g)}"
        return StepFailed(UNREACHABLE, f"{label} ({detail or 'network error'})")
    m = re.search(
        r"Could not find a version that satisfies the requirement (\S+) (?:\(from ([^)]*)\) )?"
        r"\(from versions: ([^)]*)\)",
        output,
    )
    if m:
        req, needed_by, versions = m.group(1), m.group(2), m.group(3).strip()
        by = f" (required by {needed_by})" if needed_by else ""
        if versions in ("", "none"):
            return StepFailed(NO_WHEEL, f"no {_req_name(req)} wheel{by} for {where} on {label}")
        listed = [v.strip() for v in versions.split(",")]
        shown = ", ".join(listed[-3:]) if len(listed) <= 3 else f"{listed[0]} … {listed[-1]}"
        return StepFailed(NO_WHEEL, f"no wheel matching {req}{by} for {where} on {label} (it has {shown})")
    m = re.search(r"The conflict is caused by:\n((?:[ \t]+\S.*\n?)+)", output)
    if m:
        causes = [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]
        return StepFailed(CONFLICT, "; ".join(causes[:4]), tuple(causes))
    m = re.search(
        r"Because (\S+?)(?:==\S+)? (?:was not found in the package registry|has no wheels with a matching"
        r"|only has wheels|has no usable wheels)[^\n]*?(?: and (\S+?)(?:==\S+)? depends? on \1)?",
        output,
    )
    if m:
        by = f" (required by {m.group(2)})" if m.group(2) else ""
        return StepFailed(NO_WHEEL, f"no {_req_name(m.group(1))} wheel{by} for {where} on {label}")
    m = re.search(r"Because ([^\n]*? depends? on [^\n]*?), we can conclude", output)
    if m:
        return StepFailed(CONFLICT, m.group(1))
    if "No matching distribution found" in output or "requirements are unsatisfiable" in output:
        return StepFailed(NO_WHEEL, f"no matching wheel for {where} on {label}: {last_error(output)}")
    return StepFailed(FAILED, f"exit {rc}: {last_error(output)}")


def _found_any(output: str) -> bool:
    """True when, despite network warnings, the index answered with some versions."""
    m = re.search(r"\(from versions: ([^)]*)\)", output)
    return bool(m and m.group(1).strip() not in ("", "none"))


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~\[;]", req, maxsplit=1)[0]


def last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("ERROR:", "error:", "× ", "╰─▶"))]
    text = (errors or lines or ["no output"])[-1]
    return redact_url(text.removeprefix("ERROR: ").removeprefix("error: "))[:300]


# --------------------------------------------------------------------------- running commands


@dataclass
class CommandLog:
    """Runs commands, echoing their output and appending command + output to the install log (both redacted)."""

    path: Path | None
    env: dict = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    echo: bool = True

    def write(self, text: str) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(redact_url(text))

    def record(self, cmd, output: str, rc: int) -> None:
        """For commands run elsewhere (venv creation): log them like ours."""
        line = " ".join(str(c) for c in cmd)
        self.commands.append(redact_url(line))
        self.write(f"\n$ {line}\n{output}[exit {rc}] {now_iso()}\n")

    def run(
        self, cmd: list, *, echo: bool | None = None, env: dict | None = None, whole_env: dict | None = None
    ) -> tuple[int, str]:
        """Run `cmd` through proc.tee (the one line-by-line tee); log it redacted; return (exit code, output).

        `env` adds to the installers' environment; `whole_env` replaces it (proc.gpu_env for .venv-gpu children).
        """
        cmd = [str(c) for c in cmd]
        line = " ".join(cmd)
        self.commands.append(redact_url(line))
        self.write(f"\n$ {line}\n")
        show = self.echo if echo is None else echo
        if show:
            print(f"install: $ {redact_url(line)}", flush=True)
        chunks: list[str] = []

        def keep(out_line: str) -> None:
            chunks.append(out_line)
            self.write(out_line)
            if show:  # echoed as logged: pip shows an index's user name ("Looking in indexes: https://alice:****@")
                sys.stdout.write(redact_url(out_line))
                sys.stdout.flush()

        try:
            full = whole_env if whole_env is not None else {**self.env, **(env or {})}
            rc = proc.tee(cmd, env=full, inherit_env=False, echo=False, on_line=keep)
        except KeyboardInterrupt:
            self.write(f"[interrupted] {now_iso()}\n")
            raise
        self.write(f"[exit {rc}] {now_iso()}\n")
        return rc, "".join(chunks)

    def start(self, cmd: list) -> tuple[list[str], subprocess.Popen, Path]:
        """Start `cmd` in the background (the installers' environment, output kept aside); `finish` awaits it
        and logs it like `run` does, as one block."""
        cmd = [str(c) for c in cmd]
        fd, name = tempfile.mkstemp(prefix="m40-command-", suffix=".txt")
        os.close(fd)
        try:
            return cmd, proc.start(cmd, Path(name), env=self.env, cwd=Path.cwd()), Path(name)
        except OSError:
            Path(name).unlink(missing_ok=True)
            raise

    def finish(self, started: tuple[list[str], subprocess.Popen, Path], timeout: float = 600) -> tuple[int, str]:
        """(exit code, output) of a command `start` started (124 after `timeout` s, its group killed)."""
        cmd, child, out_path = started
        try:
            rc = proc.finish(child, timeout)
            out = out_path.read_text(encoding="utf-8", errors="replace")
        finally:
            out_path.unlink(missing_ok=True)
        self.record(cmd, out, rc)
        return rc, out


# --------------------------------------------------------------------------- installers


@dataclass
class Installer:
    name: str  # "pip" or "uv"
    version: str = ""
    uv: str | None = None  # the uv executable
    note: str = ""  # why this installer (and why not the other)

    def describe(self) -> str:
        text = f"{self.name} {self.version}".strip()
        return f"{text} ({self.note})" if self.note else text


def pip_version(python: Path, log: CommandLog) -> str | None:
    """The version of the pip `python -m pip` runs, None where it has none. Asked of pip's package, not of
    `pip --version`, which imports most of pip (about a second; the install steps run it in full anyway)."""
    rc, out = log.run([python, "-I", "-c", "import pip; print('pip', pip.__version__)"], echo=False)
    m = re.match(r"pip (\S+)", out.strip())
    return m.group(1) if rc == 0 and m else None


def find_uv() -> str | None:
    return shutil.which("uv")


def uv_version(uv: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([uv, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else None


def choose(mode: str, *, provisioned: bool) -> Installer:
    """pip, or uv when asked for (`uv`) or present (`auto`) and able to show what it installs."""
    if mode == "pip":
        return Installer("pip", note="--installer pip")
    uv = find_uv()
    why_not = None
    if uv is None:
        why_not = "uv not found on PATH"
    elif provisioned:
        why_not = (
            "uv does not see packages provided through the .pth file of a provisioned venv and would reinstall them"
        )
    elif sys.version_info < (3, 11):
        why_not = "reading uv's pylock.toml needs tomllib (Python 3.11+ on nox's side)"
    elif (v := uv_version(uv)) is None or v < UV_MIN:
        why_not = (
            f"uv {'.'.join(map(str, v)) if v else '?'} is older than {'.'.join(map(str, UV_MIN))} (no pylock.toml)"
        )
    if why_not is None:
        return Installer(
            "uv",
            version=".".join(map(str, uv_version(uv) or ())),
            uv=uv,
            note=f"--installer {mode}; provenance from the pylock.toml it resolves",
        )
    if mode == "uv":
        return Installer("pip", note=f"--installer uv asked, pip used: {why_not}")
    return Installer("pip", note=f"auto: {why_not}")


def install(
    inst: Installer,
    log: CommandLog,
    python: Path,
    requirements: list[str],
    source: Source,
    *,
    pre: bool,
    constraints: Path | None,
    workdir: Path,
    step: str,
    where: str,
    keep_config: bool,
    fast: bool = False,
    no_deps: bool = False,
) -> list[Installed]:
    """Install `requirements` into the venv of `python` from `source` only; returns what was installed.

    Raises StepFailed (classified) on failure or when a file did not come from `source`.
    """
    if (why := source.missing()) is not None:
        raise StepFailed(UNREACHABLE, why)
    if inst.name == "uv":
        return _install_uv(
            inst,
            log,
            python,
            requirements,
            source,
            pre=pre,
            constraints=constraints,
            workdir=workdir,
            step=step,
            where=where,
            keep_config=keep_config,
            fast=fast,
            no_deps=no_deps,
        )
    report = workdir / f"pip-report-{step}.json"
    cmd = _pip_command(
        python, requirements, source, report, pre=pre, fast=fast, no_deps=no_deps, constraints=constraints
    )
    rc, out = log.run(cmd)
    if rc != 0:
        raise classify(out, rc, source, where)
    files = parse_pip_report(report)
    try:
        check_provenance(files, source)
    except StepFailed:
        undo(python, files, log)  # pip installed before its report could be read: a refused file must not stay
        raise
    return files


def undo(python: Path, files: list[Installed], log) -> None:
    """Uninstall what one pip command installed (a refused file), so that no later command of the same venv
    finds its requirement "already satisfied" by it; StepFailed(PROVENANCE) when pip cannot."""
    names = sorted({f.name for f in files})
    if not names:
        return
    rc, out = log.run([python, "-I", "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", *names])
    if rc != 0:
        raise StepFailed(PROVENANCE, f"a refused {', '.join(names)} could not be uninstalled again (exit {rc})")


def _pip_command(
    python: Path, requirements: list[str], source: Source, report: Path, *, pre, fast, no_deps, constraints
) -> list:
    """`pip install` of `requirements` from `source` only, binary only, writing its --report JSON to `report`."""
    cmd: list = [python, "-I", "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    cmd += ["--progress-bar", "off", "--only-binary=:all:", *source.args()]
    if pre:
        cmd.append("--pre")
    if fast:
        cmd += ["--retries", "0", "--timeout", str(RETIRED_TIMEOUT_S)]
    if no_deps:
        cmd.append("--no-deps")
    if constraints is not None:
        cmd += ["--constraint", constraints]
    return cmd + ["--report", report, *requirements]


def _install_uv(
    inst, log, python, requirements, source, *, pre, constraints, workdir, step, where, keep_config, fast, no_deps
) -> list[Installed]:
    req_in = workdir / f"requirements-{step}.in"
    req_in.write_text("\n".join(requirements) + "\n")
    lock = workdir / f"pylock.{step}.toml"
    common = [] if keep_config else ["--no-config"]
    cmd = [
        inst.uv,
        "pip",
        "compile",
        "--quiet",
        req_in,
        "--python",
        python,
        *common,
        "--only-binary",
        ":all:",
        *source.args(),
        "--format",
        "pylock.toml",
        "-o",
        lock,
        "--no-header",
    ]
    if source.index_url is None and source.find_links is None:
        cmd += ["--index-url", PYPI_SIMPLE]
    if pre:
        cmd += ["--prerelease", "allow"]
    if constraints is not None:
        cmd += ["--constraint", constraints]
    if no_deps:
        cmd.append("--no-deps")
    quick = {"UV_HTTP_TIMEOUT": str(RETIRED_TIMEOUT_S), "UV_HTTP_RETRIES": "0"} if fast else None
    rc, out = log.run(cmd, env=quick)
    if rc != 0:
        raise classify(out, rc, source, where)
    files = parse_pylock(lock, requirements)
    check_provenance(files, source)  # before anything is downloaded and installed
    rc, out = log.run(
        [inst.uv, "pip", "install", "--python", python, *common, *(["--no-deps"] if no_deps else []), "-r", lock]
    )
    if rc != 0:
        raise classify(out, rc, source, where)
    return files
