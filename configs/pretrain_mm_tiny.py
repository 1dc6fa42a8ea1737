"""Early fusion on one CPU: the tiny model with a tiny vision tower, trained from the first step on
the default text corpus mixed with real images (scikit-learn's handwritten digits and its two
photos, captioned)."""

from pathlib import Path

import ml_collections

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_tiny.py"))
    config.model.vision = "tiny"
    config.train.steps = 100
    config.train.eval_every = 50
    config.data = ml_collections.ConfigDict({
        "kind": "image_text",
        "image_sources": ["digits", "photos"],  # or .jsonl / .array_record files
        "image_weight": 0.5,  # half the rows are image-text records
        # A digit is 16 patches (64x64 pixels) and a photo 8 (32x64): 4 and 2 image tokens.
        "max_patches": 256,
        "min_pixels": 32 * 32,
        "max_pixels": 64 * 64,
        "workers": 0,
        "strict": False,
    })
    return config
