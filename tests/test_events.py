from datetime import UTC, datetime

import pytest

from exporter.events import (
    Handoff,
    IntegrationCall,
    Interaction,
    LlmCall,
    Rejected,
    TaskResult,
    ToolCall,
    decode_line,
    encode_event,
)

GOOD = [
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"success"}', TaskResult),
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"escalated",'
     b'"duration_ms":12.5,"retries":2,"task_id":7,"workflow":"w","ts":"2026-11-25T10:00:00+02:00"}',
     TaskResult),
    (b'{"event":"llm_call","agent":"a","model":"m","input_tokens":10,"output_tokens":2,'
     b'"cost_usd":0.001,"ts":1764000000}', LlmCall),
    (b'{"event":"tool_call","agent":"a","tool":"crm.search","outcome":"failure"}', ToolCall),
    (b'{"event":"handoff","from_agent":"a","to_agent":"b","task_id":"x-1"}', Handoff),
    (b'{"event":"integration_call","platform":"p","operation":"o","status":"timeout"}',
     IntegrationCall),
    (b'{"event":"integration_call","platform":"p","operation":"o","status":503}', IntegrationCall),
    (b'{"event":"interaction","channel":"web","type":"feedback","user":"u","rating":5}',
     Interaction),
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"success","extra":[1,2]}',
     TaskResult),
]


@pytest.mark.parametrize(("line", "kind"), GOOD)
def test_good_lines_decode(line: bytes, kind: type) -> None:
    ev = decode_line(line)
    assert isinstance(ev, kind)
    assert decode_line(encode_event(ev)) == ev  # type: ignore[arg-type]


def test_timestamps() -> None:
    ev = decode_line(GOOD[1][0])
    assert isinstance(ev, TaskResult)
    # 10:00 at +02:00 is 08:00 UTC.
    assert ev.epoch() == datetime(2026, 11, 25, 8, 0, tzinfo=UTC).timestamp()
    ev = decode_line(GOOD[2][0])
    assert isinstance(ev, LlmCall) and ev.epoch() == 1764000000
    assert isinstance(decode_line(GOOD[0][0]), TaskResult)


BAD = [
    (b'{"event":"task_result","agent":"\xff\xfe","task_type":"t","outcome":"success"}',
     "invalid_utf8", "UTF-8"),
    (b"\xc3\x28", "invalid_utf8", "UTF-8"),
    (b'{"event":"task_result",', "invalid_json", "truncated"),
    (b"not json", "invalid_json", "malformed"),
    (b"[1,2]", "not_object", "Expected `object`, got `array`"),
    (b'"text"', "not_object", "got `str`"),
    (b'{"event":"coffee_break"}', "unknown_event", "`$.event`"),
    (b'{"agent":"a"}', "missing_field", "`event`"),
    (b'{"event":"task_result","agent":"a","task_type":"t"}', "missing_field", "`outcome`"),
    (b'{"event":"task_result","agent":1,"task_type":"t","outcome":"success"}', "wrong_type",
     "`$.agent`"),
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"success","retries":true}',
     "wrong_type", "`$.retries`"),
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"won"}', "out_of_range",
     "`$.outcome`"),
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"success","duration_ms":-1}',
     "out_of_range", "`$.duration_ms`"),
    (b'{"event":"llm_call","agent":"a","model":"m","cost_usd":-0.5}', "out_of_range",
     "`$.cost_usd`"),
    (b'{"event":"llm_call","agent":"a","model":"m","input_tokens":-3}', "out_of_range",
     "`$.input_tokens`"),
    (b'{"event":"interaction","channel":"web","type":"message","rating":6}', "out_of_range",
     "`$.rating`"),
    (b'{"event":"interaction","channel":"web","type":"shout"}', "out_of_range", "`$.type`"),
    (b'{"event":"integration_call","platform":"p","operation":"o","status":700}',
     "out_of_range", "`$.status`"),
    (b'{"event":"task_result","agent":"","task_type":"t","outcome":"success"}', "out_of_range",
     "`$.agent`"),
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"success",'
     b'"ts":"2026-11-25T10:00:00"}', "wrong_type", "timezone"),
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"success","duration_ms":1e999}',
     "out_of_range", "`$.duration_ms`"),
    # Finite but past the bounds: two of them would sum to +Inf.
    (b'{"event":"llm_call","agent":"a","model":"m","cost_usd":1.7e308}', "out_of_range",
     "`$.cost_usd`"),
    (b'{"event":"llm_call","agent":"a","model":"m","cost_usd":1000000.01}', "out_of_range",
     "`$.cost_usd`"),
    (b'{"event":"tool_call","agent":"a","tool":"t","duration_ms":31536000001}', "out_of_range",
     "`$.duration_ms`"),
    (b'{"event":"llm_call","agent":"a","model":"m","output_tokens":1000000001}', "out_of_range",
     "`$.output_tokens`"),
    (b'{"event":"task_result","agent":"a","task_type":"t","outcome":"success",'
     b'"retries":1000000001}', "out_of_range", "`$.retries`"),
]


def test_values_at_their_bounds_are_accepted() -> None:
    ev = decode_line(b'{"event":"llm_call","agent":"a","model":"m","cost_usd":1000000,'
                     b'"duration_ms":31536000000,"input_tokens":1000000000}')
    assert not isinstance(ev, Rejected)


@pytest.mark.parametrize(("line", "reason", "detail"), BAD)
def test_bad_lines_are_rejected_with_reason(line: bytes, reason: str, detail: str) -> None:
    rej = decode_line(line)
    assert isinstance(rej, Rejected)
    assert rej.reason == reason
    assert detail in rej.detail



def test_ts_far_ahead_of_the_clock_is_out_of_range() -> None:
    now = 1_764_000_000.0
    ms = b'{"event":"handoff","from_agent":"a","to_agent":"b","ts":1764000000000}'
    rej = decode_line(ms, now=now)
    assert isinstance(rej, Rejected) and rej.reason == "out_of_range"
    assert "`$.ts`" in rej.detail and "milliseconds" in rej.detail
    rej = decode_line(b'{"event":"handoff","from_agent":"a","to_agent":"b",'
                      b'"ts":"2025-11-27T00:00:00Z"}', now=now)
    assert isinstance(rej, Rejected) and rej.reason == "out_of_range" and "`$.ts`" in rej.detail
    # A writer's clock a little ahead is no error.
    ok = decode_line(b'{"event":"handoff","from_agent":"a","to_agent":"b","ts":1764080000}',
                     now=now)
    assert isinstance(ok, Handoff)
    # The push source validates with decode_line and the wall clock.
    assert isinstance(decode_line(ms), Rejected)
