"""The LLM engine against an in-process OpenAI-compatible emulator (httpx.MockTransport)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from mayak.nlu import Example, LinearEngine, LlmEngine, Parse, build_engine

EXAMPLES = [
    Example("I want to book a service", "book_service"),
    Example("schedule maintenance for my car", "book_service"),
    Example("book an oil change", "book_service"),
    Example("book a tyre change", "book_service"),
    Example("what are your opening hours", "opening_hours"),
    Example("when are you open", "opening_hours"),
    Example("are you open on sunday", "opening_hours"),
    Example("hello", "greeting"),
    Example("hi there", "greeting"),
    Example("good morning", "greeting"),
]


class Emulator:
    """A fake /v1/chat/completions: answers by keyword, or misbehaves as told."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []
        self.urls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        self.headers.append(request.headers)
        body = json.loads(request.content)
        self.requests.append(body)
        if self.mode == "timeout":
            raise httpx.ReadTimeout("the model is thinking", request=request)
        if self.mode == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if self.mode == "500":
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        if self.mode == "401":
            return httpx.Response(401, json={"error": {"message": "bad key"}})
        if self.mode == "envelope":
            return httpx.Response(200, text="<html>proxy error</html>")
        if self.mode == "no_choices":
            return httpx.Response(200, json={"choices": []})
        text = body["messages"][-1]["content"].lower()
        content = self.content(text)
        return httpx.Response(
            200,
            json={
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            },
        )

    def content(self, text: str) -> str:
        if self.mode == "malformed":
            return '{"intent": "book_service", "confidence": 0.9'  # cut off
        if self.mode == "prose":
            return "Sure! The intent is book_service."
        if self.mode == "unknown_intent":
            return json.dumps({"intent": "order_pizza", "confidence": 0.9, "slots": {}})
        if self.mode == "bad_confidence":
            return json.dumps({"intent": "greeting", "confidence": 1.7, "slots": {}})
        if self.mode == "bool_confidence":
            return json.dumps({"intent": "greeting", "confidence": True, "slots": {}})
        if self.mode == "list":
            return json.dumps(["greeting"])
        if self.mode == "fenced":
            return '```json\n{"intent": "greeting", "confidence": 0.8, "slots": {}}\n```'
        if "book" in text or "service" in text:
            slots: dict[str, Any] = {"car_model": "Camry"} if "camry" in text else {}
            if "friday" in text:
                slots["day"] = "Friday"
            return json.dumps({"intent": "book_service", "confidence": 0.92, "slots": slots})
        if "open" in text:
            return json.dumps({"intent": "opening_hours", "confidence": 0.88, "slots": {}})
        if "hello" in text or "hi" in text.split():
            return json.dumps({"intent": "greeting", "confidence": 0.95, "slots": {}})
        return json.dumps({"intent": None, "confidence": 0.3, "slots": {}})


@pytest.fixture
def emulator() -> Emulator:
    return Emulator()


@pytest.fixture
def make_engine(emulator: Emulator) -> Callable[..., LlmEngine]:
    def make(**kw: Any) -> LlmEngine:
        options: dict[str, Any] = {
            "base_url": "http://llm.test/v1",
            "model": "test-model",
            "api_key": "sk-test",
            "timeout": 2.0,
            "transport": httpx.MockTransport(emulator),
            "region": "US",
        }
        options.update(kw)
        engine = LlmEngine(**options)
        engine.train(EXAMPLES)
        return engine

    return make


def test_classifies_through_the_endpoint(make_engine: Callable[..., LlmEngine], emulator: Emulator) -> None:
    engine = make_engine()
    parse = engine.parse("Can I book a service for my Camry on Friday? Call +1 415 555 2671")
    assert parse.intent is not None
    assert (parse.intent.name, parse.intent.confidence) == ("book_service", 0.92)
    assert engine.last_error is None
    by_type = {e.type: e for e in parse.entities}
    assert by_type["car_model"].value == "Camry" and by_type["car_model"].text == "Camry"
    assert by_type["phone"].value == "+14155552671"
    # "Friday" is both a rule-based date and an LLM slot: the rule-based one is kept, with its span
    assert "day" not in by_type and by_type["date"].text.endswith("Friday")
    assert [e.start for e in parse.entities] == sorted(e.start for e in parse.entities)


def test_request_shape(make_engine: Callable[..., LlmEngine], emulator: Emulator) -> None:
    make_engine().parse("hello")
    assert emulator.urls == ["http://llm.test/v1/chat/completions"]
    assert emulator.headers[0]["authorization"] == "Bearer sk-test"
    body = emulator.requests[0]
    assert body["model"] == "test-model" and body["temperature"] == 0.0
    system, user = body["messages"]
    assert user == {"role": "user", "content": "hello"}
    assert "- book_service" in system["content"] and '"schedule maintenance for my car"' in system["content"]
    assert "book a tyre change" not in system["content"]  # examples_per_intent=3
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    schema = fmt["json_schema"]["schema"]
    assert schema["properties"]["intent"]["anyOf"][0]["enum"] == ["book_service", "opening_hours", "greeting"]
    assert schema["required"] == ["intent", "confidence", "slots"]


def test_declared_slots_make_a_strict_schema(
    make_engine: Callable[..., LlmEngine], emulator: Emulator
) -> None:
    make_engine(slots=["car_model", "day"], response_format="json_schema").parse("book a camry service")
    fmt = emulator.requests[0]["response_format"]["json_schema"]
    assert fmt["strict"] is True
    assert fmt["schema"]["properties"]["slots"]["required"] == ["car_model", "day"]


def test_json_object_and_no_response_format(
    make_engine: Callable[..., LlmEngine], emulator: Emulator
) -> None:
    make_engine(response_format="json_object").parse("hello")
    make_engine(response_format="none").parse("hello")
    assert emulator.requests[0]["response_format"] == {"type": "json_object"}
    assert "response_format" not in emulator.requests[1]


def test_null_intent_is_an_answer_not_a_failure(make_engine: Callable[..., LlmEngine]) -> None:
    fallback = LinearEngine()
    engine = make_engine(fallback=fallback)
    parse = engine.parse("what is the meaning of life")
    assert parse.intents == [] and parse.intent is None
    assert engine.last_error is None


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("timeout", "timeout"),
        ("connect", "transport error"),
        ("500", "http status 503"),
        ("401", "http status 401"),
        ("envelope", "invalid JSON"),
        ("no_choices", "invalid answer"),
        ("malformed", "invalid JSON"),
        ("prose", "invalid JSON"),
        ("unknown_intent", "unknown intent"),
        ("bad_confidence", "confidence"),
        ("bool_confidence", "confidence"),
        ("list", "not a JSON object"),
    ],
)
def test_failures_fall_back(
    make_engine: Callable[..., LlmEngine], emulator: Emulator, mode: str, reason: str
) -> None:
    fallback = LinearEngine()
    engine = make_engine(fallback=fallback)  # trained together with the LLM engine
    emulator.mode = mode
    parse = engine.parse("hello")
    assert engine.last_error is not None and reason in engine.last_error
    assert parse.intent is not None and parse.intent.name == "greeting"
    assert parse == fallback.parse("hello")


@pytest.mark.parametrize("mode", ["timeout", "500", "malformed"])
def test_failures_without_fallback_give_an_empty_parse(
    make_engine: Callable[..., LlmEngine], emulator: Emulator, mode: str
) -> None:
    engine = make_engine()
    emulator.mode = mode
    assert engine.parse("hello") == Parse(text="hello")


def test_a_real_timeout_on_a_silent_server() -> None:
    """A local server that accepts the connection and never answers: httpx's timeout fires."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)  # read nothing, answer nothing
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        engine = LlmEngine(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout=0.2)
        engine.train(EXAMPLES)
        t0 = time.perf_counter()
        assert engine.parse("hello") == Parse(text="hello")
        assert time.perf_counter() - t0 < 2.0
        assert engine.last_error is not None and engine.last_error.startswith("timeout")
        engine.close()
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_fenced_json_is_accepted(make_engine: Callable[..., LlmEngine], emulator: Emulator) -> None:
    emulator.mode = "fenced"
    parse = make_engine().parse("hello")
    assert parse.intent is not None and parse.intent.name == "greeting"


def test_untrained_engine_does_not_raise(emulator: Emulator) -> None:
    engine = LlmEngine(base_url="http://llm.test/v1", model="m", transport=httpx.MockTransport(emulator))
    assert engine.parse("hello") == Parse(text="hello")
    assert emulator.requests == []  # nothing to ask about


def test_a_broken_fallback_does_not_raise_either(
    make_engine: Callable[..., LlmEngine], emulator: Emulator
) -> None:
    engine = make_engine(fallback=LinearEngine(), train_fallback=False)  # never trained
    emulator.mode = "500"
    assert engine.parse("hello") == Parse(text="hello")


def test_descriptions_add_intents_without_examples(
    make_engine: Callable[..., LlmEngine], emulator: Emulator
) -> None:
    engine = make_engine(intent_descriptions={"talk_to_human": "the customer wants a person"})
    engine.parse("hello")
    assert "- talk_to_human: the customer wants a person" in emulator.requests[0]["messages"][0]["content"]
    assert "talk_to_human" in engine.intents


def test_client_injection_and_base_url_forms(emulator: Emulator) -> None:
    client = httpx.Client(transport=httpx.MockTransport(emulator))
    with LlmEngine(base_url="http://llm.test/v1/chat/completions/", model="m", client=client) as engine:
        engine.train(EXAMPLES)
        engine.parse("hello")
    assert emulator.urls == ["http://llm.test/v1/chat/completions"]
    assert not client.is_closed  # an injected client belongs to the caller
    client.close()


def test_bad_configuration() -> None:
    with pytest.raises(ValueError):
        LlmEngine(base_url="", model="m")
    with pytest.raises(ValueError):
        LlmEngine(base_url="http://x/v1", model="")
    with pytest.raises(ValueError):
        LlmEngine(base_url="http://x/v1", model="m", timeout=0)


def test_factory_builds_an_llm_engine_with_a_linear_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_LLM_KEY", "sk-from-env")
    engine = build_engine(
        {
            "engine": "llm",
            "base_url": "http://llm.test/v1",
            "model": "m",
            "api_key_env": "DEMO_LLM_KEY",
            "timeout": 3,
        }
    )
    assert isinstance(engine, LlmEngine)
    assert isinstance(engine.fallback, LinearEngine)
    assert engine.timeout == 3.0
    assert engine._headers["Authorization"] == "Bearer sk-from-env"
    none = build_engine({"engine": "llm", "base_url": "http://llm.test/v1", "model": "m", "fallback": None})
    assert isinstance(none, LlmEngine) and none.fallback is None
    with pytest.raises(ValueError, match="base_url"):
        build_engine({"engine": "llm", "model": "m"})
