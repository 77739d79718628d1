"""Answer parsers for multi-token tasks: pull the final answer out of a generated response.

A task names its parser in its card (``"parser": "hash"`` or ``"boxed"``); generation-based
evaluation applies it to the model's response and to the gold target and scores exact match
of the two parsed answers. A response with no parsable answer is wrong.

- ``hash``: GSM8K style, the text after ``####``. Numbers are normalised (``1,000``,
  ``$1000``, ``1000.0``, ``1000.`` and ``1e3`` all become ``1000``; ``-0`` becomes ``0``);
  anything else is compared as lowercased text without a trailing period.
- ``boxed``: MATH style, the content of the last ``\\boxed{...}`` (nested braces allowed),
  normalised the way the MATH benchmark does (``\\dfrac`` -> ``\\frac``, ``\\frac12`` ->
  ``\\frac{1}{2}``, ``\\left``/``\\right``, units in ``\\text{}``, degrees, spaces, ``0.5``/``.5``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from ia2cache.errors import IA2Error


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; None when ``text`` is not one number."""
    s = text.strip().rstrip(".").strip()
    s = s.replace("$", "").replace(" ", "")
    if "," in s:
        # Only thousands separators: "1,2" is a list, not twelve.
        if not re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?%?", s):
            return None
        s = s.replace(",", "")
    if s.endswith("%"):
        s = s[:-1]
    if not s or not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    out = format(value.normalize(), "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out


def parse_hash(text: str) -> str | None:
    """The answer after the first ``####``, up to the end of its line; None if there is none."""
    if "####" not in text:
        return None
    answer = text.split("####", 1)[1].split("\n", 1)[0].strip()
    if not answer:
        return None
    number = normalize_number(answer)
    if number is not None:
        return number
    # "#### 18 dollars", "#### $18 per day": the first word, when it is a number.
    number = normalize_number(answer.split()[0])
    if number is not None:
        return number
    return " ".join(answer.lower().rstrip(".").split())


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces;
    ``\\boxed 5`` (no braces) gives ``5``. None when there is none or it is unclosed."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    if not starts:
        return None
    i = starts[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part or part[0] == "{":
            if part.startswith("{"):
                # \frac{a}b -> \frac{a}{b}
                depth, end = 0, None
                for j, c in enumerate(part):
                    depth += (c == "{") - (c == "}")
                    if depth == 0:
                        end = j
                        break
                if end is not None and end + 1 < len(part) and part[end + 1] not in "{":
                    part = part[: end + 1] + "{" + part[end + 1] + "}" + part[end + 2 :]
            out += part
            continue
        if len(part) < 2:
            out += part
            continue
        a, b = part[0], part[1]
        if b == "{":
            out += "{" + a + "}" + part[1:]
        else:
            out += "{" + a + "}{" + b + "}" + part[2:]
    return out


def _fix_slash(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_math(s: str) -> str:
    """MATH-style normalisation of a final answer, so equivalent spellings compare equal."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    # Units: "5\\text{ cm}" -> "5" (a trailing \\text whose content starts with a space).
    s = re.sub(r"\\(?:text|mbox)\{\s+[^{}]*\}\s*$", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.strip().rstrip(".")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" -> "5" when the left side is a short variable name
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_slash(s)
    number = normalize_number(s) if re.fullmatch(r"[-+\d.,]+", s) else None
    return number if number is not None else s


def parse_boxed(text: str) -> str | None:
    """The normalised content of the last ``\\boxed{...}``; None if there is none."""
    inner = last_boxed(text)
    if inner is None:
        return None
    out = normalize_math(inner)
    return out or None


PARSERS: dict[str, Callable[[str], str | None]] = {"hash": parse_hash, "boxed": parse_boxed}
"""Registered answer parsers, by the name a task card uses."""


def get_parser(name: str) -> Callable[[str], str | None]:
    try:
        return PARSERS[name]
    except KeyError:
        raise IA2Error(f"answer parser {name!r}: unknown; choose one of {', '.join(PARSERS)}") from None


def exact_match(parser: str, response: str, target: str) -> bool:
    """True when ``response`` parses to the same answer as ``target``."""
    parse = get_parser(parser)
    pred = parse(response)
    return pred is not None and pred == parse(target)


__all__ = ["PARSERS", "get_parser", "exact_match", "parse_hash", "parse_boxed", "normalize_number",
           "normalize_math", "last_boxed"]
