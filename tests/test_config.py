"""Config validation names the bad field; experiment configs load and take overrides."""

import pytest

from qwen_jax.config import VISION_PRESETS, ConfigError, ModelConfig, preset
from qwen_jax.experiment import load_config, model_config


@pytest.mark.parametrize("changes, field", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
    (dict(linear_num_key_heads=2, linear_num_value_heads=3), "linear_num_value_heads"),
    (dict(layer_types=("linear_attention", "mamba", "linear_attention", "full_attention")),
     "layer_types[1]"),
    (dict(layer_types=("linear_attention",)), "layer_types"),
    (dict(mrope_section=(2, 2, 2)), "mrope_section"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(dtype="float16"), "dtype"),
    (dict(gdn_scan="parallel"), "gdn_scan"),
    (dict(vision=dict(depth=0, out_hidden_size=128)), "vision.depth"),
    (dict(vision=dict(num_position_embeddings=250, out_hidden_size=128)), "vision.num_position_embeddings"),
    (dict(vision=dict(hidden_size=72, num_heads=4, out_hidden_size=128)), "vision.hidden_size"),
    (dict(vision=dict(out_hidden_size=64)), "vision.out_hidden_size"),
    (dict(vision=dict(out_hidden_size=128), image_token_id=248056), "image_token_id"),  # > vocab
])
def test_bad_model_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"model.{field}".replace("[", r"\[")):
        preset("tiny").replace(**changes)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="qwen3.5-0.8b"):
        preset("qwen9")


def test_default_layer_pattern_and_depth_override():
    config = preset("tiny", num_hidden_layers=8)
    assert config.layer_types == ("linear_attention",) * 3 + ("full_attention",) + (
        "linear_attention",) * 3 + ("full_attention",)
    assert ModelConfig(num_hidden_layers=6).layer_types[3] == "full_attention"


def test_experiment_config_overrides():
    config = load_config("configs/pretrain_tiny.py",
                         ["train.lr=1e-4", "train.steps=7", "model.num_hidden_layers=8"])
    assert config.train.lr == 1e-4 and config.train.steps == 7
    assert model_config(config).num_hidden_layers == 8
    # A section the file sets (a dict) takes a dict from the command line.
    chat = load_config("configs/sft_0_8b.py", ["data.chat_template_kwargs={'enable_thinking': True}"])
    assert dict(chat.data.chat_template_kwargs) == {"enable_thinking": True}


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "train.nope"),
    ("train.steps=fast", "train.steps"),
    ("model.heads=3", "model.heads"),
    ("train.steps", "--config.a.b=value"),
    ("seed={'a': 1}", "seed"),
])
def test_bad_override_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        model_config(load_config("configs/pretrain_tiny.py", [override]))


def test_vision_config_from_a_config_file_override():
    config = load_config("configs/pretrain_tiny.py", [
        "model.vision={'depth': 2, 'hidden_size': 64, 'intermediate_size': 128, 'num_heads': 4, "
        "'out_hidden_size': 128}", "model.image_token_id=7", "model.video_token_id=8",
        "model.vision_start_token_id=9", "model.vision_end_token_id=10"])
    vision = model_config(config).vision
    assert (vision.depth, vision.head_dim, vision.patch_dim) == (2, 16, 1536)
    # Or a tower preset by name; an unknown name lists the known ones.
    named = load_config("configs/pretrain_tiny.py", ["model.vision=tiny"])
    assert model_config(named).vision == VISION_PRESETS["tiny"]
    with pytest.raises(ConfigError, match="model.vision 'huge' is unknown; towers: .*'tiny'"):
        model_config(load_config("configs/pretrain_tiny.py", ["model.vision=huge"]))


@pytest.mark.parametrize("run", ["train", "rl"])
def test_a_bucket_url_workdir_is_refused_before_anything_is_written(run, tmp_path, monkeypatch):
    """pathlib would make gs://bucket/run a local gs:/bucket/run: the run refuses it and names the fix."""
    from qwen_jax.rl.loop import run_rl
    from qwen_jax.train.loop import run_training

    config = load_config(f"configs/{'pretrain' if run == 'train' else 'rl'}_tiny.py")
    monkeypatch.chdir(tmp_path)  # where a gs: directory would appear
    with pytest.raises(ConfigError, match=r"--workdir=gs://bucket/run is a URL.*e.g. --workdir=/gcs/bucket/run"):
        (run_training if run == "train" else run_rl)(config, "gs://bucket/run")
    assert list(tmp_path.iterdir()) == []
