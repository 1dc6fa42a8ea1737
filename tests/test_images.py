"""Image preprocessing: resize sizes, patch order, values and errors; HF's processor as oracle."""

import numpy as np
import pytest
from PIL import Image

from qwen_jax.data.images import (
    ImageError,
    ImageProcessorConfig,
    image_placeholder_length,
    preprocess_image,
    smart_resize,
)

QWEN35 = ImageProcessorConfig()
TINY = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64)  # a demo model's budget


def normalised(value):
    """What a uint8 channel value becomes with mean = std = 0.5, in HF's float32 arithmetic."""
    return (np.float32(value * (1 / 255)) - np.float32(0.5)) / np.float32(0.5)


def hf_pil_processor(config):
    """HF's PIL ("slow") Qwen2-VL processor with `config`'s Qwen3.5 settings, or skip the test."""
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return module.Qwen2VLImageProcessorPil(
        patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
        merge_size=config.merge_size, image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels})


@pytest.mark.parametrize("height, width, budget, expected", [
    (256, 256, {}, (256, 256)),  # already a multiple of 32 and within budget
    (1080, 1920, {}, (1088, 1920)),  # 33.75 rounds to 34 multiples of 32
    (100, 150, {}, (224, 320)),  # below 65,536 pixels: scaled up by sqrt(65536/15000), ceil
    (48, 80, {}, (224, 352)),
    (8000, 6000, {}, (4704, 3520)),  # above 16,777,216 pixels: scaled down, floor
    (1, 200, {}, (32, 3648)),  # exactly 200:1 is still allowed
    (480, 640, {"min_pixels": 32 * 32, "max_pixels": 64 * 64}, (32, 64)),
    (8000, 6000, {"min_pixels": 32 * 32, "max_pixels": 64 * 64}, (64, 32)),
    # Python's round sends halves to the even multiple: 1.5 -> 2 and 2.5 -> 2; 3.5 -> 4, 4.5 -> 4.
    (48, 80, {"min_pixels": 32 * 32}, (64, 64)),
    (112, 144, {"min_pixels": 32 * 32}, (128, 128)),
])
def test_smart_resize_literal_sizes(height, width, budget, expected):
    assert smart_resize(height, width, **budget) == expected


def test_smart_resize_matches_hf_over_a_grid_of_sizes():
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    sides = [1, 7, 16, 31, 48, 100, 333, 1080, 4000, 9999]
    for config in (QWEN35, TINY):
        budget = {"factor": config.factor, "min_pixels": config.min_pixels,
                  "max_pixels": config.max_pixels}
        for height in sides:
            for width in sides:
                if max(height, width) / min(height, width) > 200:
                    with pytest.raises(ImageError, match="longer than 200:1"):
                        smart_resize(height, width, **budget)
                    with pytest.raises(ValueError):
                        module.smart_resize(height, width, **budget)
                else:
                    assert (smart_resize(height, width, **budget)
                            == module.smart_resize(height, width, **budget)), (height, width)


def test_constant_colour_gives_constant_rows_even_after_resizing():
    image = np.empty((48, 80, 3), np.uint8)
    image[...] = (255, 0, 128)
    pixel_values, grid_thw = preprocess_image(image, TINY)  # resized to 64x64
    assert grid_thw == (1, 4, 4) and pixel_values.shape == (16, 1536)
    assert pixel_values.dtype == np.float32
    # A row is (channel, frame, y, x): 512 values per channel.
    np.testing.assert_array_equal(pixel_values[:, :512], 1.0)
    np.testing.assert_array_equal(pixel_values[:, 512:1024], -1.0)
    np.testing.assert_array_equal(pixel_values[:, 1024:], normalised(128))
    assert normalised(128) == pytest.approx(0.0039216, abs=1e-7)


def gradient_image():
    """64x64: red = 4*y, green = 4*x, blue = 7, so every pixel's value says where it was."""
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([4 * y, 4 * x, np.full_like(y, 7)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("y, x, row, column", [
    (0, 0, 0, 0),
    # y=17: patch row 1 = block row 0, row 1 in the block; x=35: patch col 2 = block col 1, col 0
    # in the block. Block 1 (of 2 per block row) starts at row 4; + 2*1 + 0 = row 6.
    # Within the patch: y % 16 = 1, x % 16 = 3 -> 16 + 3.
    (17, 35, 6, 19),
    # y=40: block row 1, in-block row 0; x=20: block col 0, in-block col 1 -> 4 * 2 + 0 + 1 = 9.
    (40, 20, 9, 8 * 16 + 4),
    (63, 63, 15, 255),  # the last pixel is the last value of the last patch's frame 0
])
def test_patch_order_by_hand(y, x, row, column):
    pixel_values, grid_thw = preprocess_image(gradient_image(), TINY)  # 64x64: no resize
    assert grid_thw == (1, 4, 4)
    red, green, blue = normalised(4 * y), normalised(4 * x), normalised(7)
    for frame in (0, 1):  # the still image is repeated: both frames carry the same pixel
        offset = column + 256 * frame
        assert pixel_values[row, offset] == red
        assert pixel_values[row, 512 + offset] == green
        assert pixel_values[row, 1024 + offset] == blue


def test_patch_order_formula_for_every_pixel():
    # The spec's order written as index arithmetic (no reshape), checked at all 64*64*3*2 places.
    image = gradient_image()
    pixel_values, _ = preprocess_image(image, TINY)
    y, x, channel, frame = np.meshgrid(np.arange(64), np.arange(64), np.arange(3), np.arange(2),
                                       indexing="ij")
    patch_row, patch_col = y // 16, x // 16
    blocks_per_row = 64 // 32
    block = patch_row // 2 * blocks_per_row + patch_col // 2
    row = (block * 2 + patch_row % 2) * 2 + patch_col % 2
    column = ((channel * 2 + frame) * 16 + y % 16) * 16 + x % 16
    np.testing.assert_array_equal(pixel_values[row, column], normalised(image[y, x, channel]))


@pytest.mark.parametrize("config", [QWEN35, TINY], ids=["qwen3.5", "tiny"])
@pytest.mark.parametrize("shape", [(100, 150), (256, 256), (300, 77), (37, 500)])
def test_matches_hf_pil_processor(config, shape):
    processor = hf_pil_processor(config)
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = processor(images=image, return_tensors="np")
    pixel_values, grid_thw = preprocess_image(image, config)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"][0])
    np.testing.assert_array_equal(pixel_values, expected["pixel_values"])  # bit-identical


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_matches_hf_for_grey_transparent_and_palette_images(mode):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert(mode)  # RGBA keeps random alpha: composited onto white, as HF does
    expected = hf_pil_processor(QWEN35)(images=image, return_tensors="np")
    np.testing.assert_array_equal(preprocess_image(image).pixel_values, expected["pixel_values"])


def test_grey_array_is_the_grey_repeated_in_three_channels():
    grey = np.random.default_rng(1).integers(0, 256, (40, 50), dtype=np.uint8)
    as_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(preprocess_image(grey, TINY).pixel_values,
                                  preprocess_image(as_rgb, TINY).pixel_values)


@pytest.mark.parametrize("image, reason, message", [
    (np.zeros((32, 32, 2), np.uint8), "bad_channels", r"cat\.png: .*got shape \(32, 32, 2\)"),
    (np.zeros((32, 32, 3), np.float32), "bad_dtype", r"cat\.png: expected uint8 pixels, got "
                                                     "float32"),
    (np.zeros((0, 32, 3), np.uint8), "image_too_small", r"cat\.png: a 0x32 image has no pixels"),
    (np.zeros((2, 500, 3), np.uint8), "extreme_aspect_ratio", r"cat\.png: a 2x500 image is longer"),
    (Image.new("La", (32, 32)), "unsupported_mode", r"cat\.png: mode La"),
])
def test_errors_name_the_image_and_the_problem(image, reason, message):
    with pytest.raises(ImageError, match=message) as caught:
        preprocess_image(image, TINY, name="cat.png")
    assert caught.value.reason == reason


def test_config_rejects_a_budget_upside_down():
    with pytest.raises(ValueError, match=r"max_pixels \(4096\) is below min_pixels \(5000\)"):
        ImageProcessorConfig(min_pixels=5000, max_pixels=4096)
    with pytest.raises(ValueError, match="merge_size must be >= 1"):
        ImageProcessorConfig(merge_size=0)


def test_placeholder_length_is_one_token_per_merge_block():
    assert image_placeholder_length((1, 4, 6)) == 6
    assert image_placeholder_length((1, 14, 20)) == 70
    assert image_placeholder_length((2, 8, 8)) == 32  # a clip of 4 frames: 2 temporal patches
    assert image_placeholder_length((1, 6, 6), merge=3) == 4
    _, grid_thw = preprocess_image(np.zeros((100, 150, 3), np.uint8))
    assert image_placeholder_length(grid_thw) == 14 * 20 // 4
    with pytest.raises(ValueError, match=r"\(1, 3, 4\) does not tile into 2x2"):
        image_placeholder_length((1, 3, 4))
