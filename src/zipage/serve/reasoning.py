"""Reasoning outputs: a reasoning model's thinking apart from its answer (``zipage serve --reasoning-parser``).

Reasoning models write their thinking between ``<think>`` and ``</think>``, then the answer. With a reasoning
parser the chat endpoint returns the thinking in the message's ``reasoning`` field (and in
``reasoning_content``, the older name many clients read) and the answer alone in ``content``, as vLLM's
server does; streamed, each chunk's delta carries the new thinking, the new answer, or both. Stop strings,
``max_tokens`` and log-probabilities apply to the whole output, thinking included (they act on tokens).

The parsers (:data:`PARSERS`):

- ``deepseek_r1``: everything up to the first ``</think>`` is thinking (the DeepSeek-R1 chat templates open the
  block in the prompt; a ``<think>`` the output starts with is dropped). An output that never closes it is
  all thinking, with no content: the length ran out while the model thought.
- ``qwen3``: thinking only inside a block, one the output opens with ``<think>`` or one the prompt leaves
  open (templates that end the prompt with ``<think>``); an output with no block is all content (Qwen3 with
  ``chat_template_kwargs: {"enable_thinking": false}`` closes an empty block in the prompt).

Whitespace around the tags is not part of either field: the thinking is stripped, the content loses the
whitespace that follows ``</think>`` (an output with no block is its content unchanged). Only the first block
counts; tags after it stay in the content.
"""

from __future__ import annotations

from typing import Any

OPEN, CLOSE = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")


def check_parser(name: str | None) -> None:
    if name is not None and name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}: expected one of {', '.join(PARSERS)}")


def prompt_leaves_thinking_open(tokenizer: Any, prompt_ids: list[int], continued: str | None = None) -> bool:
    """Whether the output begins inside a think block: the prompt ends with ``<think>`` (a template that opens
    the block after the assistant's turn start); or, where the answer continues a message
    (``continue_final_message``, ``continued`` its text: ``""`` for one not the assistant's), that message begins
    with a block it did not close. A ``<think>`` anywhere else in
    the prompt (a user's question about the tag, an earlier turn) is text, not an open block."""
    if continued is not None:  # (the message the answer continues decides alone: the rule the output's block follows)
        head = continued.lstrip()
        return head.startswith(OPEN) and CLOSE not in head
    return tokenizer.decode(prompt_ids[-32:], skip_special_tokens=False).rstrip().endswith(OPEN)


def tags_survive_decoding(tokenizer: Any) -> bool:
    """Whether decoding with ``skip_special_tokens`` (the API's default) keeps the tags in the text the
    parser reads (a tokenizer that marks them special drops them, and then no block is ever seen)."""
    return all(tokenizer.decode(tokenizer.encode(tag, add_special_tokens=False), skip_special_tokens=True) == tag
               for tag in (OPEN, CLOSE))


def _held_tag_prefix(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag`` (held back until the next text)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """One choice's output split into thinking and content as its text comes (``feed`` each new piece of
    text, ``finish`` once at the end); the pieces joined equal :meth:`split` of the whole text.

    Text that may still turn into a tag (a ``<`` at the end, say), and whitespace that may turn out to sit
    before ``</think>``, is held back until the next piece decides it."""

    def __init__(self, parser: str, prompt_open: bool = False) -> None:
        check_parser(parser)
        self.thinks_first = parser == "deepseek_r1" or prompt_open  # output that opens no block: thinking?
        self.state = "start"  # start (nothing decided yet), thinking, content
        self.pending = ""
        self.thought = False  # some thinking sent (its leading whitespace is dropped until then)
        self.strip_content = False  # drop the content's leading whitespace (after </think>, until some is sent)
        self.saw_block = False

    def feed(self, text: str) -> tuple[str, str]:
        """The thinking and the content ``text`` adds that can be sent now."""
        self.pending += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """What was held back, once the output has ended."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        thinking, content = [], []
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(OPEN):
                    self.pending, self.state, self.saw_block = head[len(OPEN):], "thinking", True
                    continue
                if OPEN.startswith(head) and not final:  # (may still become <think>)
                    break
                self.state = "thinking" if self.thinks_first else "content"
                self.saw_block = self.thinks_first
                continue
            if self.state == "thinking":
                end = self.pending.find(CLOSE)
                if end >= 0:
                    thinking.append(self._thinking(self.pending[:end].rstrip()))
                    self.pending, self.state = self.pending[end + len(CLOSE):], "content"
                    self.strip_content = True
                    continue
                if final:
                    cut = len(self.pending.rstrip())
                else:  # hold a possible start of </think> and the whitespace before it
                    cut = len(self.pending[:len(self.pending) - _held_tag_prefix(self.pending, CLOSE)].rstrip())
                thinking.append(self._thinking(self.pending[:cut]))
                self.pending = self.pending[cut:] if not final else ""
                break
            piece = self.pending.lstrip() if self.strip_content else self.pending  # content: nothing more to parse
            self.pending = ""
            self.strip_content = self.strip_content and not piece
            content.append(piece)
            break
        return "".join(thinking), "".join(content)

    def _thinking(self, piece: str) -> str:
        if not self.thought:
            piece = piece.lstrip()
        self.thought = self.thought or bool(piece)
        return piece

    @classmethod
    def split(cls, parser: str, text: str, prompt_open: bool = False) -> tuple[str | None, str | None]:
        """A whole output's ``(reasoning, content)``: reasoning None where the output has no thinking; content
        None where a block left no answer after it (an output with neither is content ``""``)."""
        s = cls(parser, prompt_open)
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        reasoning, content = r1 + r2, c1 + c2
        if not reasoning and not s.saw_block:
            return None, content
        return reasoning or None, content or None
