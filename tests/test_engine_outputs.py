"""Output processing: min_tokens masks EOS and stop ids (as transformers does), stop strings are
found incrementally (linear decoding work) and exactly where the whole text has them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from zipage import LLM, SamplingParams
from zipage.engine.outputs import IncrementalText


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


PROMPT = [5, 9, 17, 33, 41, 2, 8]


def hf_tokens(model, max_new, **kw):
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=0, **kw)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("as_stop_id", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_like_transformers(model, as_stop_id):
    free = hf_tokens(model, 12)
    # make the token the model wants first an end token: without masking it is produced at once
    end = free[0]
    kw = dict(max_tokens=12, temperature=0, min_tokens=4)
    original = model.generation_config.eos_token_id
    if as_stop_id:  # the model's own EOS ends it too
        params, ends = SamplingParams(stop_token_ids=[end], **kw), [end, original]
    else:
        params, ends = SamplingParams(**kw), [end]
        model.generation_config.eos_token_id = end
    try:
        llm = LLM(model, budget=None, page_size=4, num_pages=32)
        got = llm.generate([PROMPT], params, use_tqdm=False)[0]
        ref = hf_tokens(model, 12, min_new_tokens=4, eos_token_id=ends)
    finally:
        model.generation_config.eos_token_id = original
    stops = [i for i, t in enumerate(ref) if t in ends]
    ref = ref[: stops[0] + 1] if stops else ref
    assert end not in got.token_ids[:4]
    assert got.token_ids == ref
    assert got.finish_reason == ("stop" if stops else "length")


class CountingTokenizer:
    """Token id t decodes to one letter; 0 is a special token (skipped). Counts decoding work."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t == 0))


def test_incremental_text_matches_the_whole_decode():
    tok = CountingTokenizer()
    text = IncrementalText()
    ids = []
    for t in [3, 0, 7, 7, 1, 0, 0, 25, 4] * 50:
        ids.append(t)
        text.add(tok, ids)
    assert text.text() == tok.decode(ids)
    assert text.tail(5) == tok.decode(ids)[-5:] and text.tail(0) == ""


def test_stop_strings_are_checked_in_linear_work_and_found_across_tokens(model):
    tok = CountingTokenizer()
    llm = LLM(model, tok, budget=None, page_size=8, num_pages=64)
    free = llm.generate([PROMPT], SamplingParams(max_tokens=300, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    whole = tok.decode(free.token_ids)
    # a stop string that starts in one token and ends two tokens later, first seen late in the text
    for start in range(len(whole) - 3, 150, -1):
        stop = whole[start : start + 3]
        if whole.find(stop) == start:
            break
    else:
        pytest.skip("no late, first-seen 3-letter string in this output")
    tok.decoded = 0
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True, stop=[stop, "never-there"])
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == whole[:start]
    # it stopped at the token that completed the stop string, not later
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])
    # linear: a few tokens decoded per token, plus the one whole decode at the end (n^2/2 before)
    n = len(out.token_ids)
    assert tok.decoded <= 8 * n, (tok.decoded, n)


class ByteTokenizer:
    """Tokens of byte strings, decoded as byte-level BPE decodes them (the bytes joined, each invalid byte run a
    U+FFFD). ``byte_fallback``: as Llama 2's byte-fallback decoder, a run of single-byte tokens that is not all
    valid UTF-8 comes out one U+FFFD per byte, the characters before its bad bytes included."""

    SPECIAL = 0

    def __init__(self, pieces: dict[int, bytes], byte_fallback: bool = False, sentencepiece: dict | None = None):
        self.pieces, self.byte_fallback, self.sentencepiece = pieces, byte_fallback, sentencepiece or {}
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        ids = [t for t in ids if not (t == self.SPECIAL and skip_special_tokens)]
        self.decoded += len(ids)
        if not self.byte_fallback:
            text = b"".join(self.pieces.get(t, b"<s>") for t in ids).decode("utf-8", errors="replace")
        else:
            text, run = "", b""
            for t in ids + [None]:
                piece = self.pieces.get(t, b"<s>") if t is not None else None
                if piece is not None and len(piece) == 1:
                    run += piece
                    continue
                try:
                    text += run.decode("utf-8")
                except UnicodeDecodeError:
                    text += "\ufffd" * len(run)
                run = b""
                text += piece.decode() if piece is not None else ""
        return text.removeprefix(" ") if ids and ids[0] in self.sentencepiece else text

    def convert_ids_to_tokens(self, token):
        return self.sentencepiece.get(token, "x")


def _process(tok, ids, prompt=(7,), **params):
    from zipage.engine.outputs import OutputProcessor
    from zipage.engine.sequence import Sequence

    seq = Sequence(request_id="0", prompt_token_ids=list(prompt), params=SamplingParams(**params))
    proc = OutputProcessor(tok, {ByteTokenizer.SPECIAL}, 1 << 20)
    reasons = [proc.append(seq, t) for t in ids]
    return seq, reasons, proc


def test_a_stop_string_before_a_last_token_ending_inside_a_character_cuts_the_text():
    """A last token holding a space and an emoji's first bytes adds no text token by token (its character is
    incomplete), so the incremental search never saw the stop string its space completes; the whole decode at
    the end shows it: the text is cut there and the request stopped, cut by max_tokens or followed by EOS."""
    tok = ByteTokenizer({1: b" Hello", 2: b" \xf0\x9f", 3: b"\x8d", 4: b"\xbd", 7: b"Q:"})
    seq, reasons, _ = _process(tok, [1, 2], max_tokens=2, stop=["o "])
    assert reasons[-1] == "stop" and seq.text == " Hell"
    seq, reasons, _ = _process(tok, [1, 2, 0], max_tokens=9, stop=["o "])
    assert reasons[-1] == "stop" and seq.text == " Hell"
    seq, reasons, _ = _process(tok, [1, 2], max_tokens=2, stop=["o "], include_stop_str_in_output=True)
    assert reasons[-1] == "stop" and seq.text == " Hello "
    seq, reasons, _ = _process(tok, [1, 2, 3, 4], max_tokens=4, stop=["zz"])  # (no stop string: as it was)
    assert reasons[-1] == "length" and seq.text == " Hello \U0001f37d"


def test_tokens_that_add_no_text_leave_the_decoding_window():
    """A run of skipped special tokens (EOS repeated under ignore_eos) costs a few tokens' decoding each, not
    the whole run again per token; the text is the whole decode's."""
    from zipage.engine.outputs import IncrementalText

    tok = CountingTokenizer()
    for n in (500, 2000):
        text, ids = IncrementalText([5, 6]), [3]
        tok.decoded = 0
        for _ in range(n):
            ids.append(0)
            text.add(tok, ids)
        ids.append(4)
        text.add(tok, ids)
        assert text.text() == tok.decode([5, 6] + ids)[2:] and tok.decoded <= 10 * n, (n, tok.decoded)


def test_skipped_special_tokens_and_bytes_that_are_no_utf8_keep_the_work_per_token_bounded():
    """A run of skipped special tokens with no text before it (an empty context), one after a character's
    first byte, and a run of bytes that never make a character (a continuation byte forced again and again):
    each costs a few tokens' decoding per token, and the text is the whole decode's."""
    from zipage.engine.outputs import IncrementalText

    class Specials(ByteTokenizer):
        all_special_ids = [ByteTokenizer.SPECIAL]

    tok = Specials({1: b"a", 2: b"\xe3", 3: b"\x81", 4: b"\x82", 5: b"\x80", 7: b"Q:"})
    for first, run, last in (([], 0, [1]), ([1, 2], 0, [3, 4]), ([1], 5, [1])):
        for n in (400, 1600):
            ids, text = [], IncrementalText()
            tok.decoded = 0
            for t in first + [run] * n + last:
                ids.append(t)
                text.add(tok, ids)
            assert text.text() == tok.decode(ids), (first, run)
            assert tok.decoded <= 40 * n, (first, run, n, tok.decoded)


def test_a_running_text_keeps_characters_a_byte_fallback_decoder_hides():
    """Llama 2's byte-fallback decoder turns a whole run of byte tokens into U+FFFD while its last character is
    incomplete: a running output's text still only grows, keeping the characters before that one."""
    chars = "語の".encode()
    tok = ByteTokenizer({1: b" there", 7: b"Q:", **{10 + i: bytes([b]) for i, b in enumerate(chars)}},
                        byte_fallback=True)
    ids = [1] + [10 + i for i in range(len(chars))]
    from zipage.engine.outputs import OutputProcessor
    from zipage.engine.sequence import Sequence

    seq = Sequence(request_id="0", prompt_token_ids=[7], params=SamplingParams())
    texts = [OutputProcessor(tok, set(), 64).partial_text(seq, ids[:n]) for n in range(1, len(ids) + 1)]
    assert texts == [" there"] * 3 + [" there語"] * 3 + [" there語の"]


def test_text_offsets_of_tokens_completing_a_character_after_a_space():
    """``text_offset`` of a token that completes a character is where that character starts, after the space
    the token before carried with the character's first bytes (a Korean word in byte-level tokens)."""
    from zipage.serve.choices import ChoiceState

    word = " 텍스".encode()  # a space, then 3 + 3 bytes
    tok = ByteTokenizer({1: b" a", 2: word[:3], 3: word[3:5], 4: word[5:6], 5: word[6:], 7: b"Q:"})
    state = ChoiceState(tok, [], prompt_ids=[7])
    state.token_ids = [1, 2, 3, 4, 5]
    assert tok.decode(state.token_ids) == " a 텍스"
    assert state.offsets(0) == [0, 2, 3, 4, 4]


def test_logprob_token_strings_keep_a_sentencepiece_word_s_space():
    """A ``▁word`` token decoded alone loses its space (SentencePiece's decoder strips the first one): its
    log-probability string keeps it, so the tokens' strings and bytes join into the text."""
    from zipage.serve.choices import TokenStrings

    tok = ByteTokenizer({1: b" w7", 2: b" w12"}, sentencepiece={1: "\u2581w7", 2: "\u2581w12"})
    strings = TokenStrings(tok)
    assert tok.decode([1]) == "w7" and [strings(1), strings(2)] == [" w7", " w12"]
    assert strings.bytes(1) + strings.bytes(2) == " w7 w12".encode()


def test_an_output_cut_inside_a_byte_fallback_character_keeps_what_was_streamed():
    """Cut by max_tokens after the first byte of a character, a byte-fallback decoder turns the whole byte run
    into U+FFFD; the final text keeps the characters before it (the stream sent them), then one U+FFFD, and
    the streamed pieces join into it."""
    from zipage.serve.choices import ChoiceState
    from zipage.serve.engine_client import Delta

    chars = "語の".encode()
    tok = ByteTokenizer({1: b" there", 7: b"Q:", **{10 + i: bytes([b]) for i, b in enumerate(chars)}},
                        byte_fallback=True)
    ids = [1] + [10 + i for i in range(4)]  # 語, then the first byte of の
    seq, reasons, _ = _process(tok, ids, max_tokens=4 + 1)
    assert reasons[-1] == "length" and seq.text == " there語\ufffd"
    state = ChoiceState(tok, [], prompt_ids=[7])
    sent = "".join(state.add(Delta(0, [t], None, None)) for t in ids)
    sent += state.add(Delta(0, [], None, "length", seq.text))
    assert sent == seq.text


def test_logprob_strings_of_a_token_of_several_sentencepiece_spaces():
    from zipage.serve.choices import TokenStrings

    class Strip(ByteTokenizer):
        def decode(self, ids, skip_special_tokens=True):  # (the first space of a decode dropped, as SentencePiece)
            return super().decode(ids, skip_special_tokens).removeprefix(" ")

    tok = Strip({1: b"    ", 2: b" return"}, sentencepiece={1: "\u2581" * 4, 2: "\u2581return"})
    strings = TokenStrings(tok)
    assert [strings(1), strings(2)] == ["    ", " return"]
