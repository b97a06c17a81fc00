"""Rule-based entities in English and Russian: numbers, dates and times, phones, e-mails, money.

``extract_entities(text, now, tz, region)`` returns non-overlapping entities ordered by position, each
with its character span in ``text``. Values:

================  ==========================================================================
type              value
================  ==========================================================================
``number``        ``int`` (or ``float`` with a fractional part): "3", "1 500", "2,5", "twenty one",
                  "двадцать пять", "5 тыс."
``date``          ``"YYYY-MM-DD"``: "tomorrow", "послезавтра", "next Monday", "в пятницу",
                  "15 марта", "March 15", "2026-12-01", "01.12.2026", "через 3 дня", "in a week"
``time``          ``"HH:MM"``: "10:30", "at 3 pm", "в 7 вечера", "в 10 часов", "at noon"
``datetime``      ISO 8601: a date next to a time ("tomorrow at 10", "сегодня в 15:30",
                  "at 9 on Friday") or a moment relative to now ("через 2 часа", "in 20 minutes");
                  with an offset when the reference time is aware (``tz`` given, or an aware ``now``)
``phone``         E.164 string (the ``phonenumbers`` library; ``region`` for national formats)
``email``         the address, lower case
``money``         ``{"amount": <minor units int>, "currency": <ISO 4217>}``: "5000 руб", "5 000 ₽",
                  "$20", "20 euros", "€15.50", "100 USD", "двадцать долларов"
================  ==========================================================================

Resolution rules: dates without a year, and weekdays, are the next such day *after* today (a bot
books the future; "15 марта" said on 20 March is next year's); "next <weekday>" /
"в следующий <день>" is that day of next calendar week (weeks start on Monday); the past only when
said ("last Friday", "в прошлую пятницу", "2 weeks ago", "3 дня назад"); a bare "at 10" or "в 10"
is a time only at the end of a clause or next to a date, otherwise it is just a number; an hour
without am/pm or a part of the day is read on a 24-hour clock. docs/nlu.md has the full rules.

When candidates overlap, the longest wins (then: e-mail, phone, money, datetime, date, time, number),
so a phone number is not also three numbers and "10:30" is not two.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from .base import Entity

__all__ = ["extract_entities"]

# --------------------------------------------------------------------------------------------------
# vocabulary

_EN_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
_RU_NUMBER_WORDS = {
    "ноль": 0, "нуль": 0, "один": 1, "одна": 1, "одно": 1, "одну": 1, "одного": 1, "одной": 1,
    "два": 2, "две": 2, "двух": 2, "три": 3, "трех": 3, "четыре": 4, "четырех": 4, "пять": 5,
    "шесть": 6, "семь": 7, "восемь": 8, "восьми": 8, "девять": 9, "десять": 10, "одиннадцать": 11,
    "двенадцать": 12, "тринадцать": 13, "четырнадцать": 14, "пятнадцать": 15, "шестнадцать": 16,
    "семнадцать": 17, "восемнадцать": 18, "девятнадцать": 19, "двадцать": 20, "тридцать": 30,
    "сорок": 40, "сорока": 40, "пятьдесят": 50, "шестьдесят": 60, "семьдесят": 70, "восемьдесят": 80,
    "девяносто": 90, "сто": 100, "двести": 200, "триста": 300, "четыреста": 400, "пятьсот": 500,
    "шестьсот": 600, "семьсот": 700, "восемьсот": 800, "девятьсот": 900,
}  # fmt: skip
# genitive/prepositional "-и" forms: пяти, десяти, пятнадцати, двадцати, тридцати
for _w, _v in list(_RU_NUMBER_WORDS.items()):
    if _w.endswith("ь") and _v >= 5:
        _RU_NUMBER_WORDS.setdefault(_w[:-1] + "и", _v)
_MULTIPLIER_WORDS = {
    "hundred": 100, "thousand": 1000, "million": 1_000_000, "тысяча": 1000, "тысячи": 1000,
    "тысяч": 1000, "тысячу": 1000, "миллион": 1_000_000, "миллиона": 1_000_000, "миллионов": 1_000_000,
}  # fmt: skip
_NUMBER_WORDS: dict[str, int] = {**_EN_NUMBER_WORDS, **_RU_NUMBER_WORDS}
_ONE_PRONOUN_BEFORE = {"the", "this", "that", "which", "any", "no", "every", "each", "some", "another"}

_MONTHS = {
    **{m: i for i, m in enumerate(
        ["january", "february", "march", "april", "may", "june", "july", "august", "september",
         "october", "november", "december"], 1)},
    **{m: i for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)},
    "sept": 9,
    **{m: i for i, m in enumerate(
        ["января", "февраля", "марта", "апреля", "мая", "июня", "июля", "августа", "сентября",
         "октября", "ноября", "декабря"], 1)},
}  # fmt: skip
_EN_MONTH = (
    r"(?P<mon>january|february|march|april|may|june|july|august|september|october|november|december"
    r"|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)\.?"
)
_RU_MONTH = r"(?P<mon>января|февраля|марта|апреля|мая|июня|июля|августа|сентября|октября|ноября|декабря)"

_WEEKDAYS = {
    "monday": 0, "tuesday": 1, "wednesday": 2, "thursday": 3, "friday": 4, "saturday": 5, "sunday": 6,
    "понедельник": 0, "вторник": 1, "среда": 2, "среду": 2, "четверг": 3, "пятница": 4, "пятницу": 4,
    "суббота": 5, "субботу": 5, "воскресенье": 6,
}  # fmt: skip

_RELATIVE_DAYS = {
    "today": 0, "tonight": 0, "tomorrow": 1, "day after tomorrow": 2, "the day after tomorrow": 2,
    "yesterday": -1, "the day before yesterday": -2, "day before yesterday": -2,
    "сегодня": 0, "завтра": 1, "послезавтра": 2, "вчера": -1, "позавчера": -2,
}  # fmt: skip

_CURRENCY_WORDS: list[tuple[str, str]] = [
    # (regex alternative, ISO code); matched right after an amount (optionally after a space)
    (r"₽|руб(?:лей|ля|ль)?\.?|р\.|р(?!\w)|rub(?:les?)?|rur|рублик(?:ов|а)?", "RUB"),
    (r"\$|usd|us\s?dollars?|dollars?|bucks?|доллар(?:ов|а|ы)?|бакс(?:ов|а)?", "USD"),
    (r"€|eur|euros?|евро", "EUR"),
    (r"£|gbp|pounds?(?:\s+sterling)?|фунт(?:ов|а)?(?:\s+стерлингов)?", "GBP"),
    (r"¥|cny|rmb|yuan|юан(?:ей|я|ь)", "CNY"),
    (r"₸|kzt|tenge|тенге", "KZT"),
    (r"jpy|yen|иен(?:а|ы)?|йен(?:а|ы)?", "JPY"),
]
_CURRENCY_PREFIX = {"$": "USD", "€": "EUR", "£": "GBP", "₽": "RUB", "¥": "CNY", "₸": "KZT",
                    "usd": "USD", "eur": "EUR", "rub": "RUB", "gbp": "GBP", "cny": "CNY",
                    "kzt": "KZT", "jpy": "JPY"}  # fmt: skip
_MINOR_UNITS = {"JPY": 0}

# --------------------------------------------------------------------------------------------------
# patterns (all matched against the lower-cased text, "ё" → "е", same length as the original)

_SP = r"[ \u00a0\u202f]"
_DIGIT_NUMBER = re.compile(
    rf"(?<![\w.,])(?:\d{{1,3}}(?:{_SP}\d{{3}})+(?:[.,]\d+)?|\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|\d+(?:[.,]\d+)?)"
    r"(?!\d|[.,]\d)"
)
_DIGIT_MULTIPLIER = re.compile(
    rf"(?:(?P<k>[kк])|{_SP}?(?:(?P<kw>тыс\.?|тысяч[аиу]?|thousand)|(?P<m>млн\.?|миллион(?:а|ов)?|million)))(?!\w)"
)
_COMMA_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_WORD = re.compile(
    r"\b(?:" + "|".join(sorted({*_NUMBER_WORDS, *_MULTIPLIER_WORDS}, key=len, reverse=True)) + r")\b"
)
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?![\w-])")
_CURRENCY_AFTER = re.compile(
    rf"{_SP}?(?:" + "|".join(f"(?P<c{i}>{alt})" for i, (alt, _) in enumerate(_CURRENCY_WORDS)) + r")(?!\w)"
)
_CURRENCY_BEFORE = re.compile(
    r"(?:(?P<sym>[$€£₽¥₸])|(?<!\w)(?P<code>usd|eur|rub|gbp|cny|kzt|jpy))" + _SP + "?$"
)

_ISO_DATE = re.compile(r"(?<![\w.-])(?P<y>\d{4})-(?P<m>\d{2})-(?P<d>\d{2})(?![\w-])")
_DMY_DATE = re.compile(r"(?<![\w.])(?P<d>\d{1,2})\.(?P<m>\d{1,2})\.(?P<y>\d{4}|\d{2})(?![\w]|\.\d)")
_RU_DAY_MONTH = re.compile(
    rf"(?<!\w)(?P<d>\d{{1,2}})(?:-?(?:го|е|ое))?\s+{_RU_MONTH}(?:\s+(?P<y>\d{{4}})(?:\s*(?:г\.|года?\b|г\b))?)?"
    r"(?!\w)"
)
_EN_MONTH_DAY = re.compile(rf"\b{_EN_MONTH}\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?(?:,?\s+(?P<y>\d{{4}}))?(?!\w)")
_EN_DAY_MONTH = re.compile(
    rf"(?<!\w)(?:the\s+)?(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?{_EN_MONTH}(?:,?\s+(?P<y>\d{{4}}))?(?!\w)"
)
_RELATIVE_DAY = re.compile(r"\b(?P<w>" + "|".join(sorted(_RELATIVE_DAYS, key=len, reverse=True)) + r")\b")
_EN_WEEKDAY = re.compile(
    r"\b(?:(?P<q>next|this|on|coming|last|past)\s+)?(?P<w>monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b"
)
_RU_WEEKDAY = re.compile(
    r"(?<!\w)(?:во?\s+)?(?:(?P<q>следующ(?:ий|ую|ее|ая)|прошл(?:ый|ую|ое|ая)|эт(?:от|у|о)|ближайш(?:ий|ую|ее))\s+)?"
    r"(?P<w>понедельник|вторник|среду|среда|четверг|пятницу|пятница|субботу|суббота|воскресенье)(?!\w)"
)
_HOUR_WORDS_EN = {k: v for k, v in _EN_NUMBER_WORDS.items() if 1 <= v <= 12}
_HOUR_WORDS_RU = {k: v for k, v in _RU_NUMBER_WORDS.items() if 1 <= v <= 12}
_HOUR_EN = r"(?P<h>\d{1,2}|" + "|".join(sorted(_HOUR_WORDS_EN, key=len, reverse=True)) + ")"
_HOUR_RU = r"(?P<h>\d{1,2}|" + "|".join(sorted(_HOUR_WORDS_RU, key=len, reverse=True)) + ")"
_CLOCK = re.compile(
    r"(?<![\w:.])(?:(?:at|around|by|from|until|till|в|во|к|с|до|около)\s+)?"
    r"(?P<h>[01]?\d|2[0-3]):(?P<mi>[0-5]\d)(?::[0-5]\d)?"
    r"(?:\s*(?P<ap>a\.?m\.?|p\.?m\.?)(?!\w)|\s+(?P<pod>утра|дня|вечера|ночи)(?!\w))?(?![\w:]|\.\d)"
)
_EN_AMPM = re.compile(
    rf"(?<![\w:.])(?:(?:at|around|by|from|until|till)\s+)?{_HOUR_EN}(?:\s*o'?clock)?\s*(?P<ap>a\.?m\.?|p\.?m\.?)(?!\w)"
)
_EN_AT = re.compile(rf"\b(?:at|around|by)\s+{_HOUR_EN}(?P<oc>\s*o'?clock)?(?!\w|[:.,]\d|\s*%)")
_EN_OCLOCK = re.compile(rf"(?<![\w:.]){_HOUR_EN}\s*o'?clock(?!\w)")
_RU_HOUR = re.compile(
    rf"(?<![\w:.])(?:(?P<pre>в|во|к|около|до|с)\s+)?{_HOUR_RU}"
    r"(?:\s*(?P<hw>часам|часа|часов|час|ч\.|ч(?!\w)))?(?:\s+(?P<pod>утра|дня|вечера|ночи))?(?![\w:]|[.,]\d)"
)
_NOON = re.compile(r"\b(?:(?:at|around|by|в|к|около)\s+)?(?P<w>noon|midday|midnight|полдень|полночь)\b")
_RELATIVE_START = re.compile(r"\b(?:через|in)\s+")
_RELATIVE_UNIT = re.compile(
    r"\s*(?:(?P<min>минут[уы]?|мин\.?|minutes?|mins?)|(?P<hour>час(?:а|ов)?|ч\.?|hours?|hrs?)"
    r"|(?P<day>дн(?:я|ей)|день|сутки|days?)|(?P<week>недел[юиь]|weeks?)|(?P<month>месяц(?:а|ев)?|months?))"
    r"(?!\w)"
)
_RELATIVE_BARE = re.compile(
    r"(?P<half>полчаса|пол\s?часа|half\s+an\s+hour)(?!\w)"
    r"|(?:(?P<an>an?|one)\s+)?(?:(?P<min>минуту|minute)|(?P<hour>час|hour)|(?P<day>день|сутки|day)|(?P<week>неделю|week)"
    r"|(?P<month>месяц|month))(?!\w)"
)
_CLAUSE_END = re.compile(
    r"\s*(?:$|[.,!?;:)\-—–]|\b(?:please|пожалуйста|and|и|или|or|ok|ок|до|to|till|until)\b)"
)
_SENTENCE_END = re.compile(r"\s*(?:$|[.,!?;:)\-—–])")
_AGO = re.compile(r"\s+(?:ago|назад)(?!\w)")
_BARE_AGO = re.compile(
    r"(?<!\w)(?:(?P<an>an?|one)\s+)?(?:(?P<min>минуту|minute)|(?P<hour>час|hour)|(?P<day>день|сутки|day)"
    r"|(?P<week>неделю|week)|(?P<month>месяц|month))\s+(?:ago|назад)(?!\w)"
)
_DATE_TIME_GAP = re.compile(r"\s*,?\s*(?:(?:on|в|во)\s+)?")


@dataclass(slots=True)
class _Cand:
    type: str
    value: Any
    start: int
    end: int
    weak: bool = False  # a bare "at 10": kept only next to a date or at the end of a clause


_PRIORITY = {"email": 0, "phone": 1, "money": 2, "datetime": 3, "date": 4, "time": 5, "number": 6}


# --------------------------------------------------------------------------------------------------
# public


def extract_entities(
    text: str, now: datetime | None = None, tz: str | None = None, region: str | None = None
) -> list[Entity]:
    """Entities in ``text``, ordered by position, none overlapping.

    ``now`` is the reference time for relative dates (default: the current time); ``tz`` an IANA zone
    name (``"Europe/Moscow"``): ``now`` is converted to it (a naive ``now`` is taken as wall time
    there) and dates/times are resolved in it. Without ``tz`` the reference is ``now`` as given (the
    current UTC time when ``now`` is not given either). ``region`` is the ISO 3166 country used for
    phone numbers written without an international prefix (``"RU"``: "8 916 123-45-67"); without it
    only numbers starting with ``+`` are phones. ValueError for an unknown ``tz`` or ``region``.
    """
    ref = _reference_time(now, tz)
    if region is not None and region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown phone region {region!r}")
    low = _fold(text)
    cands: list[_Cand] = []
    cands += _emails(low)
    cands += _phones(text, region)
    numbers = list(_numbers(low))
    cands += [_Cand("number", _plain(v), s, e) for s, e, v in numbers]
    cands += _money(low, numbers)
    cands += _dates(low, ref.date())
    cands += _times(low)
    cands += _relative(low, numbers, ref)
    cands = _merge_date_time(low, cands, ref)
    chosen = _resolve_overlaps(cands)
    return [Entity(c.type, c.value, text[c.start : c.end], c.start, c.end) for c in chosen]


# --------------------------------------------------------------------------------------------------
# helpers


def _reference_time(now: datetime | None, tz: str | None) -> datetime:
    zone = None
    if tz is not None:
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {tz!r}") from exc
    if now is None:
        return datetime.now(zone or UTC)
    if zone is None:
        return now
    return now.replace(tzinfo=zone) if now.tzinfo is None else now.astimezone(zone)


def _fold(text: str) -> str:
    """Lower case with ё → е, keeping every character at its index."""
    low = text.lower()
    if len(low) != len(text):
        low = "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)
    return low.replace("ё", "е")


def _plain(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _digit_value(raw: str) -> Decimal | None:
    """Digits to a number: "1 500" → 1500, "1,500.5" → 1500.5, "2,5" → 2.5.

    A comma is a decimal comma unless it groups thousands ("1,500")."""
    s = raw.replace(" ", "").replace("\u00a0", "").replace("\u202f", "")
    s = s.replace(",", "") if _COMMA_THOUSANDS.fullmatch(s) else s.replace(",", ".")
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def _emails(low: str) -> list[_Cand]:
    if "@" not in low:
        return []
    return [_Cand("email", m.group(0), m.start(), m.end()) for m in _EMAIL.finditer(low)]


def _phones(text: str, region: str | None) -> list[_Cand]:
    if sum(ch.isdigit() for ch in text) < 7:
        return []
    out = []
    for m in phonenumbers.PhoneNumberMatcher(text, region.upper() if region else "ZZ"):
        e164 = phonenumbers.format_number(m.number, phonenumbers.PhoneNumberFormat.E164)
        out.append(_Cand("phone", e164, m.start, m.end))
    return out


def _numbers(low: str) -> Iterator[tuple[int, int, Decimal]]:
    """(start, end, value) of every number written in digits or in words."""
    for m in _DIGIT_NUMBER.finditer(low):
        value = _digit_value(m.group(0))
        if value is None:
            continue
        start, end = m.start(), m.end()
        mult = _DIGIT_MULTIPLIER.match(low, end)
        if end < len(low) and low[end].isalpha() and not mult and not _CURRENCY_AFTER.match(low, end):
            continue  # "15th", "2x": not a number on its own
        if start > 0 and low[start - 1] in "-−" and (start == 1 or not low[start - 2].isalnum()):
            start -= 1
            value = -value
        if mult:
            value *= 1_000_000 if mult.group("m") else 1000
            end = mult.end()
        yield start, end, value
    yield from _word_numbers(low)


def _word_numbers(low: str) -> Iterator[tuple[int, int, Decimal]]:
    tokens = [(m.start(), m.end(), m.group(0)) for m in _NUMBER_WORD.finditer(low)]
    i = 0
    while i < len(tokens):
        start, end, word = tokens[i]
        if word == "one" and _previous_word(low, start) in _ONE_PRONOUN_BEFORE:
            i += 1
            continue
        if word in _MULTIPLIER_WORDS and _MULTIPLIER_WORDS[word] != 1000:
            i += 1  # "hundred", "million" alone are not numbers
            continue
        total, current, last_class = 0, 0, 9
        j = i
        while j < len(tokens):
            s, e, w = tokens[j]
            if j > i and not re.fullmatch(r"[\s-]+(?:and\s+)?", low[tokens[j - 1][1] : s]):
                break
            if w in _MULTIPLIER_WORDS:
                mult = _MULTIPLIER_WORDS[w]
                if mult == 100:
                    if current >= 100:
                        break
                    current = (current or 1) * 100
                    last_class = 3
                else:
                    if total and total < mult:
                        break
                    total += (current or 1) * mult
                    current = 0
                    last_class = 9
            else:
                v = _NUMBER_WORDS[w]
                cls = 3 if v >= 100 else 2 if v >= 20 else 1
                teen = 10 <= v < 20
                if cls >= last_class or (last_class == 2 and teen) or (current % 100 and teen):
                    break
                current += v
                last_class = 0 if teen or v == 0 else cls if cls > 1 else 0
            end = e
            j += 1
        yield start, end, Decimal(total + current)
        i = j


def _previous_word(low: str, pos: int) -> str:
    m = re.search(r"(\w+)\W*$", low[:pos])
    return m.group(1) if m else ""


def _money(low: str, numbers: list[tuple[int, int, Decimal]]) -> list[_Cand]:
    out = []
    for start, end, value in numbers:
        currency = None
        s, e = start, end
        after = _CURRENCY_AFTER.match(low, end)
        if after and after.lastgroup:
            currency = _CURRENCY_WORDS[int(after.lastgroup[1:])][1]
            e = after.end()
        else:
            before = _CURRENCY_BEFORE.search(low, max(0, start - 5), start)
            if before:
                currency = _CURRENCY_PREFIX[before.group("sym") or before.group("code")]
                s = before.start()
        if currency is None:
            continue
        exponent = _MINOR_UNITS.get(currency, 2)
        minor = int((value * (10**exponent)).to_integral_value())
        out.append(_Cand("money", {"amount": minor, "currency": currency}, s, e))
    return out


def _safe_date(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _upcoming(today: date, month: int, day: int) -> date | None:
    """The next (month, day) after today; 29 February waits for a leap year."""
    for year in range(today.year, today.year + 9):
        d = _safe_date(year, month, day)
        if d is not None and d > today:
            return d
    return None


def _dates(low: str, today: date) -> list[_Cand]:
    out: list[_Cand] = []
    for m in _ISO_DATE.finditer(low):
        d = _safe_date(int(m["y"]), int(m["m"]), int(m["d"]))
        if d:
            out.append(_Cand("date", d, m.start(), m.end()))
    for m in _DMY_DATE.finditer(low):
        year = int(m["y"])
        if len(m["y"]) == 2:
            year += 2000
        d = _safe_date(year, int(m["m"]), int(m["d"]))
        if d:
            out.append(_Cand("date", d, m.start(), m.end()))
    for pattern in (_RU_DAY_MONTH, _EN_MONTH_DAY, _EN_DAY_MONTH):
        for m in pattern.finditer(low):
            month, day = _MONTHS[m["mon"]], int(m["d"])
            d = _safe_date(int(m["y"]), month, day) if m["y"] else _upcoming(today, month, day)
            if d:
                out.append(_Cand("date", d, m.start(), m.end()))
    for m in _RELATIVE_DAY.finditer(low):
        out.append(_Cand("date", today + timedelta(days=_RELATIVE_DAYS[m["w"]]), m.start(), m.end()))
    for pattern in (_EN_WEEKDAY, _RU_WEEKDAY):
        for m in pattern.finditer(low):
            weekday = _WEEKDAYS[m["w"]]
            qualifier = m["q"] or ""
            if qualifier.startswith(("next", "следующ")):
                monday_next_week = today + timedelta(days=7 - today.weekday())
                d = monday_next_week + timedelta(days=weekday)
            elif qualifier.startswith(("last", "past", "прошл")):
                d = today - timedelta(days=(today.weekday() - weekday - 1) % 7 + 1)
            elif qualifier.startswith(("this", "эт")):
                d = today + timedelta(days=(weekday - today.weekday()) % 7)
            else:
                d = today + timedelta(days=(weekday - today.weekday() - 1) % 7 + 1)
            start = m.start() if qualifier or pattern is _RU_WEEKDAY else m.start("w")
            out.append(_Cand("date", d, start, m.end()))
    for c in out:
        c.value = c.value.isoformat()
    return out


def _hour_value(raw: str, words: dict[str, int]) -> int:
    return int(raw) if raw.isdigit() else words[raw]


def _apply_part_of_day(hour: int, ampm: str | None, pod: str | None) -> int | None:
    if ampm:
        if not 1 <= hour <= 12:
            return None
        pm = ampm.startswith("p")
        return (hour % 12) + (12 if pm else 0)
    if pod:
        if pod == "утра":
            return hour % 12 if hour <= 12 else None
        if pod == "дня":
            return hour + 12 if 1 <= hour <= 6 else hour if 11 <= hour <= 17 else None
        if pod == "вечера":
            return hour + 12 if 1 <= hour <= 11 else hour if 12 <= hour <= 23 else None
        if pod == "ночи":
            return 0 if hour == 12 else hour if hour <= 5 else None
    return hour if 0 <= hour <= 23 else None


def _time_cand(start: int, end: int, hour: int | None, minute: int, weak: bool = False) -> _Cand | None:
    if hour is None or not (0 <= hour <= 23 and 0 <= minute <= 59):
        return None
    return _Cand("time", f"{hour:02d}:{minute:02d}", start, end, weak)


def _times(low: str) -> list[_Cand]:
    out: list[_Cand | None] = []
    if ":" in low:
        for m in _CLOCK.finditer(low):
            hour = _apply_part_of_day(int(m["h"]), m["ap"], m["pod"])
            out.append(_time_cand(m.start(), m.end(), hour, int(m["mi"])))
    for m in _EN_AMPM.finditer(low):
        hour = _apply_part_of_day(_hour_value(m["h"], _HOUR_WORDS_EN), m["ap"], None)
        out.append(_time_cand(m.start(), m.end(), hour, 0))
    for m in _EN_OCLOCK.finditer(low):
        out.append(_time_cand(m.start(), m.end(), _hour_value(m["h"], _HOUR_WORDS_EN), 0))
    for m in _EN_AT.finditer(low):
        # "at 10 or 11" is two times, "around one or two weeks ago" is not: a word needs the clause to end
        clause_end = _CLAUSE_END if m["h"].isdigit() else _SENTENCE_END
        weak = not m["oc"] and not clause_end.match(low, m.end())
        out.append(_time_cand(m.start(), m.end(), _hour_value(m["h"], _HOUR_WORDS_EN), 0, weak))
    for m in _RU_HOUR.finditer(low):
        if not (m["pre"] or m["pod"]):
            continue  # "10" or "2 часа" alone: a number, a duration
        hour = _apply_part_of_day(_hour_value(m["h"], _HOUR_WORDS_RU), None, m["pod"])
        strong = bool(m["hw"] or m["pod"])
        weak = not strong and not _CLAUSE_END.match(low, m.end())
        out.append(_time_cand(m.start(), m.end(), hour, 0, weak))
    for m in _NOON.finditer(low):
        hour = 0 if m["w"] in ("midnight", "полночь") else 12
        out.append(_time_cand(m.start(), m.end(), hour, 0))
    return [c for c in out if c is not None]


def _format_moment(moment: datetime) -> str:
    return moment.replace(second=0, microsecond=0).isoformat()


def _add_months(d: date, months: int) -> date:
    y, m = divmod(d.month - 1 + months, 12)
    year, month = d.year + y, m + 1
    for day in (d.day, 30, 29, 28):
        candidate = _safe_date(year, month, day)
        if candidate:
            return candidate
    return d  # unreachable: every month has a 28th


def _relative(low: str, numbers: list[tuple[int, int, Decimal]], ref: datetime) -> list[_Cand]:
    """Moments relative to now.

    "через 2 часа", "in 20 minutes", "2 hours ago" → datetime; "через 3 дня", "in a week",
    "неделю назад" → date."""
    found: list[tuple[int, int, Decimal, str]] = []  # start, end, signed amount, unit
    starts = {s: (e, v) for s, e, v in numbers}
    for m in _RELATIVE_START.finditer(low):
        pos = m.end()
        if pos in starts:
            num_end, amount = starts[pos]
            u = _RELATIVE_UNIT.match(low, num_end)
            if u and u.lastgroup:
                found.append((m.start(), u.end(), amount, u.lastgroup))
            continue
        b = _RELATIVE_BARE.match(low, pos)
        if b is None or (not (b["half"] or b["an"]) and not m.group(0).startswith("через")):
            continue  # "in day" is not "in a day"
        if b["half"]:
            found.append((m.start(), b.end(), Decimal(30), "min"))
        elif b.lastgroup:
            found.append((m.start(), b.end(), Decimal(1), b.lastgroup))
    for start, num_end, amount in numbers:
        u = _RELATIVE_UNIT.match(low, num_end)
        ago = _AGO.match(low, u.end()) if u else None
        if u and u.lastgroup and ago:
            found.append((start, ago.end(), -amount, u.lastgroup))
    for b in _BARE_AGO.finditer(low):
        if b.lastgroup and (b["an"] or not b.group(0)[0].isascii()):
            found.append((b.start(), b.end(), Decimal(-1), b.lastgroup))
    out = []
    for start, end, amount, unit in found:
        if abs(amount) > 1000:
            continue
        if unit in ("min", "hour"):
            delta = timedelta(minutes=float(amount) * (60 if unit == "hour" else 1))
            moment = (ref.astimezone(UTC) + delta).astimezone(ref.tzinfo) if ref.tzinfo else ref + delta
            out.append(_Cand("datetime", _format_moment(moment), start, end))
            continue
        n = int(amount)
        if unit == "day":
            day = ref.date() + timedelta(days=n)
        elif unit == "week":
            day = ref.date() + timedelta(weeks=n)
        else:
            day = _add_months(ref.date(), n)
        out.append(_Cand("date", day.isoformat(), start, end))
    return out


def _merge_date_time(low: str, cands: list[_Cand], ref: datetime) -> list[_Cand]:
    """A date next to a time ("tomorrow at 10", "в 10 завтра") becomes one datetime; weak times
    that merge nowhere are dropped."""
    dates = [c for c in cands if c.type == "date"]
    times = [c for c in cands if c.type == "time"]
    merged: list[_Cand] = []
    used: set[int] = set()
    for d in dates:
        for t in times:
            if id(t) in used:
                continue
            if t.start >= d.end:
                gap = low[d.end : t.start]
            elif t.end <= d.start:
                gap = low[t.end : d.start]
            else:
                continue
            if not _DATE_TIME_GAP.fullmatch(gap):
                continue
            day = date.fromisoformat(d.value)
            hh, mm = (int(x) for x in t.value.split(":"))
            moment = datetime.combine(day, time(hh, mm), tzinfo=ref.tzinfo)
            merged.append(_Cand("datetime", _format_moment(moment), min(d.start, t.start), max(d.end, t.end)))
            used.add(id(t))
            break
    return [c for c in cands if not (c.type == "time" and c.weak)] + merged


def _resolve_overlaps(cands: list[_Cand]) -> list[_Cand]:
    ranked = sorted(cands, key=lambda c: (-(c.end - c.start), _PRIORITY[c.type], c.start))
    taken: list[_Cand] = []
    for c in ranked:
        if c.end <= c.start:
            continue
        if all(c.end <= t.start or c.start >= t.end for t in taken):
            taken.append(c)
    taken.sort(key=lambda c: c.start)
    return taken
