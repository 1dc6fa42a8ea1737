"""`qwen-jax <command>`: train, rl, generate, compile, info, convert, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate '--config.a.b=v' (or '--config.a.b v') overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[len("--config."):])
            elif i + 1 < len(argv):
                overrides.append(f"{arg[len('--config.'):]}={argv[i + 1]}")
                i += 1
            else:
                raise SystemExit(f"error: {arg} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _model_config(args, overrides):
    from qwen_jax.config import preset
    from qwen_jax.experiment import load_config, model_config

    if args.config:
        return model_config(load_config(args.config, overrides))
    if overrides:
        raise SystemExit("error: --config.* overrides need --config=FILE")
    return preset(args.preset)


def cmd_train(args, overrides) -> None:
    """Train (or resume) per --config in --workdir."""
    from qwen_jax.experiment import load_config
    from qwen_jax.train.loop import run_training

    config = load_config(args.config, overrides)
    rows = run_training(config, args.workdir)
    if rows:
        last = rows[-1]
        held_out = f", held-out loss {last['eval/loss']:.3f}" if "eval/loss" in last else ""
        print(f"step {last['step']}: loss {last['learning/loss']:.3f}{held_out}; "
              f"curve in {args.workdir}/loss.png")


def cmd_rl(args, overrides) -> None:
    """RL-train (or resume) per --config in --workdir."""
    from qwen_jax.experiment import load_config
    from qwen_jax.rl.loop import run_rl

    rows = run_rl(load_config(args.config, overrides), args.workdir)
    if rows:
        first, last = rows[0], rows[-1]
        accuracy = [f"{name} {row[key]:.3f}" for name, row, key in (
            ("held-out accuracy before RL", first, "eval/accuracy_before_rl"),
            ("after", last, "eval/accuracy")) if key in row]
        print(f"step {last['step']}: mean reward {last['rewards/mean']:.3f}"
              f"{'; ' + ', '.join(accuracy) if accuracy else ''}; curve in {args.workdir}/reward.png")


def cmd_compile(args, overrides) -> None:
    """Compile the train step for a TPU topology on this host and print its per-device memory."""
    from qwen_jax.experiment import load_config
    from qwen_jax.train.compile_check import compile_train_step

    report = compile_train_step(load_config(args.config, overrides), args.topology)
    print(report.table())


def cmd_info(args, overrides) -> None:
    """Print a model config and its total and active parameter counts (computed from shapes only)."""
    import dataclasses

    from qwen_jax.model.counts import adapter_count, parameter_counts
    from qwen_jax.model.decoder import layer_groups

    config = _model_config(args, overrides)
    total, active = parameter_counts(config)
    for field in dataclasses.fields(config):
        if field.name != "layer_types":
            print(f"{field.name:28s} {getattr(config, field.name)}")
    pattern, repeats, tail = layer_groups(config.layer_types)
    print(f"{'layers':28s} {list(pattern)} x {repeats} + {list(tail)}")
    print(f"{'parameters':28s} {total:,}")
    print(f"{'active parameters':28s} {active:,}")
    if config.lora_rank:
        print(f"{'of which LoRA adapters':28s} {adapter_count(config):,}")


def cmd_convert(args, overrides) -> None:
    """A model -> another layout. From an HF directory (--from-hf), or a qwen-jax model directory, workdir or
    checkpoint step (--from; a LoRA run's adapters merged into its base), with --adapter's PEFT adapter merged
    in where given; to a qwen-jax model directory (--to), an HF directory (--to-hf), or a LoRA run's adapters
    alone as a PEFT adapter (--to-peft)."""
    from qwen_jax.generate.loading import load_run_model
    from qwen_jax.interop.hf import load_hf, save_hf
    from qwen_jax.interop.native import load_model, save_model
    from qwen_jax.interop.peft import save_peft, with_adapter

    source = args.from_hf or getattr(args, "from")
    destinations = [(path, save) for path, save in ((args.to, save_model), (args.to_hf, save_hf),
                                                      (args.to_peft, save_peft)) if path]
    if not source or len(destinations) != 1 or (args.from_hf and getattr(args, "from")):
        raise SystemExit("error: give one source (--from-hf=DIR, or --from=DIR|WORKDIR|STEP) and one destination "
                         "(--to=DIR, --to-hf=DIR or --to-peft=DIR); --adapter=PEFT_DIR merges an adapter in")
    if args.adapter and args.to_peft:
        raise SystemExit("error: --to-peft writes a LoRA run's own adapters; --adapter merges another one in")
    run = (Path(source) / "checkpoints").is_dir() or (Path(source) / "state").is_dir()
    if args.from_hf:
        model = load_hf(source, dtype=args.dtype)
    else:
        model = load_run_model(source, merge=not args.to_peft) if run else load_model(source)
    if args.adapter:
        model = with_adapter(model, args.adapter)
    (path, save), = destinations
    save(model, path)
    print(f"converted {source}{' + ' + args.adapter if args.adapter else ''} -> {path}")


def cmd_bench(args, overrides) -> None:
    """`bench forward`: time a jitted forward pass of a random-weight model on this machine."""
    import jax
    import numpy as np
    from flax import nnx

    from qwen_jax.model.decoder import Qwen35ForCausalLM

    if args.what != "forward":
        raise SystemExit(f"error: unknown benchmark {args.what!r}; known: forward "
                         "(kernel and model benchmarks live in experiments/benchmarks/)")
    config = _model_config(args, overrides)
    model = Qwen35ForCausalLM(config, rngs=nnx.Rngs(args.seed))
    ids = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len))
    forward = nnx.jit(lambda m, x: m(x).logits)
    start = time.perf_counter()
    jax.block_until_ready(forward(model, ids))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        logits = jax.block_until_ready(forward(model, ids))
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    print(f"device      {jax.devices()[0].device_kind} x {jax.device_count()}")
    print(f"input_ids   {tuple(ids.shape)}  ->  logits {tuple(logits.shape)} {logits.dtype}")
    print(f"compile     {compile_s:.2f} s (first call)")
    print(f"forward     {median * 1e3:.1f} ms median of {args.steps}  "
          f"({args.batch * args.seq_len / median:,.0f} tokens/s)")


def cmd_generate(args, overrides) -> None:
    """Sample continuations of --prompt (or every line of --prompts-file) and print their text."""
    from pathlib import Path

    import numpy as np

    from qwen_jax.data.chat import user_turns
    from qwen_jax.generate.engine import generate
    from qwen_jax.generate.media_prompts import (load_prompt_media, media_processors_for, media_prompt_ids,
                                                 pixel_inputs)
    from qwen_jax.generate.loading import load_for_generation, with_weight_quant
    from qwen_jax.interop.peft import with_adapter

    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line]
    if not prompts:
        raise SystemExit("error: give --prompt=TEXT or --prompts-file=FILE")
    try:
        chat_kwargs = json.loads(args.chat_kwargs)
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: --chat-kwargs={args.chat_kwargs!r} is not JSON: {error}") from None
    if not isinstance(chat_kwargs, dict):
        raise SystemExit(f"error: --chat-kwargs={args.chat_kwargs!r} is not a JSON object")
    model, tokenizer, stop_ids = load_for_generation(args.model)
    if args.adapter:
        model = with_adapter(model, args.adapter)
    model = with_weight_quant(model, args.weight_quant)
    media = []
    if args.images or args.videos:
        media = load_prompt_media(args.images, args.videos, media_processors_for(args.model))
    kinds = ["image"] * len(args.images) + ["video"] * len(args.videos)
    texts = user_turns(args.model, prompts, media=kinds, **chat_kwargs) if args.chat else prompts
    if media:
        ids = media_prompt_ids(tokenizer, model.config, texts, media, chat=args.chat)
        pixels = pixel_inputs(media, len(prompts))
    else:
        ids, pixels = [tokenizer.encode(text).ids for text in texts], {}
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seeds=[args.seed + i for i in range(len(prompts))], stop_ids=stop_ids, **pixels)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            print(f"=== prompt {i}: {prompt}")
        print(tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="pretrain or fine-tune; resumes from WORKDIR's checkpoints")
    train.add_argument("--config", required=True)
    train.add_argument("--workdir", required=True)
    train.set_defaults(run=cmd_train)

    rl = commands.add_parser("rl", help="RL fine-tuning against parallel environments; resumes")
    rl.add_argument("--config", required=True)
    rl.add_argument("--workdir", required=True)
    rl.set_defaults(run=cmd_rl)

    compile_ = commands.add_parser("compile", help="compile the train step for a TPU topology (libtpu)")
    compile_.add_argument("--config", required=True)
    compile_.add_argument("--topology", default="v5p:2x2x1")
    compile_.set_defaults(run=cmd_compile)

    gen = commands.add_parser("generate", help="sample from an HF directory or a qwen-jax workdir")
    gen.add_argument("--model", required=True)
    gen.add_argument("--prompt", default=None)
    gen.add_argument("--prompts-file", dest="prompts_file", default=None)
    gen.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    gen.add_argument("--top-k", dest="top_k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true",
                     help="each prompt as a user turn of the model's chat template")
    gen.add_argument("--chat-kwargs", dest="chat_kwargs", default="{}",
                     help='JSON for the chat template, e.g. {"enable_thinking": false}')
    gen.add_argument("--image", dest="images", action="append", default=[], metavar="FILE",
                     help="an image every prompt sees before its text (repeat for more); needs a vision tower")
    gen.add_argument("--video", dest="videos", action="append", default=[], metavar="FILE",
                     help="a video file or folder of frames every prompt sees after the images (repeatable)")
    gen.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter of --model, merged into it")
    gen.add_argument("--weight-quant", dest="weight_quant", default="", choices=["", "int8"],
                     help="decode with the projections' kernels int8 (half a bfloat16 model's weight bytes)")
    gen.set_defaults(run=cmd_generate)

    info = commands.add_parser("info", help="print a preset's or config's model and parameter count")
    info.add_argument("--preset", default="tiny")
    info.add_argument("--config", default=None)
    info.set_defaults(run=cmd_info)

    convert = commands.add_parser("convert", help="HF <-> qwen-jax model directory; a workdir -> HF or PEFT")
    convert.add_argument("--from-hf", dest="from_hf")
    convert.add_argument("--to")
    convert.add_argument("--from", dest="from")
    convert.add_argument("--to-hf", dest="to_hf")
    convert.add_argument("--to-peft", dest="to_peft", help="a LoRA run's adapters, as a PEFT adapter directory")
    convert.add_argument("--adapter", help="a PEFT LoRA adapter directory to merge into the model")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                         help="what an HF source's weights load as")
    convert.set_defaults(run=cmd_convert)

    bench = commands.add_parser("bench", help="quick benchmarks on this machine")
    bench.add_argument("what", help="forward")
    bench.add_argument("--preset", default="tiny")
    bench.add_argument("--config", default=None)
    bench.add_argument("--batch", type=int, default=4)
    bench.add_argument("--seq-len", type=int, default=256)
    bench.add_argument("--steps", type=int, default=5)
    bench.add_argument("--seed", type=int, default=0)
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    from qwen_jax.config import ConfigError
    from qwen_jax.interop.hf import CheckpointError
    from qwen_jax.train.loop import TrainingError

    argv, overrides = _split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        args.run(args, overrides)
    except (ConfigError, CheckpointError, FileNotFoundError, TrainingError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
