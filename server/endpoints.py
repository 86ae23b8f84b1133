"""What differs between the two generation endpoints, as one object each: the response id's prefix, the
object names, the choice in a whole body, a stream chunk, and the logprobs shape.

`Job`, `streaming` and the routes ask the request's endpoint (`COMPLETIONS` or `CHAT`) instead of
comparing kind strings. A choice's own extension of its body (the infill gaps) comes from the choice
(`server.answer.BaseChoice.body_extra`).
"""

from __future__ import annotations

import uuid

from server.logprobs import chat_logprobs, completion_logprobs


class Endpoint:
    name = ""
    id_prefix = ""
    object = ""         # the whole response body's object
    chunk_object = ""   # a stream chunk's object
    opens_with_role = False

    def new_id(self) -> str:
        return self.id_prefix + uuid.uuid4().hex[:24]

    def body(self, rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
        return {"id": rid, "object": self.object, "created": created, "model": model, "choices": choices,
                "usage": usage}

    def chunk(self, rid: str, created: int, model: str, index: int, text: str | None,
              finish_reason: str | None = None, logprobs: dict | None = None,
              stop_reason: str | int | None = None) -> dict:
        """A stream chunk carrying `text` (None: the finish chunk, no text)."""
        return {"id": rid, "object": self.chunk_object, "created": created, "model": model,
                "choices": [{"index": index, self.delta_key: self.delta(text), "logprobs": logprobs,
                             "finish_reason": finish_reason, "stop_reason": stop_reason}]}

    def usage_chunk(self, rid: str, created: int, model: str, usage: dict) -> dict:
        return {"id": rid, "object": self.chunk_object, "created": created, "model": model, "choices": [],
                "usage": usage}

    delta_key = ""

    def delta(self, text: str | None):
        raise NotImplementedError

    def choice(self, c, logprobs: dict | None) -> dict:
        """One choice of the whole body."""
        raise NotImplementedError

    def logprobs(self, decoder, ids: list[int], info: list, prefix_ids: list[int]) -> dict:
        raise NotImplementedError


class Completions(Endpoint):
    name = "completions"
    id_prefix = "cmpl-"
    object = chunk_object = "text_completion"
    delta_key = "text"

    def delta(self, text):
        return text or ""

    def choice(self, c, logprobs):
        a = c.answer
        return {"index": c.index, "text": a.text, "logprobs": logprobs, "finish_reason": a.finish_reason,
                "stop_reason": c.stop_reason, "token_ids": a.ids, **c.body_extra()}

    def logprobs(self, decoder, ids, info, prefix_ids):
        return completion_logprobs(decoder, ids, info, prefix_ids=prefix_ids)


class Chat(Endpoint):
    name = "chat"
    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    delta_key = "delta"
    opens_with_role = True  # a first chunk per choice: {"role": "assistant", "content": ""}

    def delta(self, text):
        """A text delta, or a delta object a choice made itself (tool calls: server.tools)."""
        if isinstance(text, dict):
            return text
        return {} if text is None else {"content": text}

    def role_chunk(self, rid: str, created: int, model: str, index: int) -> dict:
        c = self.chunk(rid, created, model, index, "")
        c["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return c

    def choice(self, c, logprobs):
        a = c.answer
        message = {"role": "assistant", "content": a.text}
        if a.tool_calls:  # OpenAI's shape: content null when the answer is only calls
            message.update(content=None, tool_calls=a.tool_calls)
        return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": a.finish_reason,
                "stop_reason": c.stop_reason}

    def logprobs(self, decoder, ids, info, prefix_ids):
        return chat_logprobs(decoder, ids, info)


COMPLETIONS = Completions()
CHAT = Chat()
