"""Answer parsers (ia2cache/answers.py) on the tricky cases of GSM8K and MATH answers."""

from __future__ import annotations

import pytest

from ia2cache.answers import (
    PARSERS,
    exact_match,
    get_parser,
    last_boxed,
    normalize_number,
    parse_boxed,
    parse_hash,
)
from ia2cache.errors import IA2Error


@pytest.mark.parametrize(("text", "want"), [
    ("She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 12", "12"),
    ("#### 1,000", "1000"),
    ("#### 1,234,567", "1234567"),
    ("#### $18", "18"),
    ("#### $ 18.00", "18"),
    ("#### 18.", "18"),
    ("#### 18.0", "18"),
    ("#### 0.50", "0.5"),
    ("#### .5", "0.5"),
    ("#### -3", "-3"),
    ("#### -0", "0"),
    ("#### +7", "7"),
    ("#### 25%", "25"),
    ("#### 1e3", "1000"),
    ("####42", "42"),
    ("#### 42 apples", "42"),
    ("#### 7\nQuestion: next one #### 9", "7"),  # the first answer, the rest is a runaway
    ("#### Mesophiles.", "mesophiles"),
    ("#### two  words", "two words"),
])
def test_hash_parser(text: str, want: str) -> None:
    assert parse_hash(text) == want


@pytest.mark.parametrize("text", ["no answer here", "The total is 12.", "####", "####   \nmore"])
def test_hash_parser_without_an_answer(text: str) -> None:
    assert parse_hash(text) is None


@pytest.mark.parametrize(("text", "want"), [
    ("1,2", None),  # a list, not twelve
    ("12,34", None),
    ("1,234.5", "1234.5"),
    ("007", "7"),
    ("3.1400", "3.14"),
    ("abc", None),
    ("", None),
])
def test_normalize_number(text: str, want: str | None) -> None:
    assert normalize_number(text) == want


@pytest.mark.parametrize(("text", "want"), [
    (r"so $x = \boxed{5}$.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\tfrac12}", r"\frac{1}{2}"),
    (r"\boxed{\frac1{2}}", r"\frac{1}{2}"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{\sqrt3}", r"\sqrt{3}"),
    (r"\boxed{ 3 }", "3"),
    (r"\boxed{x = 5}", "5"),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
    (r"\boxed{5\text{ cm}}", "5"),
    (r"\boxed{10^\circ}", "10"),
    (r"\boxed{10^{\circ}}", "10"),
    (r"\boxed{\$18.00}", "18"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{1,2}", "1,2"),
    (r"\boxed{\text{(A)}}", "(A)"),
    (r"\boxed 7", "7"),
    (r"\fbox{4}", "4"),
    (r"first \boxed{1} then \boxed{2}", "2"),  # the last box is the answer
    (r"\boxed{\{1, 2\}}", r"\{1,2\}"),
    (r"\boxed{{a}^{2}}", "{a}^{2}"),
])
def test_boxed_parser(text: str, want: str) -> None:
    assert parse_boxed(text) == want


@pytest.mark.parametrize("text", [r"\boxed{\frac{1}{2}", "no box", r"\boxed", r"\boxed{}"])
def test_boxed_parser_without_an_answer(text: str) -> None:
    assert parse_boxed(text) is None


def test_last_boxed_keeps_nested_braces() -> None:
    assert last_boxed(r"\boxed{\frac{a^{2}}{b}} end") == r"\frac{a^{2}}{b}"


def test_exact_match_compares_parsed_answers() -> None:
    gold = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
    assert exact_match("hash", "3 and 4 make 7.\n#### 7.0", gold)
    assert not exact_match("hash", "#### 8", gold)
    assert not exact_match("hash", "seven", gold)  # no answer is wrong, never None == None
    assert not exact_match("hash", "no answer", "no answer either")
    assert exact_match("boxed", r"so \boxed{\dfrac{1}{2}}", r"\boxed{\frac12}")
    assert not exact_match("boxed", r"\boxed{\frac{1}{3}}", r"\boxed{\frac12}")


def test_unknown_parser_is_refused() -> None:
    assert set(PARSERS) == {"hash", "boxed"}
    with pytest.raises(IA2Error, match="answer parser 'nope'"):
        get_parser("nope")
