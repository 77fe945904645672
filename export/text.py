"""Text in, text out: the tokenizer side of generation, with only ``tokenizers`` (no training code),
so the standalone package loader can use it too."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

BOS_TOKEN = "<|bos|>"


class TextCodec:
    """Encodes prompts (BOS first) and streams decoded text as tokens arrive."""

    def __init__(self, tokenizer_path: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist: pass --tokenizer path/to/tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.bos = self.tokenizer.token_to_id(BOS_TOKEN)
        if self.bos is None:
            raise ValueError(f"tokenizer {path} has no {BOS_TOKEN} token")

    def encode(self, text: str) -> list[int]:
        return [self.bos] + self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


class Streamer:
    """Prints the text of row 0 as its tokens arrive (``on_tokens`` callback of the runtime)."""

    def __init__(self, codec: TextCodec, out=sys.stdout):
        self.codec, self.out, self.ids, self.shown = codec, out, [], ""

    def __call__(self, tokens) -> None:
        self.ids.append(int(tokens[0]))
        text = self.codec.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text
