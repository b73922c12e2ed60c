"""Instants as RFC 3339 text and back (sidecar.core.timefmt): formats, truncation, parsing."""

from __future__ import annotations

import datetime
import random
import time

import pytest

from sidecar.core.timefmt import parse_rfc3339, utc_millis, utc_seconds

UTC = datetime.UTC
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def ts(*args: int) -> float:
    return datetime.datetime(*args, tzinfo=UTC).timestamp()


# -- utc_seconds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (0.0, "1970-01-01T00:00:00Z"),
        (NOW, "2023-11-14T22:13:20Z"),
        (NOW + 0.5, "2023-11-14T22:13:20Z"),
        (NOW + 0.9999997, "2023-11-14T22:13:20Z"),
        # Within half a microsecond of the next second: datetime.fromtimestamp would round
        # to 00:00:01; the fraction is dropped instead.
        (1893456000.9999998, "2030-01-01T00:00:00Z"),
        (-0.5, "1969-12-31T23:59:59Z"),  # floor, also before 1970
        (ts(2028, 2, 29, 23, 59, 59), "2028-02-29T23:59:59Z"),
    ],
)
def test_utc_seconds(ts: float, expected: str) -> None:
    assert utc_seconds(ts) == expected


# -- utc_millis (the audit records' format) ------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (NOW, "2023-11-14T22:13:20.000Z"),
        (NOW + 0.1239, "2023-11-14T22:13:20.123Z"),
        (NOW + 0.9995, "2023-11-14T22:13:20.999Z"),  # truncated: rounding would give 21.000
        (NOW + 0.9999, "2023-11-14T22:13:20.999Z"),
        (NOW + 0.9999997, "2023-11-14T22:13:20.999Z"),
        (1893456000.0009996, "2030-01-01T00:00:00.000Z"),  # not .001 (datetime's rounding)
        (-0.5, "1969-12-31T23:59:59.500Z"),
    ],
)
def test_utc_millis(ts: float, expected: str) -> None:
    assert utc_millis(ts) == expected


def test_utc_millis_is_fixed_width_and_sorts_by_time() -> None:
    rng = random.Random(1)
    times = sorted(rng.uniform(0, 4_102_444_800) for _ in range(2000))  # 1970-2100
    texts = [utc_millis(t) for t in times]
    assert {len(t) for t in texts} == {24}
    assert texts == sorted(texts)


def test_the_remembered_second_never_shows_for_another() -> None:
    """utc_millis remembers the last second's text: instants that hop between neighbouring
    seconds (and days, and the epoch) in any order each get their own."""
    rng = random.Random(3)
    bases = [NOW - 1, NOW, NOW + 1, 86_399.0, 86_400.0, -1.0, 0.0]
    for _ in range(5_000):
        ts = rng.choice(bases) + rng.choice([0.0, 0.0004, 0.5, 0.999])
        sec, frac = divmod(int(ts * 1000), 1000)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:03d}Z"
        assert utc_millis(ts) == expected


def test_millisecond_instants_round_trip() -> None:
    # Between 2004-11-03 (2**40 ms) and 2038-01-19 (2**31 s) every whole millisecond, as the
    # nearest float, formats as itself and survives parse → format. (Outside that range
    # `int(ts * 1000)` can land one millisecond low; the audit format keeps that behaviour.)
    rng = random.Random(2)
    for _ in range(20_000):
        ms = rng.randrange(2**40, 2**31 * 1000)
        text = utc_millis(ms / 1000)
        assert text[-5:] == f".{ms % 1000:03d}Z"
        parsed = parse_rfc3339(text)
        assert parsed is not None
        assert utc_millis(parsed) == text


def test_second_instants_round_trip() -> None:
    rng = random.Random(3)
    for t in [0, 951_782_400, 1_700_000_000, 2**31, 253_402_300_799] + [
        rng.randrange(0, 253_402_300_800) for _ in range(5000)
    ]:
        assert parse_rfc3339(utc_seconds(t)) == t
        assert parse_rfc3339(utc_seconds(t + 0.75)) == t


# -- parse_rfc3339 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01T00:00:00Z", ts(2026, 12, 1)),
        ("2026-12-01t00:00:00z", ts(2026, 12, 1)),  # RFC 3339 5.6: t and z in lower case
        ("2026-12-01T00:00:00z", ts(2026, 12, 1)),
        ("2026-12-01T02:00:00+02:00", ts(2026, 12, 1)),
        ("2026-11-30T19:30:00-04:30", ts(2026, 12, 1)),
        ("2026-12-01T00:00:00-00:00", ts(2026, 12, 1)),  # "unknown local offset": still UTC
        ("2026-12-01T23:59:00+23:59", ts(2026, 12, 1)),
        ("2026-12-01T00:00:00.250Z", ts(2026, 12, 1) + 0.25),
        ("2026-12-01T00:00:00,5Z", ts(2026, 12, 1) + 0.5),
        ("2030-01-01T01:00:00.5+01:00", 1893456000.5),
        ("2030-01-01T00:00:00.123456789Z", 1893456000.123456789),  # any number of digits
        ("  2026-12-01T00:00:00Z\n", ts(2026, 12, 1)),  # surrounding whitespace
        ("2028-02-29T12:00:00Z", ts(2028, 2, 29, 12)),  # a leap day
        ("0001-01-01T00:00:00Z", ts(1, 1, 1)),
        ("9999-12-31T23:59:59Z", ts(9999, 12, 31, 23, 59, 59)),
        # What the API server's date-time check lets through but is no instant:
        ("2026-02-30T00:00:00Z", None),
        ("2026-02-29T00:00:00Z", None),  # not a leap year
        ("2026-12-31T23:59:60Z", None),  # a leap second: no POSIX timestamp
        ("2026-12-01T24:00:00Z", None),
        ("2026-13-01T00:00:00Z", None),
        ("0000-01-01T00:00:00Z", None),
        ("2026-12-01T00:00:00+25:00", None),
        ("2026-12-01T00:00:00+24:00", None),
        ("2026-12-01T00:00:00x5Z", None),
        # ISO 8601, but not RFC 3339:
        ("2026-12-01", None),
        ("2026-12-01T00:00:00", None),
        ("2026-12-01 00:00:00Z", None),
        ("2026-12-01T00:00Z", None),
        ("2026-12-01T00Z", None),
        ("2026-12-01T00:00:00+0100", None),
        ("2026-12-01T00:00:00+01", None),
        ("2026-12-01T00:00:00+01:00:30", None),
        ("2026-12-01T00:00:00.Z", None),
        ("20261201T000000Z", None),
        ("2026-W49-2T00:00:00Z", None),
        ("+2026-12-01T00:00:00Z", None),
        ("2026-12-01T00:00:00UTC", None),
        ("\uff12\uff10\uff12\uff16-12-01T00:00:00Z", None),  # fullwidth digits
        # Not a time at all:
        ("tomorrow", None),
        ("", None),
        ("2026-12-01T00:00:00Z garbage", None),
        ("2026-12-01T00:00:00.\u0665Z", None),  # an Arabic-Indic digit in the fraction
    ],
)
def test_parse_rfc3339(text: str, expected: float | None) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize(
    "value", [None, 1764547200, 1764547200.0, b"2026-12-01T00:00:00Z", ["2026-12-01T00:00:00Z"]]
)
def test_parse_rfc3339_of_a_non_string_is_none(value: object) -> None:
    assert parse_rfc3339(value) is None


def test_offsets_name_the_same_instant() -> None:
    forms = ["2026-12-01T00:00:00Z", "2026-12-01T01:00:00+01:00", "2026-11-30T23:00:00-01:00"]
    assert {parse_rfc3339(f) for f in forms} == {ts(2026, 12, 1)}
