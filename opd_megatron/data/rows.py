"""Prompt rows and their validation, shared by every file format (JSONL, Parquet, ``datasets`` directories).

A row is a JSON-like record with either a ``prompt`` string or a ``messages`` conversation (OpenAI format:
a list of ``{"role": ..., "content": ...}`` with role ``system``, ``user``, ``assistant`` or ``tool`` and
string content), a ``domain``, and optional ``reference`` and ``privileged`` strings.

A conversation that ends with an assistant message carries its answer: that message becomes the row's
``reference`` (unless the row gives one) and the turns before it are the prompt, so chat datasets with the
reply included (SFT style) and without it (prompt-only) both work. The prompt turns must contain a user
message.

Missing values and ``None`` are the same thing (a Parquet or ``datasets`` column holds ``None`` where a
row lacks the field). :func:`row_from_record` raises :class:`DataError` with the problem only; the readers
add the location (``file:line`` for JSONL, ``file: row i`` for tables) and collect every bad row.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "FIELDS",
    "ROLES",
    "DataError",
    "Message",
    "PromptRow",
    "RowErrors",
    "row_from_record",
]

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a conversation may use (OpenAI chat format)."""

FIELDS = ("prompt", "domain", "reference", "privileged", "messages")
"""Fields a record may carry (after the column mapping)."""

MAX_REPORTED = 20
"""Bad rows listed in one error; the rest are counted."""


class DataError(ValueError):
    """A malformed data row or file, or a dataset that cannot be built as asked. ``errors``: one
    ``location: problem`` line per bad row when several rows were checked together."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = list(errors) if errors is not None else [message]


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class PromptRow:
    """One prompt and what is known about its answer."""

    prompt: str
    """The prompt text. For a ``messages`` row: the content of its last user message (what plain-text
    consumers show or condition on); the conversation itself is in ``messages``."""
    domain: str
    """Routes the prompt to its teacher (MOPD) and its verifier (built-in domains)."""
    reference: str | None = None
    """The correct completion text (without EOS)."""
    privileged: str | None = None
    """A hint only a self-distillation teacher is conditioned on (a worked step, the answer)."""
    messages: tuple[Message, ...] | None = None
    """The prompt's conversation, rendered with the chat template; ``None`` for a plain ``prompt`` row."""
    source: str | None = field(default=None, compare=False)
    """Where the row came from (``file:line`` or ``file: row i``), for error messages; not compared."""

    @property
    def key(self) -> tuple:
        """What identifies the prompt (duplicate and train/eval leak checks)."""
        return ("messages", self.messages) if self.messages is not None else ("prompt", self.prompt)

    def where(self) -> str:
        """The row's location, or a short description when it was not read from a file."""
        if self.source:
            return self.source
        shown = self.prompt if len(self.prompt) <= 40 else self.prompt[:37] + "..."
        return f"row (domain {self.domain!r}, prompt {shown!r})"


class RowErrors:
    """Collects ``location: problem`` lines and raises one :class:`DataError` listing them all."""

    def __init__(self, what: str):
        self.what = what
        self.lines: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.lines.append(f"{where}: {problem}")

    def raise_if_any(self) -> None:
        if not self.lines:
            return
        shown = self.lines[:MAX_REPORTED]
        more = len(self.lines) - len(shown)
        tail = [f"... and {more} more"] if more else []
        summary = [f"{len(self.lines)} bad rows in {self.what}"] if len(self.lines) > 1 else []
        raise DataError("\n".join([*shown, *tail, *summary]), self.lines)


def _shown(value: object) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _messages(value: object) -> tuple[Message, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise DataError(
            f"field 'messages' must be a list of messages, got {type(value).__name__} {_shown(value)}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        extra = [k for k, v in m.items() if k not in ("role", "content") and v is not None]
        if extra:
            raise DataError(
                f"messages[{i}] has unsupported key {extra[0]!r}; a message carries role and content"
            )
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise DataError(f"messages[{i}] has no 'role'")
        if role not in ROLES:
            raise DataError(f"messages[{i}] has unknown role {_shown(role)}; roles: {', '.join(ROLES)}")
        if content is None:
            raise DataError(f"messages[{i}] ({role}) has no 'content'")
        if not isinstance(content, str):
            raise DataError(
                f"messages[{i}] ({role}) content must be a string, got {type(content).__name__} {_shown(content)}"
            )
        out.append(Message(role, content))
    if not out:
        raise DataError("field 'messages' is an empty conversation")
    return tuple(out)


def row_from_record(
    record: object, *, extra_fields: str = "error", default_domain: str | None = None
) -> PromptRow:
    """Validate one record (already column-mapped) and build its row; :class:`DataError` names the problem.

    ``extra_fields``: ``"error"`` rejects fields outside :data:`FIELDS` (with a did-you-mean), ``"ignore"``
    skips them. ``default_domain`` is used when the record has no ``domain``."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    obj = {k: v for k, v in record.items() if v is not None}
    if extra_fields == "error":
        for key in obj:
            if key not in FIELDS:
                close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.6)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else f"known fields: {', '.join(FIELDS)} (data.extra_fields=ignore skips other fields)"
                )
                raise DataError(f"unknown field {key!r}; {hint}")
    if "domain" not in obj and default_domain is not None:
        obj["domain"] = default_domain
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        raise DataError("a row has either 'prompt' or 'messages', not both")
    if not has_prompt and not has_messages:
        raise DataError("missing required field 'prompt' (or 'messages')")
    if "domain" not in obj:
        raise DataError("missing required field 'domain' (or set data.default_domain)")
    for key in ("prompt", "domain", "reference", "privileged"):
        if key in obj and not isinstance(obj[key], str):
            allowed = "a string or null" if key in ("reference", "privileged") else "a string"
            raise DataError(
                f"field {key!r} must be {allowed}, got {type(obj[key]).__name__} {_shown(obj[key])}"
            )
    for key in ("prompt", "domain"):
        if key in obj and not obj[key].strip():
            raise DataError(f"field {key!r} is empty")
    reference = obj.get("reference")
    if not has_messages:
        return PromptRow(obj["prompt"], obj["domain"], reference, obj.get("privileged"))

    messages = _messages(obj["messages"])
    if messages[-1].role == "assistant":
        if reference is not None:
            raise DataError(
                "the conversation ends with an assistant message and the row also has a 'reference'"
            )
        reference = messages[-1].content
        messages = messages[:-1]
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise DataError("the conversation has no user message before the answer")
    if not users[-1].content.strip():
        raise DataError("the last user message is empty")
    return PromptRow(users[-1].content, obj["domain"], reference, obj.get("privileged"), messages)
