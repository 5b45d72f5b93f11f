"""Text from the machine made safe to write into the evidence: on one line, and inert in markdown.

Every value the machine or the user supplies (environment values, GPU names, driver strings, error
reasons) goes through `one_line` before it is written into a text file of the run, so it cannot add a
line (a forged "## Gate" section) or a terminal escape; and through `md_inert` before it is written
into README.md, so it cannot become a link, an image, HTML or a table column. Never imports torch.
"""

from __future__ import annotations

import re
import unicodedata

# Control characters (Cc), format characters (Cf: bidi overrides, zero-width), and the Unicode line
# and paragraph separators (Zl, Zp) that str.splitlines() and many viewers treat as line breaks.
_CONTROL_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Markdown that could start a link or image ("[", which "!" needs too), a code span, bold or a table column,
# and the backslash itself
# (so an escape already in the value stays visible as written), and "~" (~~strikethrough~~). "_" and "#"
# stay readable (`cuda_check`, `#3`): inside a line of words they start nothing that could mislead.
_MD_PUNCTUATION = "\\`*[]|~"
# "<" opens HTML and autolinks; "&" an entity. ">" is left alone: it acts only at a line's start, and
# a value never starts a line of the README.
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;"}


def _escaped(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if unicodedata.category(ch) in _CONTROL_CATEGORIES:
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return ch


def one_line(value: object) -> str:
    """`value` as one line of text: every control character escaped as Python writes it (\\n, \\x1b, \\u2028)."""
    return "".join(_escaped(ch) for ch in str(value))


# GitHub's autolink extension links a bare "scheme://..." and "www...." by itself: an escaped ":" or "." keeps
# it plain text (checked with cmarkgfm, GitHub's renderer). It links an e-mail address (mailto:) whatever is
# escaped in it, since it searches the text after escapes are undone; an empty HTML comment before the '@'
# (MD_SPLIT, shown by no renderer) leaves the local part and the domain in two texts, so nothing is linked.
_AUTOLINK = re.compile(r"(?<=[A-Za-z])(:)(?=//)|(?<![A-Za-z0-9])((?i:www))(\.)")
MD_SPLIT = "<!---->"
_EMAIL_AT = re.compile(r"(?<=[A-Za-z0-9._+-])@(?=[A-Za-z0-9_-])")


def md_inert(value: object) -> str:
    """`value` as one line of markdown that renders as the plain text it is (no link, image, HTML, column,
    strikethrough): markdown's own characters escaped, and an empty comment (MD_SPLIT) before an e-mail's '@'."""
    out = []
    for ch in one_line(value):
        if ch in _MD_ENTITIES:
            out.append(_MD_ENTITIES[ch])
        elif ch in _MD_PUNCTUATION:
            out.append("\\" + ch)
        else:
            out.append(ch)
    inert = _AUTOLINK.sub(lambda m: "\\:" if m.group(1) else m.group(2) + "\\.", "".join(out))
    return _EMAIL_AT.sub(MD_SPLIT + "@", inert)
