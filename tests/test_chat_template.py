"""Chat templates: the GGUF's own templates rendered by us equal transformers' apply_chat_template
(SmolLM2: a conversation with add_generation_prompt; Qwen2.5-Coder: tools and tool calls), and the
HF environment's features (trim/lstrip blocks, raise_exception, strftime_now, tojson, generation
blocks, the sandbox)."""

from __future__ import annotations

import datetime

import pytest

import gguf_ref
from jang_serve.engine.chat_template import ChatTemplateError, render
from jang_serve.engine.tokenizer import TokenizerError

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in 日本語 too 🙂"},
]

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city (°C)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                       "required": ["city"]},
    },
}]

TOOL_TURNS = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp_c\": 21}"},
]


def _reference(name, messages, **kw):
    return gguf_ref.cached_json(name, "chat", [messages, kw], lambda: gguf_ref.hf_tokenizer(name).apply_chat_template(
        messages, tokenize=False, **kw))


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2]], ids=["with-system", "no-system"])
def test_smollm2_template_matches_transformers(messages, gen):
    tok = gguf_ref.ours("smollm2").tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == _reference("smollm2", messages, add_generation_prompt=gen)
    assert ours.endswith("<|im_start|>assistant\n") == gen
    ids = tok.encode(ours)
    assert ids.count(tok.token_to_id("<|im_start|>")) == len(messages) + gen + (messages[0]["role"] != "system")


@pytest.mark.parametrize("messages", [CONVERSATION, TOOL_TURNS], ids=["chat", "tool-calls"])
def test_qwen_template_with_tools_matches_transformers(messages):
    tok = gguf_ref.ours("qwen25").tokenizer
    ours = tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True)
    assert ours == _reference("qwen25", messages, tools=TOOLS, add_generation_prompt=True)
    assert '"Zürich"' in ours or "Zürich" in ours  # tojson keeps unicode
    assert "<tools>" in ours and "get_weather" in ours


def test_gemma_gguf_has_no_template():
    tok = gguf_ref.ours("gemma3").tokenizer
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CONVERSATION)


def test_environment_features():
    # trim_blocks / lstrip_blocks: block tags leave no blank lines or indentation behind
    t = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render(t, [{"role": "user", "content": "a"}, {"role": "x", "content": "b"}]) == "[a]\n"
    # tojson keeps non-ASCII and does not HTML-escape
    assert render("{{ messages[0] | tojson }}", [{"role": "user", "content": "<é>"}]) == \
        '{"role": "user", "content": "<é>"}'
    assert render("{{ messages[0] | tojson(indent=2) }}", [{"role": "u"}]) == '{\n  "role": "u"\n}'
    # strftime_now, add_generation_prompt, extra variables, generation blocks, loop controls
    year = render("{{ strftime_now('%Y') }}", [{"role": "user"}])
    assert year == str(datetime.datetime.now().year)
    t = "{% generation %}{{ bos_token }}{% endgeneration %}{% if add_generation_prompt %}GO{% endif %}"
    assert render(t, [{"role": "user"}], bos_token="<s>") == "<s>GO"
    assert render(t, [{"role": "user"}], add_generation_prompt=False, bos_token="<s>") == "<s>"
    t = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    assert render(t, [{"role": "a"}, {"role": "b"}]) == "a"


def test_errors():
    with pytest.raises(ChatTemplateError, match="only user roles"):
        render("{{ raise_exception('only user roles') }}", [{"role": "user"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render("{% for %}", [{"role": "user"}])
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute games
        render("{{ messages.__class__.__mro__ }}", [{"role": "user"}])
    with pytest.raises(ChatTemplateError):  # immutable: templates cannot mutate the messages
        render("{{ messages.append(1) }}", [{"role": "user"}])
    with pytest.raises(ChatTemplateError, match="role"):
        render("x", [{"content": "no role"}])
