"""The command line: info, convert both ways, bench forward."""

import numpy as np
from flax import nnx

import qwen_jax
from qwen_jax.cli import main


def test_info_prints_param_count(capsys):
    main(["info", "--preset=qwen3.5-0.8b"])
    assert "752,393,024" in capsys.readouterr().out


def test_info_with_config_overrides(capsys):
    main(["info", "--config=configs/pretrain_tiny.py", "--config.model.num_hidden_layers", "8"])
    assert "x 2 + []" in capsys.readouterr().out


def test_convert_round_trip(tmp_path):
    model = qwen_jax.Qwen35ForCausalLM(qwen_jax.preset("tiny", vocab_size=64), rngs=nnx.Rngs(1))
    qwen_jax.save_hf(model, tmp_path / "hf")
    files = {"tokenizer.json": '{"version": "1.0"}', "generation_config.json": '{"eos_token_id": [2, 0]}'}
    for name, text in files.items():
        (tmp_path / "hf" / name).write_text(text)
    main(["convert", f"--from-hf={tmp_path / 'hf'}", f"--to={tmp_path / 'native'}"])
    main(["convert", "--from", str(tmp_path / "native"), "--to-hf", str(tmp_path / "hf2")])
    ids = np.arange(20)[None] % 64
    expected = np.asarray(model(ids).logits)
    np.testing.assert_array_equal(np.asarray(qwen_jax.load_hf(tmp_path / "hf2")(ids).logits), expected)
    for name, text in files.items():  # the tokenizer travels both ways (init_from and generate read it)
        assert (tmp_path / "native" / name).read_text() == (tmp_path / "hf2" / name).read_text() == text


def test_bench_forward_prints_shapes(capsys):
    main(["bench", "forward", "--preset=tiny", "--batch=1", "--seq-len=16", "--steps=1"])
    assert "logits (1, 16, 4096)" in capsys.readouterr().out
