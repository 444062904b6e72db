"""Request bodies of the OpenAI-shaped API (pydantic). Unknown fields are ignored, as OpenAI does.

Responses are built as plain dicts in the routes (they are simple and follow the spec field by field).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_Extra = ConfigDict(extra="ignore")


class _Base(BaseModel):
    model_config = _Extra


# ---------------------------------------------------------------- chat


class TextPart(_Base):
    type: Literal["text", "input_text", "output_text"]
    text: str


class ImagePart(_Base):
    type: Literal["image_url", "input_image", "input_audio", "file"]


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCall(_Base):
    name: str
    arguments: str = ""


class ToolCall(_Base):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _content_needed(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self


class FunctionDef(_Base):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Base):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Base):
    include_usage: bool = False


class JSONSchemaFormat(_Base):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_present(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type 'json_schema' needs json_schema.schema")
        return self


Stop = Union[str, list[str], None]


class SamplingFields(_Base):
    """Sampling parameters shared by chat and completions (OpenAI fields plus vLLM-style extras)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extras
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        items = [v] if isinstance(v, str) else list(v)
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return items

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        out = {}
        for k, b in v.items():
            try:
                tid = int(k)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
            if tid < 0:
                raise ValueError(f"logit_bias token id {tid} is negative")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias value for token {tid} must be in [-100, 100], got {b}")
            out[str(tid)] = float(b)
        return out


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise ValueError("tool_choice needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        return self


# ---------------------------------------------------------------- completions

Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(default=None, ge=1)
    response_format: Optional[ResponseFormat] = None
    max_tokens: Optional[int] = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and any(isinstance(x, list) and not x for x in v):
            raise ValueError("a token-id prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.suffix and self.echo:
            raise ValueError("echo cannot be combined with suffix (an infill returns the middle only)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self


# ---------------------------------------------------------------- responses (basic)


class ResponseInputItem(_Base):
    type: Optional[Literal["message"]] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]


class ResponsesRequest(_Base):
    model: Optional[str] = None
    input: Union[str, list[ResponseInputItem]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    seed: Optional[int] = None
    user: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        return v


# ---------------------------------------------------------------- admin


class ConvertRequest(_Base):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1)
    profile: Optional[str] = None
    bits: Optional[float] = Field(default=None, ge=1.0, le=8.0)
    method: Optional[Literal["rtn", "mse", "gptq"]] = None  # None: the profile's own option, else rtn
    group_size: Optional[int] = None  # None: the profile's own option, else 64
    output: Optional[str] = None
    load_after: bool = False

    @model_validator(mode="after")
    def _one_budget(self):
        if self.profile is not None and self.bits is not None:
            raise ValueError("give either 'profile' or 'bits', not both")
        if self.group_size is not None and self.group_size not in (32, 64, 128):
            raise ValueError("group_size must be 32, 64 or 128")
        return self


def text_of(content) -> str:
    """The text of a message's content (a string or a list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if isinstance(part, TextPart):
            out.append(part.text)
        else:
            raise ValueError(f"content parts of type {part.type!r} are not supported by this server")
    return "".join(out)
