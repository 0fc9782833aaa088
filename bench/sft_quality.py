"""Does `minima sft` teach the tiny model to answer its chat questions? The tiny world end to end:
its pre-trained teacher (never shown a conversation) is tuned on `data/chat_train.jsonl` with
the loss on assistant tokens only, then both models answer the held-out `data/chat_eval.jsonl`
questions through the chat template, greedily, scored by exact match (`minima eval
--task gen:data/chat_eval.jsonl:match=exact`), overall and per category. Finally the tuned
checkpoint is reloaded in a fresh interpreter with nothing but transformers and answers a few
eval questions through `apply_chat_template` + `generate` (stopping at <|im_end|>).

Two runs over the same epochs: one example per row (`--batch-size` rows a step) and packed
(whole examples in `--seq-len` rows, never attending to each other), with as many rows a step
as hold about the same number of examples, so both take about the same optimizer steps.

Run from the repository root (about 5 minutes on a 2-core CPU, 1 more to build the world):

    .venv/bin/python bench/sft_quality.py
    .venv/bin/python bench/sft_quality.py --world /tmp/world --epochs 10 --lr 2e-3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minima_cli.data.chat import chat_template_of
from minima_cli.model.checkpoint import load_tokenizer, resolve_model  # noqa: E402
from minima_cli.stages.configs import EvalConfig, SftConfig
from minima_cli.stages.evaluate import run_eval
from minima_cli.stages.sft import prepare_chat, run_sft
from minima_cli.stages.tiny import build_tiny_world  # noqa: E402

PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
for line in open(sys.argv[2]).readlines()[:int(sys.argv[3])]:
    messages = json.loads(line)["messages"]
    inputs = tok.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stopped = new[-1] in model.generation_config.eos_token_id
    print(json.dumps({"question": messages[-2]["content"], "reference": messages[-1]["content"],
                      "answer": tok.decode(new, skip_special_tokens=True), "stopped": stopped}))
"""


def accuracy_by_category(eval_dir: Path, model_index: int, eval_file: Path) -> dict[str, float]:
    generations = sorted((eval_dir / "generations").glob(f"{model_index}-*.jsonl"))[0]
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    categories = [json.loads(line)["category"] for line in eval_file.read_text().splitlines()]
    right, total = Counter(), Counter()
    for row, category in zip(rows, categories, strict=True):
        total[category] += 1
        right[category] += bool(row["correct"])
    return {c: right[c] / total[c] for c in sorted(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, help="an existing `minima tiny` output (else one "
                        "is built with the defaults)")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ask", type=int, default=4, help="questions for the plain reload")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, above all on a busy box
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    world = args.world
    if world is None:
        world = work / "world"
        world.mkdir()
        started = time.perf_counter()
        build_tiny_world(world)
        print(f"tiny world built in {time.perf_counter() - started:.0f}s -> {world}")
    train, held_out = world / "data" / "chat_train.jsonl", world / "data" / "chat_eval.jsonl"
    tokenizer = load_tokenizer(resolve_model(world / "teacher"))
    packed = prepare_chat(str(train), tokenizer, chat_template_of(tokenizer)[0],
                          SftConfig(seq_len=args.seq_len, packing=True))
    per_row = packed.summary["train_examples"] / len(packed.train_rows)
    runs = {"unpacked": (False, args.batch_size),
            "packed": (True, max(1, round(args.batch_size / per_row)))}
    tuned = {}
    for name, (packing, batch_size) in runs.items():
        config = SftConfig(seq_len=args.seq_len, batch_size=batch_size, lr=args.lr,
                           epochs=args.epochs, packing=packing, eval_every=50, save_every=10**6,
                           precision="fp32", tensorboard=False)
        manifest = run_sft(model_path=str(world / "teacher"), data=str(train),
                           output=work / name, config=config, progress=False)
        tuned[name] = manifest
        metrics, data = manifest["metrics"], manifest["inputs"]["data"]
        print(f"sft {name}: {data['train_examples']} conversations in {data['train_rows']} rows, "
              f"{config.batch_size} rows a step, {metrics['steps']} steps, "
              f"{manifest['wall_time_s']:.0f}s "
              f"({metrics['tokens_per_s']:,.0f} tok/s), valid loss {metrics['valid_loss']:.3f} "
              "per assistant token")
    models = [f"teacher={world / 'teacher'}", *(f"sft-{n}={work / n}" for n in tuned)]
    results = run_eval(models=models, tasks=[f"gen:{held_out}:match=exact"],
                       config=EvalConfig(max_length=args.seq_len), output=work / "eval",
                       progress=False)
    print(f"\nexact match on {held_out.name} (greedy, through the chat template):")
    for index, model in enumerate(results["models"]):
        overall = model["tasks"]["gen:chat_eval"]["exact_match"]
        parts = accuracy_by_category(work / "eval", index, held_out)
        detail = ", ".join(f"{c} {v:.2f}" for c, v in parts.items())
        print(f"  {model['name']:<14} {overall:.2f}   ({detail})")
    print("\nplain transformers, fresh interpreter, sft-unpacked:")
    answers = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(work / "unpacked"),
                              str(held_out), str(args.ask)],
                             capture_output=True, text=True, check=True).stdout
    for line in answers.splitlines():
        row = json.loads(line)
        print(f"  {row['question']!r} -> {row['answer']!r} (reference {row['reference']!r}, "
              f"stopped at end of turn: {row['stopped']})")
    print(f"\noutputs in {work}")


if __name__ == "__main__":
    main()
