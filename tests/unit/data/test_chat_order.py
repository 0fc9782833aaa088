"""The turn order sft accepts (issue 17): an optional system message first, then user and
assistant alternating from a user turn, tool turns only after an assistant turn, and at least one
assistant turn. Every other order is one line naming the file and line."""

from __future__ import annotations

import json

import pytest

from minima_cli.data.chat import read_chat, to_messages
from minima_cli.errors import MinimaError


def turns(*roles: str) -> dict:
    return {"messages": [{"role": role, "content": f"{role} {i}"} for i, role in enumerate(roles)]}


@pytest.mark.parametrize("roles", [
    ("user", "assistant"),
    ("system", "user", "assistant"),
    ("user", "assistant", "user", "assistant"),
    ("user", "assistant", "tool", "assistant"),
    ("system", "user", "assistant", "tool", "tool", "assistant", "user", "assistant"),
    ("user", "assistant", "user"),  # a trailing question is only context
])
def test_orders_that_are_accepted(roles):
    assert [m["role"] for m in to_messages(turns(*roles), "x:1")[1]] == list(roles)


@pytest.mark.parametrize("roles, message", [
    (("assistant", "user", "assistant"),
     "message 0: a conversation cannot start with 'assistant'"),
    (("system", "assistant"), "message 1: 'assistant' cannot follow 'system'"),
    (("user", "assistant", "system", "user", "assistant"),
     "message 2: 'system' cannot follow 'assistant'"),
    (("user", "user", "assistant"), "message 1: 'user' cannot follow 'user'"),
    (("user", "assistant", "assistant"), "message 2: 'assistant' cannot follow 'assistant'"),
    (("user", "tool", "assistant"), "message 1: 'tool' cannot follow 'user'"),
    (("system", "system", "user", "assistant"), "message 1: 'system' cannot follow 'system'"),
])
def test_orders_that_are_refused(roles, message):
    with pytest.raises(MinimaError) as caught:
        to_messages(turns(*roles), "chat.jsonl:7")
    text = str(caught.value)
    assert text.startswith(f"chat.jsonl:7: {message}") and "\n" not in text
    assert "an optional system message first" in text


def test_sharegpt_is_held_to_the_same_order(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(MinimaError,
                       match=r"chat\.jsonl:2: message 0: a conversation cannot start with"):
        read_chat(path)
