"""Run under an interpreter that has llama-cpp-python (not minima's venv): the next-token logits
llama.cpp computes for a GGUF file after each token of a prompt, as JSON on stdout.

    python llama_cpp_logits.py MODEL.gguf '[1, 2, 3]'   ->   {"logits": [[...], ...], "ids": [...]}

Tokens are evaluated one at a time (logits_all=True crashes in llama-cpp-python 0.3.36), and
`ids` is llama.cpp's own tokenisation of the optional third argument (a text), so the caller can
compare tokenizers too.
"""

import json
import sys

import llama_cpp

path, ids = sys.argv[1], json.loads(sys.argv[2])
text = sys.argv[3] if len(sys.argv) > 3 else None
llm = llama_cpp.Llama(model_path=path, n_ctx=max(64, len(ids) + 8), n_threads=2, n_batch=1,
                      logits_all=False, verbose=False, seed=0)
rows = []
for token in ids:
    llm.eval([token])
    n_vocab = llm.n_vocab()
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the last evaluated token's
    rows.append([pointer[i] for i in range(n_vocab)])
result = {"logits": rows, "n_vocab": llm.n_vocab()}
if text is not None:
    result["ids"] = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    result["detokenized"] = llm.detokenize(result["ids"]).decode("utf-8", errors="replace")
    result["chat_template"] = llm.metadata.get("tokenizer.chat_template")
print(json.dumps(result))
