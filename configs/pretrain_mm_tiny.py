"""Early fusion on one CPU: the tiny model with a tiny vision tower, trained from the first step on
the default text corpus mixed with real images (scikit-learn's handwritten digits and its two
photos, captioned) and short videos made from them (digits crossing the frame, camera moves over
the photos)."""

from pathlib import Path

from qwen_jax.experiment import default_data_config, load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_tiny.py"))
    config.model.vision = "tiny"
    config.train.steps = 100
    config.train.eval_every = 50
    # Every field is listed, so each can be overridden (--config.data.video_sources=[...]): half
    # the rows text, 35% image-text (digits are 16 patches, photos 8, at 64*64 pixels), 15%
    # video-text (clips of 4 frames sampled at 2 fps: 2 temporal patches of 16 or 8 patches);
    # up to 256 image and 128 video patches a row; skip and count bad records.
    config.data = default_data_config()
    config.data.kind = "image_text"
    return config
