"""PII redaction: e-mail addresses, IP addresses, phone numbers and payment card numbers become placeholders.

FineWeb and Dolma redact e-mail and IP addresses; StarCoder adds keys, and keeps private IPs. The patterns are
written for precision: a real corpus is full of text shaped like personal data that is not, so each kind is a
compiled pattern followed by a check of what it found, and a kind runs only on texts that hold its trigger
(an `@`, a digit, a `::`), found by a C-level scan before the pattern runs.

- e-mail: `local@domain.tld` with a letter TLD. Addresses at the domains reserved for examples (example.com,
  .org, .net; the .example, .test, .invalid, .localhost TLDs; RFC 2606) are kept: they are nobody's.
- IPv4: four octets 0-255 without leading zeros, not part of a longer dotted run (1.2.3.4.5) nor glued to a word
  (v1.2.3.4), not after a version word ("version 10.0.100.1", "release", "rev", "ver"), and with at least one
  octet of three digits: in documentation, dotted quads of small numbers are section numbers ("see Section
  24.2.2.4") and versions ("GCC 2.7.2.2"), while a random address has all four octets below 100 about 2% of the
  time (8.8.8.8, a public resolver, is no one's address). By default only globally routable addresses
  (`ipaddress.is_global`): 127.0.0.1, 10.x, 192.168.x and the documentation ranges are no one's address.
- IPv6: a valid address (`ipaddress`) with at least three groups written out, so `1::2` (a slice) and `::1` are
  kept; the same public-only rule.
- phone: with a `+` country code, 8 to 15 digits in groups separated by one space, dot or hyphen (E.164), or 11
  to 15 digits without separators (+14155550132; +32768000 is a signed number in a man page);
  without one, only the North American forms (415) 555-0132, 415-555-0132 and 415.555.0132 (area and exchange
  codes start with 2-9), optionally after `1-`. Dates (2024-01-15), ISBNs (978-0-306-40615-7), ranges and bare
  digit runs do not have these shapes; other countries' national formats without `+` are not recognised.
- card: 13 to 19 digits, contiguous or in groups of four (Amex and Diners: 4-6-5, 4-6-4) with one kind of
  separator, starting with a card brand's prefix (Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay)
  at a length that brand issues, and passing the Luhn check digit. ISBN-13s (978/979) and timestamps have no brand
  prefix.

Where candidates overlap, the longest wins (then the order e-mail, card, IP, phone), so a card number is never cut
by a phone number inside it. A kind switched off keeps its text. `Edit.counts` holds the redactions per kind
(`pii_<kind>`) and the documents edited (`pii_documents`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from dataprep.filters.base import BaseFilter, Edit, Verdict

KINDS = ("email", "card", "ip", "phone")

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
                    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![\w@-])")
_EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net")
_EXAMPLE_TLDS = (".example", ".test", ".invalid", ".localhost")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)", re.ASCII)
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|versions|release|rev|ver)\.?|\bv\.)\s*$", re.IGNORECASE)
_HEX = r"[0-9A-Fa-f]{1,4}"
_IPV6 = re.compile(rf"(?<![\w:.])(?:{_HEX}(?::{_HEX}){{7}}"
                   rf"|(?:{_HEX}(?::{_HEX}){{0,6}})?::(?:{_HEX}(?::{_HEX}){{0,6}})?)(?![\w:]|\.\d)")
# What every IPv6 address holds: a `::` or two groups between colons. Both begin with a literal, which the regex
# engine finds at memchr speed; the address pattern then runs only on the words around them.
_IPV6_ANCHOR = re.compile(rf"::|:{_HEX}:{_HEX}:")
_EMAIL_ANCHOR = re.compile("@")
# The digit kinds' patterns are ASCII: `\d` is 0-9, as the Luhn check and the octets' ranges read them.
# Every card, phone or IPv4 candidate lies in a run of these characters of at least 7 (1.1.1.1): the digit kinds'
# patterns run only inside such runs, found in one scan that skips everything else at C speed.
_DIGIT_RUN = re.compile(r"[0-9][0-9 ().+-]{5,}[0-9]")
_SPACE = re.compile(r"\s")

_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\)|[ .-]?\d{1,4}){2,6}"  # +44 20 7946 0958, +1 (415) 555-0132
    r"|(?:1-)?(?:\([2-9]\d\d\) ?[2-9]\d\d-\d{4}|[2-9]\d\d-[2-9]\d\d-\d{4}|[2-9]\d\d\.[2-9]\d\d\.\d{4})"
    r")(?![\w-]|[.,]\d)", re.ASCII)

_CARD = re.compile(r"(?<![\w.+-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{1,4}(?:\1\d{3})?|\d{4}([ -]?)\d{6}\2\d{4,5})"
                   r"(?![\w-]|[.,]\d)", re.ASCII)
# (first digits, lowest, highest, lengths issued); prefixes compare as integers of the same number of digits
_CARD_BRANDS = (
    (1, 4, 4, (13, 16, 19)),  # Visa
    (2, 51, 55, (16,)), (4, 2221, 2720, (16,)),  # Mastercard
    (2, 34, 34, (15,)), (2, 37, 37, (15,)),  # American Express
    (4, 6011, 6011, range(16, 20)), (3, 644, 649, range(16, 20)), (2, 65, 65, range(16, 20)),  # Discover
    (3, 300, 305, range(14, 20)), (2, 36, 36, range(14, 20)), (2, 38, 39, range(16, 20)),  # Diners Club
    (4, 3528, 3589, range(16, 20)),  # JCB
    (2, 62, 62, range(16, 20)),  # UnionPay
)


def luhn_valid(digits: str) -> bool:
    """The Luhn check digit (ISO/IEC 7812): every second digit from the right doubled, the sum a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_card_number(text: str) -> bool:
    """A brand's prefix at a length it issues, and a valid check digit."""
    digits = text.replace(" ", "").replace("-", "")
    brand = any(lo <= int(digits[:width]) <= hi and len(digits) in lengths
                for width, lo, hi, lengths in _CARD_BRANDS)
    return brand and luhn_valid(digits)


def _is_email(match: re.Match) -> bool:
    domain = match.group(1).lower()
    return not (domain.endswith(_EXAMPLE_TLDS) or any(domain == d or domain.endswith("." + d)
                                                      for d in _EXAMPLE_DOMAINS))


def _phone_digits_ok(match: re.Match) -> bool:
    """E.164 numbers have at most 15 digits; written without separators they need 11 (a country code and a full
    national number), since man pages and code write signed values like +32768000."""
    text = match.group()
    if not text.startswith("+"):
        return True
    return (11 if text[1:].isdigit() else 8) <= sum(c.isdigit() for c in text) <= 15


@dataclass(frozen=True, kw_only=True)
class PiiFilter(BaseFilter):
    """Replace each kind of personal data with its placeholder; a kind whose flag is false is left alone."""

    name = "pii"

    emails: bool = True
    email_replacement: str = "<EMAIL>"
    ips: bool = True
    ip_replacement: str = "<IP>"
    public_ips_only: bool = True
    phones: bool = True
    phone_replacement: str = "<PHONE>"
    cards: bool = True
    card_replacement: str = "<CARD>"

    def check(self, text: str) -> Verdict:
        found = self.find(text)
        if not found:
            return None
        replacement = {"email": self.email_replacement, "card": self.card_replacement, "ip": self.ip_replacement,
                       "phone": self.phone_replacement}
        pieces, counts, at = [], {"pii_documents": 1}, 0
        for start, end, kind in found:
            pieces += [text[at:start], replacement[kind]]
            counts[f"pii_{kind}"] = counts.get(f"pii_{kind}", 0) + 1
            at = end
        pieces.append(text[at:])
        return Edit("".join(pieces), counts)

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, kind) of every span to redact, in order and not overlapping: of overlapping candidates the
        longest wins, then the earlier kind of `KINDS`."""
        found: list[tuple[int, int, str]] = []
        if self.emails and "@" in text:
            for lo, hi in _words_around(text, _EMAIL_ANCHOR):
                found += [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text, lo, hi) if _is_email(m)]
        kinds = [(kind, pattern, accept) for kind, pattern, accept, on in (
            ("card", _CARD, _is_card_match, self.cards), ("ip", _IPV4, self._is_ipv4, self.ips),
            ("phone", _PHONE, _phone_digits_ok, self.phones)) if on]
        if kinds:
            for run in _DIGIT_RUN.finditer(text):
                lo, hi = max(0, run.start() - 1), run.end() + 2  # the + or ( before; what the lookaheads read
                for kind, pattern, accept in kinds:
                    found += [(m.start(), m.end(), kind) for m in pattern.finditer(text, lo, hi) if accept(m)]
        if self.ips and ":" in text:
            for lo, hi in _words_around(text, _IPV6_ANCHOR):
                found += [(m.start(), m.end(), "ip") for m in _IPV6.finditer(text, lo, hi) if self._is_ipv6(m)]
        return _without_overlaps(found)

    def _is_ipv4(self, match: re.Match) -> bool:
        if all(len(octet) < 3 for octet in match.group().split(".")):
            return False  # section numbers (24.2.2.4) and versions (2.7.2.2)
        if _VERSION_BEFORE.search(match.string, max(0, match.start() - 12), match.start()):
            return False
        return not self.public_ips_only or ipaddress.IPv4Address(match.group()).is_global

    def _is_ipv6(self, match: re.Match) -> bool:
        text = match.group()
        if sum(1 for group in text.split(":") if group) < 3:
            return False
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            return False
        return not self.public_ips_only or address.is_global


def _words_around(text: str, anchor: re.Pattern) -> list[tuple[int, int]]:
    """(start, end) of each whitespace-delimited word holding a match of `anchor` (addresses hold no space)."""
    windows, found = [], anchor.search(text)
    while found:
        at = found.start()
        lo = max(text.rfind(" ", 0, at), text.rfind("\n", 0, at), text.rfind("\t", 0, at)) + 1
        space = _SPACE.search(text, at)
        hi = space.start() if space else len(text)
        windows.append((lo, hi))
        found = anchor.search(text, hi)
    return windows


def _without_overlaps(found: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    kept: list[tuple[int, int, str]] = []
    for start, end, kind in sorted(found, key=lambda s: (s[0], s[0] - s[1], KINDS.index(s[2]))):
        if kept and start < kept[-1][1]:
            continue
        kept.append((start, end, kind))
    return kept


def _is_card_match(match: re.Match) -> bool:
    return is_card_number(match.group())
