"""Incremental detokenization: token ids in, text that is safe to stream out.

Why not decode each token alone: tokenizers render a token differently in context (sentencepiece
drops the leading space of the first token it decodes; a multi-byte character can be split over
several byte-level tokens). Why not re-decode the whole output each step: that is O(n) per token.
So, as vLLM does, each step decodes a short window -- the tokens already emitted since the last
step (the "prefix") plus the new ones -- and emits what the new tokens added to the prefix's
text. The window starts on a few prompt tokens so the first output token is also decoded in
context. Work per token is bounded by the window, not by the output length.

Text is held back, never retracted:

- while the window's text ends in U+FFFD, the last character is incomplete: wait for more tokens;
- with stop strings, the last ``max(len(stop)) - 1`` characters could be the start of a stop
  string, so they are not emitted until that is ruled out. (With ``include_stop_str_in_output``
  nothing is held back: every emitted character stays in the output whether or not a stop string
  follows.)

When a stop string appears, the text ends right before it (or right after it, with
``include_stop_str_in_output``), ``stop_matched`` names it and later tokens are ignored.
``flush()`` releases what is held back when the request finishes for another reason. The deltas
returned by ``add_tokens`` and ``flush`` always concatenate to ``output_text``.
"""

from __future__ import annotations

# Prompt tokens decoded ahead of the first output token, for context (vLLM uses the same number).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] = (), include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_matched: str | None = None
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._hold_back = 0 if include_stop_str_in_output else max(self._max_stop_len - 1, 0)

        # The window: _token_ids[:_read_offset] (the prefix) has been turned into text already,
        # _prefix_text; _token_ids[_read_offset:] has not.
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        prefix_text = self._decode(context)
        if prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: its remaining bytes belong to the output and
            # would be mis-attributed by the diff, so decode without context, as decode() would.
            context, prefix_text = [], ""
        self._token_ids = context
        self._read_offset = len(context)
        self._prefix_text = prefix_text

        self._text = ""  # all output text decoded so far, cut at a stop string if one matched
        self._num_emitted = 0  # characters of _text already returned

    @property
    def output_text(self) -> str:
        """The text emitted so far: every delta returned by ``add_tokens`` and ``flush``, joined."""
        return self._text[: self._num_emitted]

    def add_tokens(self, token_ids: list[int]) -> str:
        """Take newly generated tokens; return the new text that is safe to emit (maybe "")."""
        if self.stop_matched is not None or not token_ids:
            return ""
        self._token_ids.extend(token_ids)
        self._decode_window(final=False)
        return self._emit(final=self.stop_matched is not None)

    def flush(self) -> str:
        """The request ended for another reason: release everything held back (incomplete
        characters included, as ``tokenizer.decode`` would render them)."""
        if self.stop_matched is None:
            self._decode_window(final=True)
        return self._emit(final=True)

    # ---- internals -------------------------------------------------------------------------------

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_window(self, final: bool) -> None:
        if self._read_offset == len(self._token_ids):
            return
        window_text = self._decode(self._token_ids)
        if window_text.endswith(_REPLACEMENT_CHAR) and not final:
            return  # a character split across tokens: wait until its last byte arrives
        new_text = window_text[len(self._prefix_text):]
        # Slide the window: the tokens just decoded become the next step's context; older ones
        # are dropped, which keeps each decode as short as one step's tokens plus that context.
        del self._token_ids[: self._read_offset]
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids)
        self._append_text(new_text)

    def _append_text(self, new_text: str) -> None:
        # Only a match that ends inside the new text is new: start searching just early enough
        # to catch a stop string that began in the old text.
        search_from = max(len(self._text) - self._max_stop_len + 1, 0)
        self._text += new_text
        if not self.stop:
            return
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self._text.find(s, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            at, s = best
            self.stop_matched = s
            self._text = self._text[: at + len(s) if self.include_stop_str_in_output else at]

    def _emit(self, final: bool) -> str:
        end = len(self._text) if final else max(len(self._text) - self._hold_back, self._num_emitted)
        delta = self._text[self._num_emitted:end]
        self._num_emitted = end
        return delta
