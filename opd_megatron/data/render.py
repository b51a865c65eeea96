"""A row's prompt as token ids: the one function the rollout, the evaluation and every teacher call.

- Under the model's own chat template (``tokenizer.chat_template: model``): the row's ``messages`` (a
  ``prompt`` row counts as one user message) rendered with ``add_generation_prompt=True`` through
  ``transformers``, with the configured template variables; the ids equal ``apply_chat_template(...,
  tokenize=True)`` (see :mod:`~opd_megatron.tokenization.jinja_template` for content that spells a special
  token).
- Under a hand-written template (the built-in toy tokenizers): a ``prompt`` row is ``[BOS] +
  encode(prompt)`` as it always was (the synthetic domains are raw text); a ``messages`` row is the
  template's rendering with the assistant generation prompt, specials by id (what
  :func:`~opd_megatron.tokenization.chat_templates.reemit` strips).

A completion ends at :func:`completion_end_ids`: the template's end-of-turn token, or EOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from opd_megatron.data.rows import DataError, Message, PromptRow, RowErrors
from opd_megatron.tokenization.base import Tokenizer, TokenizerError
from opd_megatron.tokenization.chat_templates import ChatTemplate, Turn, encode_segments, end_token_id
from opd_megatron.tokenization.jinja_template import JinjaChatTemplate

__all__ = ["PromptRenderer", "completion_end_ids", "render_prompt", "render_prompts", "with_hint"]


def render_prompt(
    tok: Tokenizer,
    template: ChatTemplate | JinjaChatTemplate,
    row: PromptRow,
    template_kwargs: Mapping | None = None,
) -> list[int]:
    """Prompt ids of ``row`` (see the module docstring); :class:`DataError` naming the row's file and
    line when the template cannot render it."""
    try:
        if isinstance(template, JinjaChatTemplate):
            messages = row.messages if row.messages is not None else (Message("user", row.prompt),)
            return template.render_ids([m.as_dict() for m in messages], True, template_kwargs, tok=tok)
        if row.messages is None:
            return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(row.prompt)
        turns = [Turn(m.role, m.content) for m in row.messages]
        return encode_segments(tok, template.render(turns, add_generation_prompt=True))
    except TokenizerError as e:  # TemplateError included
        raise DataError(f"{row.where()}: {e}") from None


def render_prompts(
    tok: Tokenizer,
    template: ChatTemplate | JinjaChatTemplate,
    rows: Sequence[PromptRow],
    template_kwargs: Mapping | None = None,
    max_prompt_tokens: int | None = None,
    limit: str = "",
) -> list[list[int]]:
    """:func:`render_prompt` of every row, for a start-up check: every row that fails to render, or whose
    prompt is longer than ``max_prompt_tokens`` (``limit`` says where that number comes from, e.g.
    ``"model.max_sequence_length=128 - rollout.max_new_tokens=16"``), is reported in one :class:`DataError`
    naming its file and line."""
    errors = RowErrors("the prompt data")
    out = []
    for row in rows:
        try:
            ids = render_prompt(tok, template, row, template_kwargs)
        except DataError as e:
            errors.lines.append(str(e))
            continue
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            errors.add(
                row.where(),
                f"the prompt is {len(ids)} tokens, longer than the {max_prompt_tokens} the context leaves for it"
                + (f" ({limit})" if limit else ""),
            )
        out.append(ids)
    errors.raise_if_any()
    return out


def completion_end_ids(tok: Tokenizer, template: ChatTemplate | JinjaChatTemplate) -> tuple[int, ...]:
    """Token ids that end a completion: the template's end-of-turn token and EOS (one id when they are
    the same). The sampler stops on any of them."""
    return tuple(dict.fromkeys([end_token_id(tok, template), tok.eos_id]))


def with_hint(row: PromptRow, hint: str | None) -> PromptRow:
    """``row`` as a self-distillation teacher sees it: ``"<hint>\\n"`` before the prompt text (for a
    ``messages`` row, before its last user message, so the rest of the conversation and the template stay
    as the student sees them). No hint: the row itself."""
    if not hint:
        return row
    if row.messages is None:
        return dataclasses.replace(row, prompt=f"{hint}\n{row.prompt}")
    last = max(i for i, m in enumerate(row.messages) if m.role == "user")
    messages = list(row.messages)
    messages[last] = Message("user", f"{hint}\n{messages[last].content}")
    return dataclasses.replace(row, prompt=messages[last].content, messages=tuple(messages))


@dataclasses.dataclass
class PromptRenderer:
    """One model's prompt rendering, bound once: ``renderer(row)`` is :func:`render_prompt` with this
    tokenizer, template and template variables (what a trainer keeps as its ``prompt_fn``)."""

    tok: Tokenizer
    template: ChatTemplate | JinjaChatTemplate
    template_kwargs: Mapping = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, tok: Tokenizer, cfg) -> PromptRenderer:
        """From a :class:`~opd_megatron.config.TokenizerConfig` (``chat_template``, ``template_kwargs``)."""
        from opd_megatron.tokenization.jinja_template import template_for

        return cls(tok, template_for(tok, cfg.chat_template), dict(cfg.template_kwargs))

    def __call__(self, row: PromptRow) -> list[int]:
        return render_prompt(self.tok, self.template, row, self.template_kwargs)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Ids that end a completion (:func:`completion_end_ids`)."""
        return completion_end_ids(self.tok, self.template)

    def check(self, rows: Sequence[PromptRow], max_prompt_tokens: int | None = None, limit: str = ""):
        """:func:`render_prompts` of ``rows``: the start-up check (every row renders and fits)."""
        return render_prompts(self.tok, self.template, rows, self.template_kwargs, max_prompt_tokens, limit)
