"""Fill-in-the-middle over /v1/completions with `suffix`, on the real Qwen2.5-Coder-0.5B (its GGUF
carries the <|fim_*|> tokens), through a real jang-serve and the `openai` client."""

from __future__ import annotations

import openai
import pytest

import realdata
from jang_serve.engine.fim import fim_prompt, fim_tokens
from jang_serve.engine.loader.gguf import read_gguf
from test_server_harness import CLIServer

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\n\nassert add(2, 3) == 5\n"


@pytest.fixture(scope="module")
def coder():
    path = realdata.qwen25_coder_gguf()
    srv = CLIServer(["--model", str(path), "--served-model-name", "coder", "--max-num-seqs", "4",
                     "--log-level", "warning"]).wait_ready()
    try:
        yield srv, read_gguf(path, with_weights=False).tokenizer
    finally:
        srv.stop()


def test_infill_is_working_code_and_streams_the_same(coder):
    srv, tok = coder
    client = openai.OpenAI(base_url=srv.base_url, api_key="none")
    r = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=24, temperature=0)
    middle = r.choices[0].text
    # the model ended the middle itself (an end / padding token), and prefix + middle + suffix runs
    assert r.choices[0].finish_reason == "stop", middle
    scope: dict = {}
    exec(PREFIX + middle + SUFFIX, scope)  # noqa: S102 - the assert inside checks the infill
    assert scope["add"](40, 2) == 42
    # the server built the PSM prompt: its length is the documented template's
    fim = fim_tokens(tok)
    template = tok.encode("<|fim_prefix|>" + PREFIX + "<|fim_suffix|>" + SUFFIX + "<|fim_middle|>")
    assert fim_prompt(tok, fim, PREFIX, SUFFIX) == template
    assert r.usage.prompt_tokens == len(template)
    streamed = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=24,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == middle


def test_token_prompt_and_several_prompts(coder):
    srv, tok = coder
    client = openai.OpenAI(base_url=srv.base_url, api_key="none")
    one = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0)
    ids = client.completions.create(model="coder", prompt=tok.encode(PREFIX), suffix=SUFFIX, max_tokens=8,
                                    temperature=0)
    assert ids.choices[0].text == one.choices[0].text
    # without the suffix the same prompt is a plain continuation: a different prompt, fewer tokens
    plain = client.completions.create(model="coder", prompt=PREFIX, max_tokens=8, temperature=0)
    assert plain.usage.prompt_tokens == len(tok.encode(PREFIX, add_special_tokens=True))
    assert plain.usage.prompt_tokens < one.usage.prompt_tokens
    two = client.completions.create(model="coder", prompt=[PREFIX, "def sub(a, b):\n    return "],
                                    suffix=SUFFIX, max_tokens=8, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == one.choices[0].text
    second = fim_prompt(tok, fim_tokens(tok), "def sub(a, b):\n    return ", SUFFIX)  # each prompt is infilled
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + len(second)
