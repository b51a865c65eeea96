"""The model's own chat template: the Jinja template of a Hugging Face tokenizer, rendered by ``transformers``.

:meth:`JinjaChatTemplate.render_ids` renders a conversation with ``apply_chat_template(...,
tokenize=False)`` and tokenises the text the way ``apply_chat_template(..., tokenize=True)`` does (special
tokens spelled by the template become their ids, no BOS/EOS added on top), so the ids are the model's.

**Content that spells a special token.** ``transformers`` would turn ``"<|im_end|>"`` written inside a
user message into the real end-of-turn token. Here, as for the hand-written templates
(:mod:`~opd_megatron.tokenization.chat_templates`), a special token is a special token only where the
*template* writes it: when a message spells one, the rendered text is cut at the template's special tokens
only (those outside the messages' contents), each piece is tokenised with special-token parsing off, and
the specials are added by id. That is also how the tokenizer itself splits text at special tokens, so
for every other conversation both ways give the same ids. A template that changes such a message's text
(so it cannot be found verbatim in the rendering) is an error rather than a silent injection.

The **end-of-turn token** (:attr:`JinjaChatTemplate.end_token`) is found by rendering a user turn and an
assistant turn and taking the first special token the template writes after the assistant's text
(``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3, ``</s>`` for Mistral); a completion ends there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from opd_megatron.tokenization.chat_templates import TemplateError

__all__ = ["JinjaChatTemplate", "TemplateRenderError", "template_for"]

_PROBE = "OPDPROBEANSWER"


class TemplateRenderError(TemplateError):
    """A conversation the model's template refuses or fails to render."""


class JinjaChatTemplate:
    """``hf_tokenizer``: the ``transformers`` tokenizer holding the template; ``tok``: the project's
    :class:`~opd_megatron.tokenization.hf_tok.HFTokenizer` of the same ``tokenizer.json``; ``source``: the
    file the template was read from (named in errors)."""

    name = "model"

    def __init__(self, hf_tokenizer, tok, source: str):
        self._hf = hf_tokenizer
        self.tok = tok
        self.source = source
        self._specials = sorted(tok.special_texts(), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self.end_token = self._probe_end_token()

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(self._specials)

    def render_text(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        template_kwargs: Mapping | None = None,
    ) -> str:
        """The rendered conversation (``apply_chat_template(..., tokenize=False)``)."""
        try:
            text = self._hf.apply_chat_template(
                [dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **dict(template_kwargs or {}),
            )
        except Exception as e:  # jinja2 errors, raise_exception() in the template, bad kwargs
            line = getattr(e, "lineno", None)
            where = f"{self.source}:{line}" if line else self.source
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TemplateRenderError(f"chat template {where} failed to render: {msg}") from None
        if not isinstance(text, str):  # internal: transformers returns a string for tokenize=False
            raise TemplateRenderError(f"chat template {self.source} rendered {type(text).__name__}, not text")
        return text

    def render_ids(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        template_kwargs: Mapping | None = None,
        tok=None,
    ) -> list[int]:
        """Token ids of the rendered conversation (see the module docstring)."""
        tok = tok or self.tok
        text = self.render_text(messages, add_generation_prompt, template_kwargs)
        contents = [m["content"] for m in messages]
        if self._special_re is None or not any(self._special_re.search(c) for c in contents):
            return tok.encode_parsing_specials(text)
        # Some content spells a special token: find every content in the text, in order, and cut the text
        # only at specials outside them.
        spans, pos = [], 0
        for i, c in enumerate(contents):
            k = text.find(c, pos) if c else -1
            if k < 0:
                if self._special_re.search(c):
                    raise TemplateRenderError(
                        f"message {i} spells a special token ({self._special_re.search(c).group()!r}) and the "
                        f"chat template {self.source} changes its text, so it cannot be kept as plain text"
                    )
                continue
            spans.append((k, k + len(c)))
            pos = k + len(c)
        ids, last = [], 0
        for m in self._special_re.finditer(text):
            if any(s <= m.start() < e for s, e in spans):
                continue
            ids += tok.encode(text[last : m.start()]) + [tok.special_token_id(m.group())]
            last = m.end()
        return ids + tok.encode(text[last:])

    def _probe_end_token(self) -> str | None:
        try:
            text = self.render_text(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
                add_generation_prompt=False,
            )
        except TemplateRenderError:
            return None
        k = text.rfind(_PROBE)
        if k < 0 or self._special_re is None:
            return None
        m = self._special_re.search(text, k + len(_PROBE))
        return m.group() if m else None

    # The hand-written templates' strip/render API, for code that re-emits a rendering.
    def strip(self, elements):
        raise TemplateError(
            f"the model's own chat template ({self.source}) cannot be stripped off token ids; render the "
            "prompt from the data row instead (opd_megatron.data.render.render_prompt)"
        )

    def __repr__(self) -> str:
        return f"JinjaChatTemplate({self.source!r}, end_token={self.end_token!r})"


def template_for(tok, name: str):
    """The chat template ``TokenizerConfig.chat_template`` names for ``tok``: ``"model"`` is the model's own
    Jinja template (a tokenizer loaded from a Hugging Face directory that has one), any other name a
    hand-written template of :data:`~opd_megatron.tokenization.chat_templates.TEMPLATES`."""
    from opd_megatron.tokenization.chat_templates import get_template

    if name != "model":
        return get_template(name)
    chat = getattr(tok, "chat", None)
    if chat is None:
        where = getattr(tok, "hf_dir", None)
        if where is None:
            raise TemplateError(
                f"chat_template 'model': {tok!r} was not loaded from a Hugging Face tokenizer directory; point "
                "tokenizer.path at the directory (tokenizer.json + tokenizer_config.json), not a file"
            )
        raise TemplateError(
            f"chat_template 'model': the tokenizer at {where} has no chat template "
            "(expected chat_template.jinja or a chat_template entry in tokenizer_config.json)"
        )
    return chat
