"""Keeping secrets out of run folders: the one place that decides what an environment dump shows.

Every writer that puts environment variables into a file goes through `redact_env` (or
`env_lines`, which uses it). A variable whose NAME contains TOKEN, KEY, SECRET, PASSWORD or
CREDENTIAL (any case) is written as `<redacted>`. A URL-valued PIP_*, UV_*, HF_* or *_URL variable is
written as `scheme://host/` only (a token can sit in the user part, the path or the query). In every
other value and in free text (install logs), `redact_url` replaces the user part of a URL (up to its
last `@`, so a raw `@` in a password leaks nothing) and secret-looking query parameters (token, key,
secret, password, credential, sig, auth).

`credential_free` removes the same two credentials from one URL instead of hiding them: the form in which
install compares where a file came from with where it should come from (pip drops the user part of the
URLs it records). It splits the URL as pip records it (urlsplit); a URL whose host part holds a backslash,
which urlsplit and pip's downloader (urllib3, like browsers) split at different places, is left as it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")
# Query parameters that carry a credential besides the words above: an Azure SAS `sig=`, an S3
# `X-Amz-Signature=`, `?auth=`.
SECRET_PARAM_WORDS = (*SECRET_WORDS, "SIG", "AUTH")
URL_VARIABLE_PREFIXES = ("PIP_", "UV_", "HF_")
REDACTED = "<redacted>"
UNSET = "<unset>"

# The user part runs to the LAST "@" before the path: a raw "@" inside the password is part of it.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
# A query parameter whose name holds a secret word (`?token=…`, `&api_key=…`): its value goes.
_URL_SECRET_PARAM = re.compile(
    r"([?&;][^=&#\s]*(?:" + "|".join(SECRET_PARAM_WORDS) + r")[^=&#\s]*=)[^&#\s]+", re.IGNORECASE
)

# The variables that matter to a GPU bring-up, shown in env_info.txt: exact names, then prefixes.
RELEVANT_NAMES = (
    "CUDA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
    "PATH",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "PYTHONPATH",
    "OMP_NUM_THREADS",
)
RELEVANT_PREFIXES = ("NVIDIA_", "CUDA_", "PYTORCH_", "TORCH_", "NCCL_", "HF_", "PIP_", "UV_")


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def is_secret_param(name: str) -> bool:
    """A query parameter that carries a credential (`token`, `api_key`, an Azure SAS `sig`, `X-Amz-Signature`)."""
    upper = name.upper()
    return any(word in upper for word in SECRET_PARAM_WORDS)


def credential_free(url: str) -> str:
    """`url` without its user part and its secret query parameters (removed, not replaced), split by urlsplit:
    `https://alice:pw@host/simple?token=t&page=2` -> `https://host/simple?page=2`. For comparing URLs only: one
    whose host it cannot name for certain comes back as it was, credentials and all, and so matches no URL that
    names its host plainly (a file from there is refused). That is one urlsplit cannot read (`http://[::1`), and
    one with a backslash in its host part: `https://u:p@evil.net\\@pypi.org/simple/` is pypi.org to urlsplit
    but evil.net to urllib3 (pip's downloader) and to browsers, which end the host at the backslash."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "\\" in parts.netloc:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(p for p in parts.query.split("&") if p and not is_secret_param(p.split("=", 1)[0]))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_url(text: str) -> str:
    """`text` with credentials inside URLs replaced: `user:pass@` and secret-named query parameters."""
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    return _URL_SECRET_PARAM.sub(rf"\1{REDACTED}", text)


_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://(\S*)")


def is_url_variable(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(URL_VARIABLE_PREFIXES) or upper.endswith(("_URL", "_URLS"))


def url_hosts_only(text: str) -> str:
    """Every URL in `text` cut to `scheme://host/` (the user part, path, query and fragment dropped)."""

    def host(m: re.Match) -> str:
        rest = re.split(r"[?#]", m.group(2), maxsplit=1)[0]
        rest = rest.rsplit("@", 1)[-1]  # after the user part, wherever a raw "@" in it sits
        netloc = rest.split("/", 1)[0].rstrip(",;")
        return f"{m.group(1)}://{netloc or REDACTED}/"

    return _URL.sub(host, text)


def redact_value(name: str, value: str) -> str:
    if is_secret_name(name):
        return REDACTED
    if is_url_variable(name):
        return url_hosts_only(value)
    return redact_url(value)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` that is safe to write to a file."""
    return {name: redact_value(name, value) for name, value in env.items()}


def relevant_names(env: Mapping[str, str]) -> list[str]:
    """Names of the variables worth recording, sorted (CUDA_VISIBLE_DEVICES first, set or not)."""
    found = {n for n in env if n in RELEVANT_NAMES or n.startswith(RELEVANT_PREFIXES)}
    found.discard("CUDA_VISIBLE_DEVICES")
    return ["CUDA_VISIBLE_DEVICES", *sorted(found)]


def env_lines(env: Mapping[str, str], names: Iterable[str] | None = None) -> list[str]:
    """`NAME=value` lines, redacted; CUDA_VISIBLE_DEVICES always says whether it is unset or empty."""
    safe = redact_env(env)
    lines = []
    for name in relevant_names(env) if names is None else names:
        if name not in env:
            lines.append(f"{name}={UNSET}")
        elif name == "CUDA_VISIBLE_DEVICES" and env[name].strip() == "":
            lines.append(f'{name}="{env[name]}"   (set but empty: CUDA programs will see no GPU)')
        else:
            lines.append(f"{name}={safe[name]}")
    return lines
