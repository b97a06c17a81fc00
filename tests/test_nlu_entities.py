"""Rule-based entities in English and Russian, resolved against a fixed reference time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mayak.nlu import extract_entities

NOW = datetime(2026, 3, 11, 12, 0)  # a Wednesday, taken as wall time in TZ
TZ = "Europe/Moscow"  # +03:00, no DST


def found(text: str, region: str | None = "RU") -> list[tuple[str, Any, str]]:
    entities = extract_entities(text, now=NOW, tz=TZ, region=region)
    for e in entities:
        assert text[e.start : e.end] == e.text
    return [(e.type, e.value, e.text) for e in entities]


def only(text: str, region: str | None = "RU") -> tuple[str, Any, str]:
    entities = found(text, region)
    assert len(entities) == 1, entities
    return entities[0]


NUMBERS = [
    # English
    ("I need 3 tyres", 3, "3"),
    ("the budget is 1 500", 1500, "1 500"),
    ("about 2.5 litres", 2.5, "2.5"),
    ("1,500 miles", 1500, "1,500"),
    ("twenty one", 21, "twenty one"),
    ("there are seven of us", 7, "seven"),
    ("one hundred and five", 105, "one hundred and five"),
    ("twenty", 20, "twenty"),
    ("-5 degrees outside", -5, "-5"),
    # Russian
    ("нужно 4 колеса", 4, "4"),
    ("пробег 120 000", 120000, "120 000"),
    ("объём 2,5 литра", 2.5, "2,5"),
    ("двадцать пять", 25, "двадцать пять"),
    ("нас будет трое, нет, пятеро: пять", 5, "пять"),
    ("сто двадцать три", 123, "сто двадцать три"),
    ("двадцать", 20, "двадцать"),
    ("пробег 5 тыс.", 5000, "5 тыс."),
]


@pytest.mark.parametrize(("text", "value", "span"), NUMBERS)
def test_numbers(text: str, value: float, span: str) -> None:
    assert only(text) == ("number", value, span)


def test_number_values_keep_their_type() -> None:
    assert isinstance(only("3")[1], int)
    assert isinstance(only("2.5")[1], float)


DATES = [
    # English
    ("can I come tomorrow", "2026-03-12", "tomorrow"),
    ("today works", "2026-03-11", "today"),
    ("the day after tomorrow", "2026-03-13", "the day after tomorrow"),
    ("next Monday", "2026-03-16", "next Monday"),
    ("next Friday", "2026-03-20", "next Friday"),
    ("on Friday", "2026-03-13", "on Friday"),
    ("see you Wednesday", "2026-03-18", "Wednesday"),
    ("this Wednesday", "2026-03-11", "this Wednesday"),
    ("March 15", "2026-03-15", "March 15"),
    ("on the 15th of March", "2026-03-15", "the 15th of March"),
    ("March 1", "2027-03-01", "March 1"),  # already past this year
    ("Dec 24, 2026", "2026-12-24", "Dec 24, 2026"),
    ("2026-12-01", "2026-12-01", "2026-12-01"),
    ("in 3 days", "2026-03-14", "in 3 days"),
    ("in a week", "2026-03-18", "in a week"),
    ("last Saturday", "2026-03-07", "last Saturday"),
    ("2 weeks ago", "2026-02-25", "2 weeks ago"),
    ("a week ago", "2026-03-04", "a week ago"),
    # Russian
    ("завтра", "2026-03-12", "завтра"),
    ("послезавтра", "2026-03-13", "послезавтра"),
    ("вчера", "2026-03-10", "вчера"),
    ("в пятницу", "2026-03-13", "в пятницу"),
    ("в среду", "2026-03-18", "в среду"),
    ("в следующий понедельник", "2026-03-16", "в следующий понедельник"),
    ("в следующую пятницу", "2026-03-20", "в следующую пятницу"),
    ("15 марта", "2026-03-15", "15 марта"),
    ("на 1 мая 2027 года", "2027-05-01", "1 мая 2027 года"),
    ("01.12.2026", "2026-12-01", "01.12.2026"),
    ("через 3 дня", "2026-03-14", "через 3 дня"),
    ("через неделю", "2026-03-18", "через неделю"),
    ("через месяц", "2026-04-11", "через месяц"),
    ("в прошлую пятницу", "2026-03-06", "в прошлую пятницу"),
    ("3 дня назад", "2026-03-08", "3 дня назад"),
    ("неделю назад", "2026-03-04", "неделю назад"),
]


@pytest.mark.parametrize(("text", "value", "span"), DATES)
def test_dates(text: str, value: str, span: str) -> None:
    assert only(text) == ("date", value, span)


TIMES = [
    ("10:30", "10:30", "10:30"),
    ("at 3 pm", "15:00", "at 3 pm"),
    ("at 3:30 p.m.", "15:30", "at 3:30 p.m."),
    ("11am works", "11:00", "11am"),
    ("at 12 am", "00:00", "at 12 am"),
    ("at five o'clock", "05:00", "at five o'clock"),
    ("at noon", "12:00", "at noon"),
    ("come at 9.", "09:00", "at 9"),
    ("в 15:30", "15:30", "в 15:30"),
    ("в 10 утра", "10:00", "в 10 утра"),
    ("в 7 вечера", "19:00", "в 7 вечера"),
    ("в 2 часа дня", "14:00", "в 2 часа дня"),
    ("в 3 ночи", "03:00", "в 3 ночи"),
    ("в десять утра", "10:00", "в десять утра"),
    ("к 9 часам", "09:00", "к 9 часам"),
    ("в полдень", "12:00", "в полдень"),
]


@pytest.mark.parametrize(("text", "value", "span"), TIMES)
def test_times(text: str, value: str, span: str) -> None:
    assert only(text) == ("time", value, span)


DATETIMES = [
    ("tomorrow at 10", "2026-03-12T10:00:00+03:00", "tomorrow at 10"),
    ("today at 3 pm", "2026-03-11T15:00:00+03:00", "today at 3 pm"),
    ("at 9 on Friday", "2026-03-13T09:00:00+03:00", "at 9 on Friday"),
    ("March 15th at 3:30 pm", "2026-03-15T15:30:00+03:00", "March 15th at 3:30 pm"),
    ("2026-12-01 10:30", "2026-12-01T10:30:00+03:00", "2026-12-01 10:30"),
    ("in 2 hours", "2026-03-11T14:00:00+03:00", "in 2 hours"),
    ("in 20 minutes", "2026-03-11T12:20:00+03:00", "in 20 minutes"),
    ("in half an hour", "2026-03-11T12:30:00+03:00", "in half an hour"),
    ("in an hour", "2026-03-11T13:00:00+03:00", "in an hour"),
    ("2 hours ago", "2026-03-11T10:00:00+03:00", "2 hours ago"),
    ("завтра в 10", "2026-03-12T10:00:00+03:00", "завтра в 10"),
    ("сегодня в 15:30", "2026-03-11T15:30:00+03:00", "сегодня в 15:30"),
    ("в пятницу в 9 утра", "2026-03-13T09:00:00+03:00", "в пятницу в 9 утра"),
    ("в 10 завтра", "2026-03-12T10:00:00+03:00", "в 10 завтра"),
    ("15 марта в 11:00", "2026-03-15T11:00:00+03:00", "15 марта в 11:00"),
    ("через 2 часа", "2026-03-11T14:00:00+03:00", "через 2 часа"),
    ("через два часа", "2026-03-11T14:00:00+03:00", "через два часа"),
    ("через полчаса", "2026-03-11T12:30:00+03:00", "через полчаса"),
    ("через час", "2026-03-11T13:00:00+03:00", "через час"),
    ("через 15 минут", "2026-03-11T12:15:00+03:00", "через 15 минут"),
    ("час назад", "2026-03-11T11:00:00+03:00", "час назад"),
]


@pytest.mark.parametrize(("text", "value", "span"), DATETIMES)
def test_datetimes(text: str, value: str, span: str) -> None:
    assert only(text) == ("datetime", value, span)


def test_bare_hours_are_not_times() -> None:
    assert found("жду уже 2 часа") == [("number", 2, "2")]  # a duration, not 02:00
    assert found("в 5 банках") == [("number", 5, "5")]
    assert found("I ordered 10 items at 10 shops") == [("number", 10, "10"), ("number", 10, "10")]
    assert found("в 2024 году") == [("number", 2024, "2024")]
    assert found("around one or two weeks ago") == [
        ("number", 1, "one"),
        ("date", "2026-02-25", "two weeks ago"),
    ]
    assert found("after 2 weeks") == [("number", 2, "2")]  # a duration, not a date


def test_hour_ranges() -> None:
    assert found("работаем с 9 до 18") == [("time", "09:00", "с 9"), ("time", "18:00", "до 18")]
    assert found("завтра с 10 до 12") == [
        ("datetime", "2026-03-12T10:00:00+03:00", "завтра с 10"),
        ("time", "12:00", "до 12"),
    ]


PHONES = [
    ("call me on +7 916 123-45-67", "+79161234567", "+7 916 123-45-67", "RU"),
    ("мой номер 8 (916) 123-45-67", "+79161234567", "8 (916) 123-45-67", "RU"),
    ("тел. 89161234567", "+79161234567", "89161234567", "RU"),
    ("my cell is (415) 555-2671", "+14155552671", "(415) 555-2671", "US"),
    ("+1 415 555 2671", "+14155552671", "+1 415 555 2671", None),
    ("+44 20 7946 0958", "+442079460958", "+44 20 7946 0958", "RU"),
]


@pytest.mark.parametrize(("text", "value", "span", "region"), PHONES)
def test_phones(text: str, value: str, span: str, region: str | None) -> None:
    assert only(text, region) == ("phone", value, span)


def test_national_numbers_need_a_region() -> None:
    assert all(t != "phone" for t, _, _ in found("8 (916) 123-45-67", region=None))


EMAILS = [
    ("write to Ivan.Petrov@Example.com please", "ivan.petrov@example.com", "Ivan.Petrov@Example.com"),
    ("мой email: ivan+cars@mail.ru.", "ivan+cars@mail.ru", "ivan+cars@mail.ru"),
    ("service-desk@demo-motors.co.uk", "service-desk@demo-motors.co.uk", "service-desk@demo-motors.co.uk"),
]


@pytest.mark.parametrize(("text", "value", "span"), EMAILS)
def test_emails(text: str, value: str, span: str) -> None:
    assert only(text) == ("email", value, span)


MONEY = [
    # English
    ("$20", 2000, "USD", "$20"),
    ("20 euros", 2000, "EUR", "20 euros"),
    ("€15.50", 1550, "EUR", "€15.50"),
    ("100 USD", 10000, "USD", "100 USD"),
    ("USD 100", 10000, "USD", "USD 100"),
    ("£5", 500, "GBP", "£5"),
    ("a budget of $5k", 500000, "USD", "$5k"),
    ("twenty dollars", 2000, "USD", "twenty dollars"),
    ("1,250.99 dollars", 125099, "USD", "1,250.99 dollars"),
    ("1000 yen", 1000, "JPY", "1000 yen"),
    # Russian
    ("5000 руб", 500000, "RUB", "5000 руб"),
    ("5 000 ₽", 500000, "RUB", "5 000 ₽"),
    ("5000р", 500000, "RUB", "5000р"),
    ("1500 рублей", 150000, "RUB", "1500 рублей"),
    ("99,90 руб.", 9990, "RUB", "99,90 руб."),
    ("5 тыс. руб", 500000, "RUB", "5 тыс. руб"),
    ("пять тысяч рублей", 500000, "RUB", "пять тысяч рублей"),
    ("двадцать долларов", 2000, "USD", "двадцать долларов"),
    ("10 евро", 1000, "EUR", "10 евро"),
]


@pytest.mark.parametrize(("text", "amount", "currency", "span"), MONEY)
def test_money(text: str, amount: int, currency: str, span: str) -> None:
    assert only(text) == ("money", {"amount": amount, "currency": currency}, span)


def test_a_sentence_with_everything() -> None:
    text = "Запишите меня завтра в 10:30, бюджет 5 000 ₽, тел. +7 916 123-45-67, почта a@b.ru, машин 2"
    assert found(text) == [
        ("datetime", "2026-03-12T10:30:00+03:00", "завтра в 10:30"),
        ("money", {"amount": 500000, "currency": "RUB"}, "5 000 ₽"),
        ("phone", "+79161234567", "+7 916 123-45-67"),
        ("email", "a@b.ru", "a@b.ru"),
        ("number", 2, "2"),
    ]


def test_no_overlapping_duplicates() -> None:
    for text in ("+7 916 123-45-67", "10:30", "01.12.2026", "5 000 ₽", "john.2000@example.com"):
        entities = extract_entities(text, now=NOW, tz=TZ, region="RU")
        assert len(entities) == 1, entities


def test_reference_time_handling() -> None:
    # an aware now is converted to tz: 22:00 UTC is already the 12th in Moscow
    late = datetime(2026, 3, 11, 22, 0, tzinfo=UTC)
    assert extract_entities("tomorrow", now=late, tz=TZ)[0].value == "2026-03-13"
    # without tz the reference is now as given: a naive now gives naive datetimes
    assert extract_entities("tomorrow at 10", now=NOW)[0].value == "2026-03-12T10:00:00"
    assert extract_entities("in 2 hours", now=late)[0].value == "2026-03-12T00:00:00+00:00"
    # DST is respected: Berlin switches on 29 March 2026
    assert (
        extract_entities("March 30 at 9", now=NOW, tz="Europe/Berlin")[0].value == "2026-03-30T09:00:00+02:00"
    )
    # without now: the current time (just check it works)
    assert extract_entities("tomorrow")[0].type == "date"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="time zone"):
        extract_entities("tomorrow", tz="Mars/Olympus")
    with pytest.raises(ValueError, match="region"):
        extract_entities("123", region="XX")


def test_nothing_to_find() -> None:
    assert extract_entities("", now=NOW) == []
    assert extract_entities("hello there, how are you?", now=NOW) == []
    assert extract_entities("здравствуйте, подскажите пожалуйста", now=NOW) == []
    assert extract_entities("the 15th", now=NOW) == []
