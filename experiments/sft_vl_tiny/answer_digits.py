"""How many held-out digit images a `configs/sft_vl_tiny.py` run names right: each held-out
`digits_chat` conversation's question (image, "Which digit is this?") as a ChatML prompt, answered
greedily, the first digit of the answer compared with the label.

    python experiments/sft_vl_tiny/answer_digits.py runs/sft_vl
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import ml_collections
import numpy as np

from qwen_jax.data import ImageProcessorConfig, VideoProcessorConfig
from qwen_jax.data.conversations import CHATML_TEMPLATE, ChatRenderer
from qwen_jax.data.mm_chat import MediaConversation, TokenizeMediaConversation, media_chat_records
from qwen_jax.data.mm_pipeline import row_budget
from qwen_jax.data.mm_streaming import media_held_out
from qwen_jax.generate.engine import generate
from qwen_jax.generate.loading import load_for_generation
from qwen_jax.train.datasets import data_config


def main(workdir: Path) -> None:
    model, tokenizer, stop_ids = load_for_generation(workdir)
    config = model.config
    # The run's own image processing and row budget (its resolved config), and its ChatML template.
    resolved = json.loads((workdir / "config.json").read_text())
    data = data_config(ml_collections.ConfigDict(resolved["config"]))
    images = ImageProcessorConfig(min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    records = media_chat_records(["digits_chat"], images, VideoProcessorConfig(min_pixels=data.min_pixels))
    budget = row_budget(config, resolved["train"]["seq_len"], data.max_patches)
    tokenize = TokenizeMediaConversation(tokenizer, ChatRenderer(CHATML_TEMPLATE), config, budget)
    generation_prompt = tokenizer.encode("<|im_start|>assistant\n").ids
    prompts, pixels, grids, labels = [], [], [], []
    for index in range(len(records)):
        where, record, _ = records[index]
        if not media_held_out(where, record):
            continue
        question = MediaConversation({"messages": record.conversation["messages"][:1], "tools": None}, record.media)
        prompts.append(tokenize(question).ids.tolist() + generation_prompt)
        pixels.append(record.media[0].pixel_values)
        grids.append(record.media[0].grid_thw)
        labels.append(re.search(r"\d", record.conversation["messages"][1]["content"]).group())
    out = generate(model, prompts, max_new_tokens=12, temperature=0.0, stop_ids=stop_ids, pad_id=0,
                   pixel_values=np.concatenate(pixels), image_grid_thw=np.array(grids))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    answers = [tokenizer.decode(tokens[row, :lengths[row]].tolist()) for row in range(len(prompts))]
    named = [re.search(r"\d", answer) for answer in answers]
    right = sum(found is not None and found.group() == label for found, label in zip(named, labels))
    print(f"{right} of {len(prompts)} held-out digits named right; first answers: {answers[:3]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
