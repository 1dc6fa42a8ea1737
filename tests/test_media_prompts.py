"""`qwen-jax generate --image / --video`: media preprocessed as the run saw them, each prompt laid out as
the model was trained (a chat turn with the placeholders expanded, or the blocks then the text), and the
same tokens as generate() on those inputs; bad input is named."""

import dataclasses
import importlib
import json

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from qwen_jax import Qwen35ForCausalLM, generate
from qwen_jax.cli import main
from qwen_jax.config import ConfigError
from qwen_jax.data import VISION_TOKENS, ImageProcessorConfig, VideoProcessorConfig, add_vision_tokens
from qwen_jax.data.conversations import CHATML_TEMPLATE
from qwen_jax.data.images import preprocess_image
from qwen_jax.data.mm_packing import image_placeholder_length, visual_ids
from qwen_jax.data.tokenizer import train_bpe_tokenizer
from qwen_jax.experiment import load_config, model_config
from qwen_jax.data.videos import load_video
from qwen_jax.generate.media_prompts import media_processors_for, media_prompt_ids
from qwen_jax.train.datasets import data_config, media_processors

PIXELS = {"min_pixels": 32 * 32, "max_pixels": 64 * 64}  # the run's data config: not Qwen3.5's defaults
VIDEO = {"video_max_pixels": 4 * 64 * 64, "max_frames": 4}
BLOCKS = {kind: f"<|vision_start|><|{kind}_pad|><|vision_end|>" for kind in ("image", "video")}
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
    (folder / "config.json").write_text(json.dumps(
        {"model": dataclasses.asdict(config), "config": {"data": PIXELS | VIDEO}}, default=list))
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    tokenizer.save(str(folder / "tokenizer.json"))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(folder / "checkpoints" / "1" / "state",
                          {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    Image.new("RGB", (64, 48), (255, 0, 0)).save(folder / "red.png")
    (folder / "clip").mkdir()
    for frame in range(6):  # a bar moving right: a folder of frames is a video
        pixels = np.zeros((48, 64, 3), np.uint8)
        pixels[:, 8 * frame: 8 * frame + 8] = 255
        Image.fromarray(pixels).save(folder / "clip" / f"{frame:02d}.png")
    return folder, model, tokenizer, folder / "red.png"


def expected_inputs(model, tokenizer, prompt_text, image_file, pad_token="<|image_pad|>"):
    """(ids, pixel_values, grid) of the prompt text with the image's placeholder written out in full."""
    image = preprocess_image(Image.open(image_file), ImageProcessorConfig(**PIXELS))
    length = image_placeholder_length(image.grid_thw, model.config.vision.spatial_merge_size)
    ids = tokenizer.encode(prompt_text.replace(pad_token, pad_token * length), add_special_tokens=False).ids
    assert ids.count(model.config.image_token_id) == length
    return ids, image.pixel_values, np.array([image.grid_thw])


@pytest.fixture
def calls(monkeypatch):
    """The CLI's calls of generate() as (prompts, kwargs), each passed on."""
    made = []

    def recorded(model, prompts, **kwargs):
        made.append((prompts, kwargs))
        return generate(model, prompts, **kwargs)

    monkeypatch.setattr(importlib.import_module("qwen_jax.generate.engine"), "generate", recorded)
    return made


@pytest.mark.parametrize("chat", [True, False])
def test_generate_with_an_image_matches_generate_on_the_laid_out_prompt(workdir, chat, capsys, calls):
    folder, model, tokenizer, image_file = workdir
    block = BLOCKS["image"]
    if chat:  # the template's user turn: the image's placeholder, then the text
        prompt_text = f"<|im_start|>user\n{block}{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    else:  # as early-fusion pretraining lays out an image-text document
        prompt_text = block + PROMPT
    ids, pixel_values, grid = expected_inputs(model, tokenizer, prompt_text, image_file)
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


def test_a_chat_turn_with_an_image_and_a_video(workdir, calls):
    folder, model, tokenizer, image_file = workdir
    video_config = media_processors(data_config(ml_collections.ConfigDict({"data": PIXELS | VIDEO})))[1]
    video = load_video(folder / "clip", video_config)
    opening = f"<|im_start|>user\n{BLOCKS['image']}"
    image_ids, pixel_values, grid = expected_inputs(model, tokenizer, opening, image_file)
    rest = tokenizer.encode(f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    main(["generate", f"--model={folder}", f"--prompt={PROMPT}", f"--video={folder / 'clip'}", f"--image={image_file}",
          "--max-new-tokens=2", "--chat"])
    [(prompts, kwargs)] = calls
    assert prompts == [image_ids + visual_ids(tokenizer, video, model.config, "clip").tolist() + rest]
    assert len(video.timestamps) == 2  # 4 frames sampled, 2 per temporal patch: two timestamped blocks
    np.testing.assert_array_equal(kwargs["pixel_values"], pixel_values)
    np.testing.assert_array_equal(kwargs["pixel_values_videos"], video.pixel_values)
    np.testing.assert_array_equal(kwargs["video_grid_thw"], [video.grid_thw])


def test_preprocessing_follows_the_model(workdir, tmp_path):
    folder, *_ = workdir
    expected = media_processors(data_config(ml_collections.ConfigDict({"data": PIXELS | VIDEO})))
    assert expected[0] == ImageProcessorConfig(**PIXELS) and expected[1].max_frames == 4
    assert media_processors_for(folder) == expected
    assert media_processors_for(folder / "checkpoints" / "1") == expected
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 2048, "longest_edge": 8192}, "patch_size": 16, "image_mean": [0.4, 0.5, 0.6]}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"fps": 1.0, "max_frames": 16}))
    assert media_processors_for(tmp_path) == (ImageProcessorConfig(min_pixels=2048, max_pixels=8192,
                                                                   image_mean=(0.4, 0.5, 0.6)),
                                              VideoProcessorConfig(fps=1.0, max_frames=16))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"fps": 0}))
    with pytest.raises(ConfigError, match="video_preprocessor_config.json: fps must be positive"):
        media_processors_for(tmp_path)


def test_bad_media_input_is_named(workdir, tmp_path):
    folder, model, tokenizer, image_file = workdir
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match=r"error: --image=.*notes.png: cannot read it as an image"):
        main(["generate", f"--model={folder}", f"--prompt={PROMPT}", f"--image={tmp_path / 'notes.png'}"])
    with pytest.raises(SystemExit, match=r"error: --video=.*gone.mp4: "):
        main(["generate", f"--model={folder}", f"--prompt={PROMPT}", f"--video={tmp_path / 'gone.mp4'}"])
    image = preprocess_image(Image.open(image_file), ImageProcessorConfig(**PIXELS))
    with pytest.raises(ConfigError, match="need a model with a vision tower"):
        media_prompt_ids(tokenizer, model.config.replace(vision=None), [PROMPT], [image], chat=False)
