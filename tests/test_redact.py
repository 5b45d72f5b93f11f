"""Secrets never reach a file: the one redaction function every env dump uses."""

from __future__ import annotations

import argparse

import pytest

from tasks import probe, redact


def test_names_with_secret_words_are_redacted_in_any_case():
    env = {
        "HF_TOKEN": "hf_abc",
        "NVIDIA_API_KEY": "k",
        "cuda_secret": "s",
        "PIP_PASSWORD": "p",
        "AWS_CREDENTIALS_FILE": "c",
        "CUDA_HOME": "/usr/local/cuda",
    }
    safe = redact.redact_env(env)
    assert safe["CUDA_HOME"] == "/usr/local/cuda"
    assert all(safe[n] == redact.REDACTED for n in env if n != "CUDA_HOME")


def test_credentials_inside_urls_are_redacted():
    safe = redact.redact_value("DATA_ENDPOINT", "https://alice:hunter2@pypi.example.com/simple")
    assert safe == "https://<redacted>@pypi.example.com/simple"
    assert redact.redact_value("DATA_ENDPOINT", "https://pypi.org/simple") == "https://pypi.org/simple"
    assert (
        redact.redact_value("PIP_INDEX_URL", "https://alice:hunter2@pypi.example.com/simple")
        == "https://pypi.example.com/"
    )  # a URL-valued pip variable: scheme and host only


def test_env_lines_pick_what_matters_and_say_unset_or_empty():
    env = {
        "CUDA_VISIBLE_DEVICES": "",
        "NCCL_DEBUG": "INFO",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "HOME": "/root",
        "NVIDIA_VISIBLE_DEVICES": "all",
    }
    lines = redact.env_lines(env)
    assert lines[0].startswith('CUDA_VISIBLE_DEVICES=""') and "set but empty" in lines[0]
    assert "NCCL_DEBUG=INFO" in lines and "NVIDIA_VISIBLE_DEVICES=all" in lines
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in lines
    assert not any(line.startswith("HOME=") for line in lines)
    assert redact.env_lines({})[0] == "CUDA_VISIBLE_DEVICES=<unset>"


def test_credentials_inside_urls_are_hidden_in_any_scheme_case_and_in_query_parameters():
    from tasks import installers, redact

    text = "HTTPS://user:pass@host/simple?token=abc123&page=2 https://h/x?Api_Key=zz#frag"
    safe = redact.redact_url(text)
    assert "pass" not in safe and "abc123" not in safe and "zz" not in safe
    assert safe == ("HTTPS://<redacted>@host/simple?token=<redacted>&page=2 https://h/x?Api_Key=<redacted>#frag")
    assert installers.redact_url(text) == safe  # the installer's logs use the same rule


SECRET_URLS = {
    # name: (value as a user sets it, what must not appear anywhere in the file)
    "PIP_INDEX_URL": ("https://user:p@ss@pypi.example.com/simple", ("p@ss", "ss@", "user")),
    "PIP_EXTRA_INDEX_URL": (
        "https://alice:hunter2@a.example.com/simple https://b.example.com/t/ghp_TOKEN123/simple",
        ("hunter2", "alice", "ghp_TOKEN123"),
    ),
    "UV_INDEX_URL": ("https://pkgs.example.com/simple?auth=AUTHSECRET", ("AUTHSECRET",)),
    "HF_ENDPOINT": ("https://acct.blob.core.windows.net/c?sv=2024-11-04&sig=SASSIG%2Bxyz&se=2030", ("SASSIG", "sv=")),
    "MODEL_URL": ("https://host.example.com/download/tok_SECRETPATH/model.bin", ("tok_SECRETPATH",)),
}


@pytest.mark.parametrize("name", sorted(SECRET_URLS))
def test_url_valued_variables_are_written_as_scheme_and_host_only(name):
    value, secrets = SECRET_URLS[name]
    safe = redact.redact_value(name, value)
    assert not any(s in safe for s in secrets), safe
    assert safe.startswith("https://") and safe.endswith("/")


def test_a_password_with_a_raw_at_sign_leaks_nothing_in_free_text():
    line = "Looking in indexes: https://user:p@ss@pypi.example.com/simple, https://h.example.com/x"
    safe = redact.redact_url(line)
    assert "p@ss" not in safe and "ss@" not in safe and "user" not in safe
    assert safe == "Looking in indexes: https://<redacted>@pypi.example.com/simple, https://h.example.com/x"


def test_sas_signatures_and_auth_parameters_are_hidden_in_free_text():
    safe = redact.redact_url("GET https://a.blob.core.windows.net/c/f?sv=1&sig=SASSIG&se=2 https://h/x?auth=AUTHZ")
    assert "SASSIG" not in safe and "AUTHZ" not in safe and "sv=1" in safe


def test_the_env_info_of_a_real_probe_run_holds_no_part_of_any_secret(monkeypatch, run_dir, nvml_machine):
    for name, (value, _) in SECRET_URLS.items():
        monkeypatch.setenv(name, value)
    probe.run(run_dir, argparse.Namespace(min_driver_cuda=None, settings=None, probe_source="auto", probe_timeout=None))
    env_info = (run_dir / "env_info.txt").read_text()
    for name, (_, secrets) in SECRET_URLS.items():
        assert not any(s in env_info for s in secrets), name
    assert "PIP_INDEX_URL=https://pypi.example.com/\n" in env_info
    assert "UV_INDEX_URL=https://pkgs.example.com/\n" in env_info  # uv's variables matter to the install
    assert "HF_ENDPOINT=https://acct.blob.core.windows.net/\n" in env_info


def test_a_url_without_its_credentials_is_what_pip_records_and_keeps_its_real_host():
    """The form in which install compares where a file came from with where it should come from: pip drops the
    user part of the URLs it records, so the index's own URL must lose it too; the host is urlsplit's, as pip's."""
    free = redact.credential_free
    assert free("https://alice:hunter2@pypi.example.com/simple") == "https://pypi.example.com/simple"
    assert free("https://user:p@ss@pypi.example.com/simple/") == "https://pypi.example.com/simple/"
    assert free("https://ghp_TOKEN123@pkgs.example.com:8443/t/x/") == "https://pkgs.example.com:8443/t/x/"
    assert free("https://h.example.com/simple?token=abc&page=2") == "https://h.example.com/simple?page=2"
    assert (
        free("https://h.example.com/f.whl?sv=1&sig=SASSIG&se=2#sha256=00")
        == "https://h.example.com/f.whl?sv=1&se=2#sha256=00"
    )
    assert free("https://h.example.com/simple/?Api_Key=zz") == "https://h.example.com/simple/"
    assert free("file:///data/wheels/") == "file:///data/wheels/" and free("") == ""
    assert free("https://evil.net?@pypi.example.com/simple/x.whl").startswith("https://evil.net")  # its real host
    assert redact.is_secret_param("X-Amz-Signature") and not redact.is_secret_param("page")


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pw@pypi.example.com\\@evil.net/simple/",  # urlsplit: host evil.net; WHATWG: pypi.example.com
        "https://evil.net\\@pypi.example.com/simple/x.whl",  # urlsplit: pypi.example.com; urllib3: evil.net
        "https://pypi.example.com\\simple/",
    ],
)
def test_a_url_with_a_backslash_in_its_host_part_is_not_made_credential_free(url):
    """Browsers and urllib3 end the host at a backslash, urlsplit does not: which host such a URL names depends
    on who reads it. It comes back as it was, so it matches no URL that names its host plainly."""
    assert redact.credential_free(url) == url


def test_an_index_url_with_a_backslash_in_its_host_part_allows_no_file():
    """pip's requests (urllib3) would fetch from evil.net; urlsplit alone would allow pypi.example.com's files."""
    from tasks import installers

    ambiguous = installers.index_source("https://u:p@evil.net\\@pypi.example.com/simple/")
    assert not ambiguous.allows("https://pypi.example.com/simple/x-1.0-py3-none-any.whl")
    assert not ambiguous.allows("https://evil.net/simple/x-1.0-py3-none-any.whl")
    plain = installers.index_source("https://pypi.example.com/simple/")
    assert not plain.allows("https://evil.net\\@pypi.example.com/simple/x-1.0-py3-none-any.whl")
    assert plain.allows("https://pypi.example.com/simple/x-1.0-py3-none-any.whl")
