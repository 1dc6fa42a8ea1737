"""How many held-out digit images a `configs/sft_vl_tiny.py` run names right: each held-out
`digits_chat` conversation's question (image, "Which digit is this?") as a prompt of the run's chat
template, laid out as `qwen-jax generate --image --chat` lays it out, answered greedily, the first
digit of the answer compared with the label.

    python experiments/sft_vl_tiny/answer_digits.py runs/sft_vl
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from qwen_jax.data.chat import load_chat_template, render_chat
from qwen_jax.data.mm_chat import media_chat_records
from qwen_jax.data.mm_streaming import media_held_out
from qwen_jax.generate.engine import generate
from qwen_jax.generate.media_prompts import media_processors_for, media_prompt_ids
from qwen_jax.generate.loading import load_for_generation


def main(workdir: Path) -> None:
    model, tokenizer, stop_ids = load_for_generation(workdir)
    template, special_tokens = load_chat_template(workdir, "answer_digits.py")
    records = media_chat_records(["digits_chat"], *media_processors_for(workdir))  # the run's own preprocessing
    prompts, pixels, grids, labels = [], [], [], []
    for index in range(len(records)):
        where, record, _ = records[index]
        if not media_held_out(where, record):
            continue
        question, answer = record.conversation["messages"][:2]
        text = render_chat(template, [question], add_generation_prompt=True, special_tokens=special_tokens)
        prompts += media_prompt_ids(tokenizer, model.config, [text], list(record.media), chat=True)
        pixels.append(record.media[0].pixel_values)
        grids.append(record.media[0].grid_thw)
        labels.append(re.search(r"\d", answer["content"]).group())
    out = generate(model, prompts, max_new_tokens=12, temperature=0.0, stop_ids=stop_ids, pad_id=0,
                   pixel_values=np.concatenate(pixels), image_grid_thw=np.array(grids))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    answers = [tokenizer.decode(tokens[row, :lengths[row]].tolist()) for row in range(len(prompts))]
    named = [re.search(r"\d", answer) for answer in answers]
    right = sum(found is not None and found.group() == label for found, label in zip(named, labels))
    print(f"{right} of {len(prompts)} held-out digits named right; first answers: {answers[:3]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
