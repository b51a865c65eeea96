"""Hand-written chat templates for the built-in toy tokenizers: render a conversation to segments, strip
rendered tokens back to turns, re-emit.

Real models use their own Jinja template instead (``tokenizer.chat_template: model``, see
:mod:`~opd_megatron.tokenization.jinja_template`); the templates here are small copies of a few formats
(ChatML, Llama-3, GLM, plain) for tokenizers that come without one, and they are what
:func:`reemit` can strip off token ids.

A rendered conversation is a list of :class:`Segment` s: template specials (``<|im_start|>``), template
text (``"user\\n"``) and message content. Each segment is tokenised on its own, specials by id, so the
content's tokens cover exactly the content and no text is ever parsed into a special token.

**Handling rule for content that looks like a special token.** A special token is a special token only
when it is a special *id*. Encoding never parses specials out of text (every adapter encodes text with
special-token parsing off), and :meth:`ChatTemplate.strip` reads token ids, not strings, so a user message
containing the literal text ``<|im_start|>`` round-trips as text under every template, with no escaping.
Only the ``plain`` template, which has no specials, is text-delimited: its content must not contain its
own turn markers (``"\\n\\nUser: "`` etc.), which is why it is meant for toy tokenizers only.

Cross-tokenizer re-emission (:func:`reemit`): strip the student's template off a rollout, render the same
turns under the teacher's template with the teacher's tokenizer, and append the completion text and the
teacher's end-of-turn token; no special of one tokenizer ever reaches the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opd_megatron.tokenization.base import Tokenizer, TokenizerError

__all__ = [
    "ROLES",
    "TEMPLATES",
    "ChatTemplate",
    "Reemission",
    "Segment",
    "Special",
    "TemplateError",
    "Turn",
    "elements_from_ids",
    "encode_segments",
    "get_template",
    "end_token_id",
    "reemit_completion",
    "reemit",
]

ROLES = ("system", "user", "assistant")


class TemplateError(TokenizerError):
    """Token ids that do not follow the chat template they are stripped with."""


@dataclass(frozen=True)
class Special:
    """A special token, by spelling, in a stream of stripped elements."""

    text: str


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation. ``kind``: ``special`` (encoded by id), ``template`` (template
    text) or ``content`` (message text)."""

    text: str
    kind: str


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


def _s(text: str) -> Segment:
    return Segment(text, "special")


def _t(text: str) -> Segment:
    return Segment(text, "template")


@dataclass(frozen=True)
class ChatTemplate:
    """A turn-based template: ``prefix``, then per turn ``header(role)`` + content + ``footer``.

    ``end_token`` is the special that ends an assistant completion (``None``: the tokenizer's EOS)."""

    name: str
    prefix: tuple[Segment, ...]
    headers: dict[str, tuple[Segment, ...]] = field(hash=False)
    footer: tuple[Segment, ...]
    end_token: str | None

    @property
    def special_tokens(self) -> tuple[str, ...]:
        segs = [*self.prefix, *self.footer, *(s for h in self.headers.values() for s in h)]
        names = [s.text for s in segs if s.kind == "special"]
        return tuple(dict.fromkeys([*names, *([self.end_token] if self.end_token else [])]))

    def render(self, turns: list[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        out = list(self.prefix)
        for turn in turns:
            if turn.role not in self.headers:
                raise TemplateError(
                    f"template {self.name!r} has no role {turn.role!r}; roles: {list(self.headers)}"
                )
            out += [*self.headers[turn.role], Segment(turn.content, "content"), *self.footer]
        if add_generation_prompt:
            out += self.headers["assistant"]
        return [s for s in out if s.text]

    def render_text(self, turns: list[Turn], add_generation_prompt: bool = False) -> str:
        """The rendered conversation as one string, for display only (specials spelled out)."""
        return "".join(s.text for s in self.render(turns, add_generation_prompt))

    def strip(self, elements: list[str | Special]) -> tuple[list[Turn], bool]:
        """Turns of a rendered conversation given as characters and :class:`Special` s (see
        :func:`elements_from_ids`). Returns the turns and whether the last one is still open (no footer:
        a generation prompt or an unfinished completion). Raises :class:`TemplateError` on anything that
        does not follow the template, e.g. a special token inside content."""
        pos = self._match(elements, 0, self.prefix)
        if pos is None:
            raise TemplateError(f"{self.name}: conversation does not start with {_show(self.prefix)}")
        turns, is_open = [], False
        while pos < len(elements):
            role, pos = self._header_at(elements, pos)
            if role is None:
                raise TemplateError(
                    f"{self.name}: expected a turn header at element {pos}, got {_near(elements, pos)}"
                )
            start = pos
            while True:
                if pos == len(elements):
                    is_open = True
                    break
                after = self._match(elements, pos, self.footer)
                if after is not None and (
                    after == len(elements) or self._header_at(elements, after)[0] is not None
                ):
                    break
                if isinstance(elements[pos], Special):
                    raise TemplateError(
                        f"{self.name}: special token {elements[pos].text!r} inside {role} content at element {pos}"
                    )
                pos += 1
            turns.append(Turn(role, "".join(elements[start:pos])))
            if not is_open:
                pos = after
        return turns, is_open

    def _header_at(self, elements, pos) -> tuple[str | None, int]:
        for role, header in self.headers.items():
            end = self._match(elements, pos, header)
            if end is not None:
                return role, end
        return None, pos

    @staticmethod
    def _match(elements, pos, segments) -> int | None:
        for seg in segments:
            want = [Special(seg.text)] if seg.kind == "special" else list(seg.text)
            if elements[pos : pos + len(want)] != want:
                return None
            pos += len(want)
        return pos


def _show(segments) -> str:
    return repr("".join(s.text for s in segments))


def _near(elements, pos) -> str:
    return repr([e.text if isinstance(e, Special) else e for e in elements[pos : pos + 8]])


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(
        "chatml",
        prefix=(),
        headers={r: (_s("<|im_start|>"), _t(f"{r}\n")) for r in ROLES},
        footer=(_s("<|im_end|>"), _t("\n")),
        end_token="<|im_end|>",
    ),
    "llama3": ChatTemplate(
        "llama3",
        prefix=(_s("<|begin_of_text|>"),),
        headers={r: (_s("<|start_header_id|>"), _t(r), _s("<|end_header_id|>"), _t("\n\n")) for r in ROLES},
        footer=(_s("<|eot_id|>"),),
        end_token="<|eot_id|>",
    ),
    "glm": ChatTemplate(
        "glm",
        prefix=(_s("[gMASK]"), _s("<sop>")),
        headers={r: (_s(f"<|{r}|>"), _t("\n")) for r in ROLES},
        footer=(),  # GLM turns end where the next role token starts
        end_token="<|endoftext|>",
    ),
    "plain": ChatTemplate(
        "plain",
        prefix=(),
        headers={r: (_t(f"{r.capitalize()}: "),) for r in ROLES},
        footer=(_t("\n\n"),),
        end_token=None,
    ),
}
"""Built-in templates by name (``TokenizerConfig.chat_template``)."""
TEMPLATES["qwen"] = TEMPLATES["chatml"]


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise TemplateError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def encode_segments(tok: Tokenizer, segments: list[Segment]) -> list[int]:
    """Token ids of rendered segments: specials by id, every other segment encoded on its own."""
    ids: list[int] = []
    for seg in segments:
        ids += [tok.special_token_id(seg.text)] if seg.kind == "special" else tok.encode(seg.text)
    return ids


def elements_from_ids(tok: Tokenizer, ids: list[int]) -> list[str | Special]:
    """Characters and :class:`Special` s of token ids; text bytes between specials are decoded together,
    since byte-level tokens may split a character."""
    out: list[str | Special] = []
    buf = bytearray()
    for i, b in zip(ids, tok.text_bytes(ids)):
        name = tok.special_token_text(i) if int(i) in tok.special_ids else None
        if name is None and int(i) not in tok.special_ids:
            buf += b
            continue
        out += buf.decode("utf-8", errors="replace")
        buf.clear()
        out.append(Special(name if name is not None else f"<special {int(i)}>"))
    out += buf.decode("utf-8", errors="replace")
    return out


@dataclass
class Reemission:
    """A student rollout re-emitted for a teacher of another tokenizer."""

    turns: list[Turn]
    """The prompt's turns, stripped of the student's template."""
    completion_text: str
    ended: bool
    """Whether the student ended its completion with its end-of-turn token (the teacher's one is appended)."""
    teacher_prompt_ids: list[int]
    teacher_completion_ids: list[int]


def end_token_id(tok: Tokenizer, tpl: ChatTemplate) -> int:
    """The token that ends an assistant turn: the template's end token, else the tokenizer's EOS."""
    return tok.special_token_id(tpl.end_token) if tpl.end_token else tok.eos_id


def reemit(
    prompt_ids: list[int],
    completion_ids: list[int],
    student_tok: Tokenizer,
    student_tpl: ChatTemplate,
    teacher_tok: Tokenizer,
    teacher_tpl: ChatTemplate,
) -> Reemission:
    """Strip the student's template off ``prompt_ids`` (which end in its generation prompt), re-render the
    turns under the teacher's template, and re-tokenise the completion text with the teacher's tokenizer.

    The completion is the student's tokens up to its first special token; if that is the student's
    end-of-turn (or EOS) token, the teacher's end-of-turn token is appended, so the teacher also scores
    the decision to stop."""
    turns, is_open = student_tpl.strip(elements_from_ids(student_tok, prompt_ids))
    if not (is_open and turns and turns[-1].role == "assistant" and turns[-1].content == ""):
        raise TemplateError(f"{student_tpl.name}: prompt does not end with the assistant generation prompt")
    turns = turns[:-1]
    text, ended, teacher_completion = reemit_completion(
        completion_ids, student_tok, student_tpl, teacher_tok, teacher_tpl
    )
    if hasattr(teacher_tpl, "render_ids"):  # the teacher model's own Jinja template
        messages = [{"role": t.role, "content": t.content} for t in turns]
        teacher_prompt = teacher_tpl.render_ids(messages, add_generation_prompt=True, tok=teacher_tok)
    else:
        teacher_prompt = encode_segments(teacher_tok, teacher_tpl.render(turns, add_generation_prompt=True))
    return Reemission(turns, text, ended, teacher_prompt, teacher_completion)


def reemit_completion(
    completion_ids: list[int],
    student_tok: Tokenizer,
    student_tpl: ChatTemplate,
    teacher_tok: Tokenizer,
    teacher_tpl: ChatTemplate,
) -> tuple[str, bool, list[int]]:
    """The completion half of :func:`reemit`: ``(text, ended, teacher_completion_ids)``. The text is the
    student's tokens up to its first special token; ``ended`` when that special is the student's
    end-of-turn or EOS token, and then the teacher's end-of-turn token closes the teacher's ids."""
    specials = student_tok.special_ids
    n = next((k for k, i in enumerate(completion_ids) if int(i) in specials), len(completion_ids))
    ended = n < len(completion_ids) and int(completion_ids[n]) in (
        end_token_id(student_tok, student_tpl),
        student_tok.eos_id,
    )
    text = b"".join(student_tok.text_bytes(completion_ids[:n])).decode("utf-8", errors="replace")
    try:
        ids = teacher_tok.encode(text)
    except TokenizerError:  # a closed vocabulary (characters) meets text it lacks: those become <unk>
        ids = teacher_tok.encode(text, errors="replace")
    return text, ended, ids + ([end_token_id(teacher_tok, teacher_tpl)] if ended else [])
