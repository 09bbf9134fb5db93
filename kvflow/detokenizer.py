"""Incremental detokenization for streaming, with stop-string handling.

Decoding token by token is wrong in two ways: a token alone may lose its leading space
(SentencePiece / byte-level decoders strip it at the start of a sequence), and a multi-byte
UTF-8 character may be split across tokens. So we decode a small window of earlier tokens plus
the new ones and emit only the text past the window's own decoding ("prefix/read offsets"),
holding back any text that still ends in an incomplete character ("\\ufffd").

Stop strings are matched on the accumulated text. Text that might be the start of a stop string
is held back from the deltas until it either completes the match (and is cut) or stops matching.
"""

# How many prompt tokens to decode as context before the first output token.
INITIAL_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas.

    `step(ids)` returns (delta, matched_stop_or_None). Call `flush()` when the sequence ends for
    another reason (EOS, length) to release held-back text. Invariants: the concatenated deltas
    always equal `.text`; after `flush()` (and with no stop string matched) `.text` equals
    `tokenizer.decode(output_token_ids)` for byte-level tokenizers.
    """

    def __init__(self, tokenizer, prompt_token_ids, skip_special_tokens: bool = True,
                 stop: list[str] | tuple[str, ...] = (), include_stop_str_in_output: bool = False):
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self._ids: list[int] = [int(i) for i in prompt_token_ids]
        self._num_prompt = len(self._ids)
        self._prefix_offset = max(self._num_prompt - INITIAL_CONTEXT_TOKENS, 0)
        self._read_offset = self._num_prompt
        self._text = ""          # decoded output text (cut at the stop string once matched)
        self._emitted = 0        # chars of self._text already returned as deltas
        self.stop_reason: str | None = None  # the stop string that matched, if any
        self.finished = False

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_prompt:]

    @property
    def text(self) -> str:
        """All output text returned so far (held-back text is added by the next delta/flush)."""
        return self._text[:self._emitted]

    @property
    def pending_text(self) -> str:
        """Decoded text held back because it may be the beginning of a stop string."""
        return self._text[self._emitted:]

    def step(self, new_token_ids) -> tuple[str, str | None]:
        if self.finished:
            raise RuntimeError("IncrementalDetokenizer.step() called after the sequence finished "
                               f"(stop string {self.stop_reason!r} matched or flush() called)")
        if isinstance(new_token_ids, int):
            new_token_ids = [new_token_ids]
        self._ids.extend(int(i) for i in new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The sequence ended (EOS / length): return everything still held back."""
        if self.finished:
            return ""
        delta, _ = self._advance(final=True)
        self.finished = True
        return delta

    # ---- internals -------------------------------------------------------------------
    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> tuple[str, str | None]:
        new_text = self._read_new_text(final)
        if new_text:
            self._text += new_text
            matched = self._find_stop(len(new_text))
            if matched is not None:
                self.stop_reason, self.finished = matched, True
                return self._emit(hold=0), matched
        hold = 0 if final else self._partial_stop_len()
        return self._emit(hold), None

    def _read_new_text(self, final: bool) -> str:
        """Text contributed by tokens past read_offset, decoded in context (prefix/read offsets)."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: keep the context window as it is
        if full_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # incomplete UTF-8 character: wait for the bytes still to come
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]

    def _find_stop(self, num_new: int) -> str | None:
        """Search the tail that could hold a new match; cut the text there. Earliest match wins."""
        if not self.stop:
            return None
        start = max(len(self._text) - num_new - self._max_stop_len + 1, 0)
        best = None  # (index, -len, stop)
        for s in self.stop:
            idx = self._text.find(s, start)
            if idx != -1 and (best is None or (idx, -len(s)) < best[:2]):
                best = (idx, -len(s), s)
        if best is None:
            return None
        idx, _, s = best
        cut = idx + len(s) if self.include_stop_str_in_output else idx
        self._text = self._text[:max(cut, self._emitted)]
        return s

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _emit(self, hold: int) -> str:
        end = max(len(self._text) - hold, self._emitted)
        delta = self._text[self._emitted:end]
        self._emitted = end
        return delta
