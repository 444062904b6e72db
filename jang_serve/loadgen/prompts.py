"""Prompt sets: synthetic fixed-length prompts, or a JSONL file of chat/completion requests."""

from __future__ import annotations

import json
import random
from pathlib import Path

# Common English words: most are a single token (with their leading space) in BPE vocabularies.
_WORDS = (
    "the of and to in is was for on that with as by at from his her an which are be this had not "
    "but have were or one all their they there been has more when who will would can out about if "
    "up so some into time them only other new these two may first then do any like my now over "
    "such our man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take three"
).split()


class Tokens:
    """Optional exact token counting through a model folder's tokenizer.json (tokenizers library)."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json to count prompt tokens with")
        self.tok = Tokenizer.from_file(str(path))
        self.model_dir = Path(model_dir)

    def fit(self, text: str, n: int) -> str:
        """Cut `text` to its first n tokens."""
        ids = self.tok.encode(text, add_special_tokens=False).ids[:n]
        return self.tok.decode(ids)

    def eos_ids(self) -> list[int]:
        """EOS ids named by config.json / generation_config.json / tokenizer_config.json."""
        ids: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            p = self.model_dir / name
            if p.exists():
                v = json.loads(p.read_text()).get("eos_token_id")
                ids.update(v if isinstance(v, list) else [] if v is None else [v])
        p = self.model_dir / "tokenizer_config.json"
        if p.exists():
            tok = json.loads(p.read_text()).get("eos_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok and self.tok.token_to_id(tok) is not None:
                ids.add(self.tok.token_to_id(tok))
        return sorted(ids)


def synthetic(n_requests: int, prompt_tokens: int, seed: int = 0, tokens: Tokens | None = None) -> list[str]:
    """n distinct prompts of ~prompt_tokens tokens each (exact when `tokens` is given).

    Each prompt starts with different random words so no server can reuse a cached prefix.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n_requests):
        words = [rng.choice(_WORDS) for _ in range(prompt_tokens + 8)]
        text = " ".join(words)
        out.append(tokens.fit(text, prompt_tokens) if tokens else " ".join(words[:prompt_tokens]))
    return out


def load_jsonl(path: str | Path) -> list[dict]:
    """Request bodies from a JSONL file: each line has "messages" (chat) or "prompt" (completion)."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON: {e}") from None
        if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
            raise ValueError(f"{path}:{i}: each line needs a 'messages' or 'prompt' field")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no requests")
    return rows
