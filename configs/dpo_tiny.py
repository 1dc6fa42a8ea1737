"""DPO of the tiny preset after `configs/sft_tiny.py`: each python_help question's own answer chosen over
its own words shuffled. A preference run continues a model, and that model is also DPO's frozen
reference:

    qwen-jax train --config=configs/dpo_tiny.py --workdir=runs/dpo \
        --config.init_from=runs/sft/checkpoints/150"""

from pathlib import Path

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("sft_tiny.py"))
    config.train.steps = 100
    config.train.lr = 3e-4  # a fine-tune's step: DPO's loss moves log-probs, not a fresh model
    config.train.warmup_steps = 10
    config.train.dpo_beta = 0.1
    config.train.dpo_loss = "sigmoid"  # DPO's; or "ipo", "hinge" (config.DPO_LOSSES)
    config.train.dpo_label_smoothing = 0.0  # "sigmoid": cDPO's assumed share of flipped labels
    config.train.eval_every = 25
    # Pairs: built-in "python_help" and/or .jsonl / .array_record files of {"prompt", "chosen", "rejected"}.
    config.data = {"kind": "preference", "chat_sources": ["python_help"], "chat_template": ""}
    config.init_from = ""  # required: give the SFT run's checkpoint on the command line
    config.checkpoint.every_steps = 50
    return config
