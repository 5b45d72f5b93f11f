"""Secrets never reach a file: the one redaction function every env dump uses."""

from __future__ import annotations

from tasks import redact


def test_names_with_secret_words_are_redacted_in_any_case():
    env = {"HF_TOKEN": "hf_abc", "NVIDIA_API_KEY": "k", "cuda_secret": "s", "PIP_PASSWORD": "p",
           "AWS_CREDENTIALS_FILE": "c", "CUDA_HOME": "/usr/local/cuda"}
    safe = redact.redact_env(env)
    assert safe["CUDA_HOME"] == "/usr/local/cuda"
    assert all(safe[n] == redact.REDACTED for n in env if n != "CUDA_HOME")


def test_credentials_inside_urls_are_redacted():
    safe = redact.redact_value("PIP_INDEX_URL", "https://alice:hunter2@pypi.example.com/simple")
    assert safe == "https://<redacted>@pypi.example.com/simple"
    assert redact.redact_value("PIP_INDEX_URL", "https://pypi.org/simple") == "https://pypi.org/simple"


def test_env_lines_pick_what_matters_and_say_unset_or_empty():
    env = {"CUDA_VISIBLE_DEVICES": "", "NCCL_DEBUG": "INFO", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "HOME": "/root", "NVIDIA_VISIBLE_DEVICES": "all"}
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
    assert safe == ("HTTPS://<redacted>@host/simple?token=<redacted>&page=2 "
                    "https://h/x?Api_Key=<redacted>#frag")
    assert installers.redact_url(text) == safe  # the installer's logs use the same rule
