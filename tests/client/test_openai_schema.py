"""The host's wire helpers: stop strings cut exactly, however the text is split into pieces."""

from __future__ import annotations

import pytest

from seqr_client.openai_schema import ApiError, ChatRequest, CompletionRequest, StopFilter, parse

TEXT = "Hello world. END of text\n\nmore"


@pytest.mark.parametrize("stops, want", [
    ([], TEXT), (["END"], "Hello world. "), (["\n\n"], "Hello world. END of text"), (["x"], "Hello world. END of te"),
    (["zzz"], TEXT), (["world", "Hello"], ""), (["of", "END"], "Hello world. "), (["more"], "Hello world. END of text\n\n"),
])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_stop_filter_cuts_before_the_first_stop_whatever_the_pieces(stops, want, size):
    f = StopFilter(stops)
    out = "".join(f.feed(TEXT[i:i + size]) for i in range(0, len(TEXT), size)) + f.flush()
    assert out == want
    assert f.stopped == (want != TEXT)


def test_requests_take_what_openai_clients_send_and_refuse_what_changes_the_answer():
    ok = parse(ChatRequest, {"model": "seqr", "messages": [{"role": "developer", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "user": "u-1", "metadata": {"k": "v"},
        "logprobs": False, "n": 1, "presence_penalty": 0})
    assert ok.chat() == [{"role": "system", "content": "ab"}]
    assert parse(CompletionRequest, {"model": "m", "prompt": ["x"], "stop": "\n"}).stops() == ["\n"]
    for field, value in [("logprobs", True), ("echo", True), ("best_of", 3), ("presence_penalty", 0.5),
                         ("response_format", {"type": "json_object"})]:
        doc = {"model": "m", "prompt": "x", field: value}
        with pytest.raises(ApiError) as ei:
            parse(CompletionRequest, doc)
        assert ei.value.status == 400 and ei.value.param == field and ei.value.code == "unsupported_parameter"
