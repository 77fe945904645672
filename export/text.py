"""Text in, text out: the tokenizer side of generation, with only ``tokenizers`` (no training code),
so the standalone package loader can use it too."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

BOS_TOKEN = "<|bos|>"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or a prompt it cannot encode; the message names it."""


class TextCodec:
    """Encodes prompts (BOS first) and decodes ids; ``stop``: the token a generated row ends at
    (nanochat's <|bos|>, a Hugging Face model's EOS, or None)."""

    def __init__(self, tokenizer_path: str | Path):
        from tokenizers import Tokenizer

        if tokenizer_path is None or not str(tokenizer_path):
            raise TokenizerError("no tokenizer found: pass --tokenizer path/to/tokenizer.json")
        path = Path(tokenizer_path).expanduser()
        if not path.exists():
            raise TokenizerError(f"tokenizer {path} does not exist: pass --tokenizer path/to/tokenizer.json")
        if not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise TokenizerError(f"tokenizer {path} is {kind}, not a file: pass --tokenizer path/to/tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except OSError:
            raise
        except Exception as err:  # the tokenizers library raises its own exception types for bad files
            raise TokenizerError(f"tokenizer {path} is not a tokenizers JSON file ({_first_line(err)})") from None
        self.path = path
        # nanochat's tokenizer: <|bos|> starts every prompt and ends a document (generation stops
        # there). A Hugging Face model's tokenizer: its own template adds what the model expects
        # (BOS for Llama and Gemma, nothing for Qwen), and generation stops at the model's
        # end-of-sequence token, read from the files beside the tokenizer.
        self.bos = self.tokenizer.token_to_id(BOS_TOKEN)
        self.stop = self.bos if self.bos is not None else eos_id_near(path.parent, self.tokenizer)
        # One past the largest id (ids need not be contiguous): the vocabulary the model must cover.
        self.size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as surrogate escapes
            try:
                shown = repr(text.encode("utf-8", "surrogateescape"))  # the bytes as given
            except UnicodeEncodeError:
                shown = ascii(text)
            raise TokenizerError(f"prompt {shown[:80]} is not valid UTF-8 text") from None
        if self.bos is None:
            return self.tokenizer.encode(text, add_special_tokens=True).ids
        return [self.bos] + self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text of ``ids``; special tokens such as ``<|bos|>`` (a document boundary) are left
        out unless ``skip_special`` is False."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def __str__(self) -> str:
        return f"tokenizer {self.path}"


def eos_id_near(folder: Path, tokenizer) -> int | None:
    """A Hugging Face folder's end-of-sequence id: generation_config.json's eos_token_id, else
    config.json's (the first of a list), else tokenizer_config.json's eos_token; None if none says."""
    import json

    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((folder / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            return eos
    try:
        token = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Streamer:
    """Prints the text of row 0 as its tokens arrive (``on_tokens`` callback of the runtime);
    special tokens such as ``<|bos|>`` are never printed."""

    def __init__(self, codec: TextCodec, out=None):
        self.codec, self.out, self.ids, self.shown = codec, out if out is not None else sys.stdout, [], ""

    def __call__(self, tokens) -> None:
        self.ids.append(int(tokens[0]))
        text = self.codec.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text
