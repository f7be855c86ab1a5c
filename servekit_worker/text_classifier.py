"""The Transformer text classifier's requests, tokenized with the vocabulary shipped in the archive.

A request is UTF-8 text (`text/plain`) or JSON: `{"text": "..."}` answers one prediction, `{"texts": [...]}` a
list. Empty text, invalid UTF-8, more than `handler.max_text_chars` characters or `handler.max_tokens` tokens get 400.
KServe v1 instances are texts (`"..."`, `{"data": "..."}`, or `{"b64": "<base64 UTF-8>"}`); v2 BYTES elements too.
"""

from __future__ import annotations

from typing import Any

import torch

from servekit_worker.architectures import Tokenizer, pad_batch
from servekit_worker.base import ClassifierHandler
from servekit_worker.errors import RequestError
from servekit_worker.requests import Decoded, as_text, instance_value, json_items, parse_json

JSON_FORMAT = '{"text": "..."} or {"texts": ["...", ...]}'


class TextClassifierHandler(ClassifierHandler):
    """Tokenizes with the archive's vocab.json, pads each batch to its longest text."""

    content_types = ("text/plain", "application/json")

    def setup(self) -> None:
        super().setup()
        self.tokenizer = Tokenizer.load(self.model_dir / "vocab.json")
        self.max_tokens = int(self.config.get("max_tokens", 64))
        self.max_chars = int(self.config.get("max_text_chars", 2000))

    def token_ids(self, text: Any, what: str) -> list[int]:
        if not isinstance(text, str):
            raise RequestError("invalid_input", f"{what} must be a string")
        if not text.strip():
            raise RequestError("empty_text", f"{what} is empty")
        if len(text) > self.max_chars:
            raise RequestError("text_too_long", f"{what} has {len(text)} characters; the limit is {self.max_chars}")
        ids = self.tokenizer.encode(text)
        if len(ids) > self.max_tokens:
            raise RequestError("text_too_long", f"{what} has {len(ids)} tokens; the limit is {self.max_tokens}")
        return ids

    def decode_request(self, payload: Any, content_type: str) -> Decoded:
        if isinstance(payload, (dict, list)) or content_type == "application/json":
            items, many = json_items(parse_json(payload), "text", "texts", self.max_inputs, JSON_FORMAT)
            return Decoded([self.token_ids(item, f"text {i}") for i, item in enumerate(items)], many)
        return Decoded([self.token_ids(as_text(payload), "the text")])

    def decode_instance(self, value: Any, what: str) -> list[int]:
        value = instance_value(value, what)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError("invalid_text", f"{what} is not valid UTF-8: {exc}") from None
        return self.token_ids(value, what)

    def collate(self, samples: list) -> torch.Tensor:
        return pad_batch(samples)

    def example_samples(self, count: int) -> list:
        return [[self.tokenizer.CLS] + [self.tokenizer.UNK] * 8] * count
