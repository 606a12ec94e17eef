"""A local stand-in for the OpenAI API (the real one cannot be reached from here), answering only with payloads
shaped as the OpenAI API reference documents them:

- "The chat completion object" (POST /v1/chat/completions, 200): id "chatcmpl-123", object "chat.completion",
  created, model, system_fingerprint, choices[{index, message{role, content, refusal}, logprobs,
  finish_reason}], usage{prompt_tokens, completion_tokens, total_tokens}; with structured outputs the
  message content is the JSON document that matches the requested schema.
- The error object of "Error codes" (429 "Rate limit reached for requests"): {"error": {"message", "type",
  "param", "code": "rate_limit_exceeded"}}, and 500 "The server had an error while processing your request".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import fake_http


def chat_completion(content: str, model: str = "gpt-4o-mini-2024-07-18") -> dict[str, Any]:
    """The documented chat completion object, carrying `content` as the assistant's message."""
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1677652288,
        "model": model,
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    }


RATE_LIMITED = (429, {"error": {
    "message": "Rate limit reached for requests", "type": "requests", "param": None, "code": "rate_limit_exceeded"}})
SERVER_ERROR = (500, {"error": {
    "message": "The server had an error while processing your request. Sorry about that!",
    "type": "server_error", "param": None, "code": None}})

MANIFEST = {
    "document_type": "letter",
    "dates": ["2016-11-07"],
    "people": ["Jane Doe"],
    "organisations": ["Example Clinic"],
    "encounters": [{"date": "2016-11-07", "description": "follow-up visit", "pages": [1]}],
    "summary": "A letter about a follow-up visit.",
}


class FakeOpenAI:
    """Serves a scripted list of (status, body) answers in order; records every request it got."""

    def __init__(self, answers: list[tuple[int, dict[str, Any]]]) -> None:
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    @contextmanager
    def serve(self) -> Iterator[FakeOpenAI]:
        def handle(method: str, path: str, query: dict[str, list[str]], body: Any,
                   headers: Any) -> tuple[int, Any]:
            self.requests.append({"path": path, "body": body, "auth": headers.get("Authorization")})
            return self.answers.pop(0) if self.answers else SERVER_ERROR

        with fake_http.serve(handle) as url:
            self.url = url + "/v1"
            yield self
