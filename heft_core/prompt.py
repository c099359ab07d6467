"""The prompt template: the one place where a BoolQ example becomes tokens.

The template puts the passage first, then the question, then an answer cue; the target is a
single answer token (" yes" / " no" by default). Passages are truncated from the end so that
the question and the cue always fit in ``max_length``. With ``format: chat`` that text is the user
turn of the tokenizer's own chat template (after a system turn when ``system`` is set), and the
answer token follows the template's generation prompt (as the paper does with Llama-2-chat).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from heft_common.errors import ConfigError


class _Example(Protocol):
    uid: str
    question: str
    passage: str
    answer: bool


PROMPT_FORMATS = ("plain", "chat")


@dataclass
class PromptTemplate:
    """Text around the passage and the question, and the two answer words."""

    before_passage: str = "Passage: "
    after_passage_before_question: str = "\nQuestion: "
    after_question: str = "?\nAnswer (yes or no):"
    yes: str = " yes"
    no: str = " no"
    # "plain": the text above as it is; "chat": that text as the user turn of the tokenizer's own chat
    # template (Llama-2's [INST] <<SYS>>, SmolLM2's <|im_start|>), after a system turn of ``system``.
    format: str = "plain"
    system: str = ""

    def __post_init__(self) -> None:
        if self.format not in PROMPT_FORMATS:
            raise ConfigError("template.format", f"must be one of {', '.join(PROMPT_FORMATS)}, got {self.format!r}")
        if not self.yes or not self.no or self.yes == self.no:
            raise ConfigError("template.yes/no", "need two different, non-empty answer words")

    def render(self, passage: str, question: str) -> str:
        """The full prompt as text (for display; training tokenises the parts separately)."""
        return (
            self.before_passage + passage + self.after_passage_before_question + _clean_question(question)
            + self.after_question
        )


def _clean_question(question: str) -> str:
    # BoolQ questions come without a question mark; the template adds one.
    return question.strip().rstrip("?")


@dataclass(frozen=True)
class EncodedExample:
    uid: str
    input_ids: list[int]
    label: int  # 1 for yes, 0 for no


# Stands for the user turn while the chat template is rendered once, to find the text around it.
_USER_MARK = "\u2063HEFT-USER-TURN\u2063"


class PromptEncoder:
    """Tokenises examples with a template, keeping question and cue whole."""

    def __init__(self, tokenizer: Any, template: PromptTemplate, max_length: int):
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.yes_id = self._single_token(template.yes, "template.yes")
        self.no_id = self._single_token(template.no, "template.no")
        self._chat_before = self._chat_after = ""
        if template.format == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    "template.format", "'chat' needs a tokenizer with a chat template, and this model's has none; "
                    "use 'plain'",
                )
            self._chat_before, self._chat_after = self._chat_text(_USER_MARK).split(_USER_MARK)
            # The chat text carries its own special tokens (e.g. Llama-2's <s>), as apply_chat_template does.
            self._head = self._ids(self._chat_before + template.before_passage)
        else:
            self._head = self._ids(template.before_passage, add_special=True)
        if max_length < len(self._head) + 8:
            raise ConfigError(
                "max_length", f"{max_length} is too short for the template; need at least {len(self._head) + 8}"
            )

    def _ids(self, text: str, add_special: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        return list(ids)

    def _single_token(self, word: str, option: str) -> int:
        ids = self._ids(word)
        if len(ids) != 1:
            raise ConfigError(
                option,
                f"{word!r} is {len(ids)} tokens for this tokenizer; the answer must be exactly one token "
                "(try a leading space)",
            )
        return ids[0]

    def _chat_text(self, user: str) -> str:
        messages = [{"role": "user", "content": user}]
        if self.template.system:
            messages.insert(0, {"role": "system", "content": self.template.system})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, passage: str, question: str) -> list[int]:
        template = self.template
        if template.format == "chat":
            # Whole, the prompt tokenises exactly as apply_chat_template does; only a passage too long for
            # max_length is cut, in tokens, with the text around it tokenised on its own.
            whole = self._ids(self._chat_text(template.render(passage, question)))
            if len(whole) <= self.max_length:
                return whole
        tail = self._ids(
            template.after_passage_before_question + _clean_question(question) + template.after_question
            + self._chat_after
        )
        budget = self.max_length - len(self._head) - len(tail)
        if budget < 1:
            raise ConfigError(
                "max_length",
                f"{self.max_length} tokens cannot hold the question and answer cue "
                f"({len(self._head) + len(tail)} tokens); raise max_length",
            )
        passage_ids = self._ids(passage)[:budget]
        return self._head + passage_ids + tail

    def encode_examples(self, examples: Sequence[_Example]) -> list[EncodedExample]:
        return [EncodedExample(e.uid, self.encode(e.passage, e.question), 1 if e.answer else 0) for e in examples]
