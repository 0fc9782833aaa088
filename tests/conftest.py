"""Shared fixtures: tiny random LLaMA-family models (built in milliseconds) and one small trained
tiny world per test session (teacher + tokenizer + corpus) for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minima_cli.cli.app import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
# The tiny recipe at test size: a smaller world, a few steps of each training stage, and every
# eval task on its first 30 items. Checkpoints every 2 steps for the kill test.
SMALL = ["tiny.documents=400", "tiny.steps=30", "score.batches=2", "distill.max_steps=12",
         "distill.seq_len=32", "distill.batch_size=4", "distill.eval_every=4",
         "distill.save_every=2", "sft.max_steps=4", "sft.eval_every=2", "sft.save_every=2",
         "eval.limit=30"]

# model_type -> config class name and the extra config fields of that architecture
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "llama_bias": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
}


def tiny_random_model(kind: str = "llama", *, gqa: bool = True, tied: bool = True,
                      layers: int = 3, hidden: int = 32, heads: int = 4, ffn: int = 48,
                      vocab: int = 96, dtype: torch.dtype = torch.float32, seed: int = 0):
    import transformers

    class_name, extra = ARCHITECTURES[kind]
    config = getattr(transformers, class_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2 if gqa else heads,
        head_dim=hidden // heads, max_position_embeddings=128, tie_word_embeddings=tied,
        rms_norm_eps=1e-6, **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise so slicing is tested
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def save_model(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


RELOAD_AND_GENERATE = (
    "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
    "t = AutoTokenizer.from_pretrained(sys.argv[1]);"
    "ids = t(sys.argv[2], return_tensors='pt').input_ids; n = int(sys.argv[3]);"
    "out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False);"
    "assert out.shape[1] == ids.shape[1] + n;"
    "print(sum(p.numel() for p in m.parameters())); print(t.decode(out[0]))"
)


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """Run `minima ARGS` in-process: (exit code, stdout, stderr)."""
    from minima_cli.cli.app import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def kill_at_checkpoint(args: list, checkpoints: Path, step: int, timeout: float = 120) -> None:
    """Run `minima ARGS` in a child process and SIGKILL it as soon as the training checkpoint of
    `step` exists under `checkpoints` (a test of exact resume then runs it again with --resume)."""
    import signal
    import time

    command = [sys.executable, "-m", "minima_cli.cli", *map(str, args)]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (checkpoints / f"step-{step:08d}").is_dir() and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def reload_and_generate(model_dir: Path, prompt: str, new_tokens: int = 5) -> tuple[int, str]:
    """Load `model_dir` in a fresh interpreter with nothing but transformers and generate
    greedily: the contract users rely on. Returns (parameter count, decoded text)."""
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_AND_GENERATE, str(model_dir), prompt, str(new_tokens)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    params, text = result.stdout.split("\n", 1)
    return int(params), text


@pytest.fixture(scope="session", autouse=True)
def peak_cache(tmp_path_factory) -> Path:
    """Matmul peaks measured by training runs (training/flops.py) go to a per-session file,
    not to the user's ~/.cache."""
    path = tmp_path_factory.mktemp("peaks") / "matmul_peaks.json"
    os.environ["MINIMA_PEAK_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small trained tiny world (teacher/, data/), shared by the CLI tests."""
    from minima_cli.stages.tiny import build_tiny_world

    root = tmp_path_factory.mktemp("tiny_world")
    build_tiny_world(root, seed=0, gqa=True, tied=True, n_documents=400, steps=30)
    return root


@pytest.fixture(scope="module")
def pruned(tiny_world, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    teacher, data = tiny_world / "teacher", tiny_world / "data" / "train.txt"
    assert main(["score", "-m", str(teacher), "-d", str(data), "-o", str(root / "scores"),
                 "--seq-len", "64", "--batches", "2", "-q"]) == 0
    assert main(["prune", "-m", str(teacher), "-s", str(root / "scores"), "-o",
                 str(root / "pruned"), "--ratio", "0.5", "-q"]) == 0
    return root / "pruned"


def distill_args(tiny_world, student, out, steps=8):
    return ["distill", "-t", str(tiny_world / "teacher"), "-s", str(student), "-d",
            str(tiny_world / "data" / "train.txt"), "-o", str(out), "--seq-len", "32",
            "--batch-size", "4", "--max-steps", str(steps), "--save-every", "2",
            "--eval-every", "4", "--lr", "3e-3", "--precision", "fp32", "-q"]


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory) -> Path:
    """An untrained tiny world (tokenizer with ChatML tokens, random model, chat data) and a
    64-conversation slice of its chat data."""
    from minima_cli.stages.tiny import build_tiny_world

    root = tmp_path_factory.mktemp("sft_world")
    torch.manual_seed(0)
    build_tiny_world(root, n_documents=100, steps=0)
    lines = (root / "data" / "chat_train.jsonl").read_text().splitlines()
    (root / "chat.jsonl").write_text("\n".join(lines[:64]) + "\n")
    return root


def sft_args(world, out, *extra):
    return ["sft", "-m", world / "teacher", "-d", world / "chat.jsonl", "-o", out,
            "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3", "--precision", "fp32",
            "--eval-every", "4", "--save-every", "2", "--no-tensorboard", "-q", *extra]


def run_args(workdir: Path, *extra: str) -> list[str]:
    args = ["run", str(RECIPE), "--workdir", str(workdir), "-q"]
    for item in SMALL:
        args += ["--set", item]
    return [*args, *extra]


def statuses(stdout: str) -> dict[str, str]:
    """stage -> status from the summary table's rows."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) > 2 and cells[0] in ("tiny", "score", "prune", "distill", "sft", "eval"):
            found[cells[0]] = cells[1]
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """The tiny recipe run once, uninterrupted: (workdir, the summary printed)."""
    workdir = tmp_path_factory.mktemp("pipeline") / "tiny"
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(run_args(workdir))
    assert code == 0, buffer.getvalue()[-3000:]
    return workdir, buffer.getvalue()
