"""`qwen-jax generate --image`: images preprocessed as the run saw them, each prompt laid out as the
model was trained (a chat turn with the image's placeholder expanded, or the image block then the text),
and the same tokens as generate() on those inputs; bad input is named."""

import dataclasses
import importlib
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from qwen_jax import Qwen35ForCausalLM, generate
from qwen_jax.cli import main
from qwen_jax.config import ConfigError
from qwen_jax.data import VISION_TOKENS, ImageProcessorConfig, add_vision_tokens
from qwen_jax.data.conversations import CHATML_TEMPLATE
from qwen_jax.data.images import preprocess_image
from qwen_jax.data.mm_packing import image_placeholder_length
from qwen_jax.data.tokenizer import train_bpe_tokenizer
from qwen_jax.experiment import load_config, model_config
from qwen_jax.generate.image_prompts import image_processor_for, image_prompt_ids

PIXELS = {"min_pixels": 32 * 32, "max_pixels": 64 * 64}  # the run's data config: not Qwen3.5's defaults
PROMPT = "which digit is this"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir of a random tiny vision-language model: its run config, ChatML template, tokenizer and one
    checkpoint, plus a red image beside it -> (workdir, model, tokenizer, image file)."""
    folder = tmp_path_factory.mktemp("vl_run")
    tokenizer = train_bpe_tokenizer([PROMPT, CHATML_TEMPLATE] * 20, 400, tuple(VISION_TOKENS.values()))
    config = model_config(load_config("configs/sft_vl_tiny.py", ["model.vocab_size=400", "model.num_hidden_layers=2"]))
    config = config.replace(**add_vision_tokens(tokenizer))
    model = Qwen35ForCausalLM(config, rngs=nnx.Rngs(0))
    (folder / "config.json").write_text(json.dumps({"model": dataclasses.asdict(config), "config": {"data": PIXELS}},
                                                   default=list))
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    tokenizer.save(str(folder / "tokenizer.json"))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(folder / "checkpoints" / "1" / "state", {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    Image.new("RGB", (64, 48), (255, 0, 0)).save(folder / "red.png")
    return folder, model, tokenizer, folder / "red.png"


def expected_inputs(model, tokenizer, prompt_text, image_file, pad_token="<|image_pad|>"):
    """(ids, pixel_values, grid) of the prompt text with the image's placeholder written out in full."""
    image = preprocess_image(Image.open(image_file), ImageProcessorConfig(**PIXELS))
    length = image_placeholder_length(image.grid_thw, model.config.vision.spatial_merge_size)
    ids = tokenizer.encode(prompt_text.replace(pad_token, pad_token * length), add_special_tokens=False).ids
    assert ids.count(model.config.image_token_id) == length
    return ids, image.pixel_values, np.array([image.grid_thw])


@pytest.mark.parametrize("chat", [True, False])
def test_generate_with_an_image_matches_generate_on_the_laid_out_prompt(workdir, chat, capsys, monkeypatch):
    folder, model, tokenizer, image_file = workdir
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    if chat:  # the template's user turn: the image's placeholder, then the text
        prompt_text = f"<|im_start|>user\n{block}{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    else:  # as early-fusion pretraining lays out an image-text document
        prompt_text = block + PROMPT
    ids, pixel_values, grid = expected_inputs(model, tokenizer, prompt_text, image_file)
    calls = []

    def recorded(model, prompts, **kwargs):  # the CLI's call, passed on
        calls.append((prompts, kwargs))
        return generate(model, prompts, **kwargs)

    monkeypatch.setattr(importlib.import_module("qwen_jax.generate.engine"), "generate", recorded)
    main(["generate", f"--model={folder}", f"--prompt={PROMPT}", f"--image={image_file}", "--max-new-tokens=4"]
         + (["--chat"] if chat else []))
    [(prompts, kwargs)] = calls
    assert prompts == [ids]
    np.testing.assert_array_equal(kwargs["pixel_values"], pixel_values)
    np.testing.assert_array_equal(kwargs["image_grid_thw"], grid)
    out = generate(model, [ids], max_new_tokens=4, pixel_values=pixel_values, image_grid_thw=grid,
                   stop_ids=kwargs["stop_ids"])
    want = tokenizer.decode(np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist(), skip_special_tokens=False)
    assert want and want in capsys.readouterr().out


def test_image_preprocessing_follows_the_model(workdir, tmp_path):
    folder, *_ = workdir
    assert image_processor_for(folder) == ImageProcessorConfig(**PIXELS)
    assert image_processor_for(folder / "checkpoints" / "1") == ImageProcessorConfig(**PIXELS)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 2048, "longest_edge": 8192}, "patch_size": 16, "image_mean": [0.4, 0.5, 0.6]}))
    assert image_processor_for(tmp_path) == ImageProcessorConfig(min_pixels=2048, max_pixels=8192,
                                                                 image_mean=(0.4, 0.5, 0.6))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 0}))
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        image_processor_for(tmp_path)


def test_bad_image_input_is_named(workdir, tmp_path):
    folder, model, tokenizer, image_file = workdir
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match=r"error: --image=.*notes.png: cannot read it as an image"):
        main(["generate", f"--model={folder}", f"--prompt={PROMPT}", f"--image={tmp_path / 'notes.png'}"])
    image = preprocess_image(Image.open(image_file), ImageProcessorConfig(**PIXELS))
    with pytest.raises(ConfigError, match="--image needs a model with a vision tower"):
        image_prompt_ids(tokenizer, model.config.replace(vision=None), [PROMPT], [image], chat=False)
