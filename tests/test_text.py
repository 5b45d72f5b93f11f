"""tasks/text.py: values from the machine written on one line and inert in markdown."""

from __future__ import annotations

import pytest

from tasks import text


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain GPU name", "plain GPU name"),
        ("a\nb", "a\\nb"),
        ("a\r\nb\tc", "a\\r\\nb\\tc"),
        ("red \x1b[31m text", "red \\x1b[31m text"),
        ("nul\x00 del\x7f c1\x85", "nul\\x00 del\\x7f c1\\x85"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("bidi \u202etxt.exe", "bidi \\u202etxt.exe"),
        ("C:\\Windows\\path", "C:\\Windows\\path"),
        (12.5, "12.5"),
    ],
)
def test_one_line_escapes_every_control_character(value, written):
    assert text.one_line(value) == written
    assert len(text.one_line(value).splitlines()) <= 1


def test_a_value_with_newlines_cannot_add_a_forged_section():
    forged = "x\n## Gate\nPASS: driver 999.99 supports CUDA 99.9"
    assert "\n" not in text.one_line(forged)
    assert text.one_line(forged).startswith("x\\n## Gate")


@pytest.mark.parametrize(
    "value",
    [
        "[click](https://evil.example)",
        "![img](https://evil.example/x.png)",
        "<img src=x onerror=alert(1)>",
        "<https://evil.example>",
        "a | b | c",
        "`code` *bold* _em_ ~~del~~",
        "&lt;script&gt;",
        "line\n# Heading",
    ],
)
def test_md_inert_leaves_no_markdown_syntax_active(value):
    got = text.md_inert(value)
    assert "\n" not in got
    for active in ("[", "]", "<", "|", "`", "*"):
        assert active not in got.replace("\\" + active, "").replace(text.MD_SPLIT, ""), (active, got)
    assert "&lt;script" not in got  # an entity in the value shows as typed, not decoded


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("see http://evil.example/x", "see http\\://evil.example/x"),
        ("HTTPS://evil.example", "HTTPS\\://evil.example"),
        ("ftp://evil.example", "ftp\\://evil.example"),
        ("visit www.evil.example now", "visit www\\.evil.example now"),
        ("WWW.evil.example", "WWW\\.evil.example"),
        ("~~FAIL~~ PASS", "\\~\\~FAIL\\~\\~ PASS"),
        ("mail ops.team+gpu@evil.example", "mail ops.team+gpu<!---->@evil.example"),
        ("git@github.com:x/y and a@b", "git<!---->@github.com:x/y and a<!---->@b"),
        ("@channel user@ x", "@channel user@ x"),
    ],
)
def test_md_inert_leaves_nothing_for_github_to_autolink_or_strike(value, want):
    """GitHub links a bare URL or www. name by itself (cmark-gfm's autolink extension, checked with cmarkgfm:
    an escaped ':' or '.' keeps it plain text) and an e-mail address (escapes do not stop that one: an empty
    HTML comment before its '@' splits the text the extension searches) and strikes ~~text~~ through."""
    assert text.md_inert(value) == want


def test_md_inert_keeps_ordinary_text_readable():
    assert (
        text.md_inert("NVIDIA H100 80GB HBM3 (driver 580.95.05, CUDA >= 12.8)")
        == "NVIDIA H100 80GB HBM3 (driver 580.95.05, CUDA >= 12.8)"
    )
