"""PII redaction on real text with planted personal data and planted look-alikes: exactly the planted values
become placeholders, every other character stays, and each kind is counted."""

from __future__ import annotations

import gzip
import json

import pytest

from dataprep.config import PiiConfig, parse_prep_config
from dataprep.filters import filter_for
from dataprep.filters.pii import PiiFilter, luhn_valid
from dataprep.normalize import normalize_text
from orchestrator.errors import SpecError

# Published test numbers of the card brands (valid check digits), and the same with the last digit changed.
CARDS = ["4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", "6011111111111117", "3530111333300000"]
BAD_CHECK_DIGIT = ["4111 1111 1111 1112", "5555555555554440", "378282246310006"]

PLANTED = {
    "email": ["jane.doe@mailbox.org", "j_smith+news@uni-heidelberg.de", "x@sub.domain.co.uk"],
    "ip": ["81.2.69.142", "172.217.16.195", "2606:4700:4700::1111", "2a00:1450:4001:82b::200e"],
    "phone": ["+44 20 7946 0958", "+1 (415) 555-0132", "(212) 555-0187", "415-555-0132", "+33 1 23 45 67 89",
              "1-800-555-0199", "415.555.0132", "+14155550132"],
    "card": CARDS,
}
# Shaped like personal data, and not: each must come through unchanged.
LOOK_ALIKES = [
    *BAD_CHECK_DIGIT, "user@example.com", "admin@mail.example", "@property", "name@1.2.3", "git@github",
    "192.168.1.20", "127.0.0.1", "10.20.30.40", "203.0.113.5", "0.0.0.0", "version 10.0.100.1", "v1.2.3.4",
    "Section 24.2.2.4", "GCC 2.7.2.2", "1.2.3.4.5", "256.1.1.1", "::1", "fe80::1", "a[1::2]", "12:30:45",
    "std::vector", "2001:db8::1", "2024-01-15", "2026-11-30T15:39:21Z", "ISBN 978-0-306-40615-7", "9780306406157",
    "123-45-6789", "1990-2000", "pages 100-200", "3.14159", "555-0132", "1234567890", "(123) 456-7890",
    "1700000000000", "1,234,567,890", "$1,000.00", "x+12345", "UTC+2", "(-32768000, +32768000)",
]


def _real_paragraphs(sample_corpora, n=40) -> list[str]:
    with gzip.open(sample_corpora["wiki_vital_en"], "rt", encoding="utf-8") as f:
        return [normalize_text(json.loads(line)["text"]) for line, _ in zip(f, range(n), strict=False)]


def _plant(paragraphs: list[str], values: list[tuple[str, str]], shown: dict[str, str]) -> tuple[list[str], list[str]]:
    """Documents with the values written into real text, and the same documents as redaction should leave them:
    each value replaced by `shown[kind]` (or kept where its kind is absent)."""
    docs, expected = [], []
    for i, text in enumerate(paragraphs):
        kind, value = values[i % len(values)]
        words = text.split(" ")
        cut = len(words) // 2
        head, tail = " ".join(words[:cut]), " ".join(words[cut:])
        docs.append(f"{head} (contact: {value}) {tail}")
        expected.append(f"{head} (contact: {shown.get(kind, value)}) {tail}")
    return docs, expected


def _planted_values() -> list[tuple[str, str]]:
    values = [(kind, v) for kind, vs in PLANTED.items() for v in vs]
    values += [("look-alike", v) for v in LOOK_ALIKES]
    return values


def _redact(f: PiiFilter, docs: list[str]) -> tuple[list[str], dict[str, int]]:
    out, counts = [], {}
    for doc, verdict in zip(docs, f.apply(docs), strict=True):
        assert verdict is None or verdict.counts, "an edit says what it changed"
        out.append(doc if verdict is None else str(verdict))
        for name, n in (verdict.counts if verdict is not None else {}).items():
            counts[name] = counts.get(name, 0) + n
    return out, counts


def test_planted_values_are_redacted_exactly_and_nothing_else(sample_corpora):
    values = _planted_values()
    docs, expected = _plant(_real_paragraphs(sample_corpora, len(values)), values,
                            {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "card": "<CARD>"})
    redacted, counts = _redact(PiiFilter(), docs)
    for got, want in zip(redacted, expected, strict=True):
        assert got == want
    assert counts == {**{f"pii_{kind}": len(vs) for kind, vs in PLANTED.items()},
                      "pii_documents": sum(map(len, PLANTED.values()))}


def test_each_kind_can_be_switched_off_or_given_its_own_placeholder(sample_corpora):
    values = _planted_values()
    paragraphs = _real_paragraphs(sample_corpora, len(values))
    config = PiiConfig(phones=False, email_replacement="[email]", card_replacement="")
    docs, expected = _plant(paragraphs, values, {"email": "[email]", "ip": "<IP>", "card": ""})
    redacted, counts = _redact(filter_for(config), docs)
    assert redacted == expected
    assert "pii_phone" not in counts and counts["pii_card"] == len(CARDS)


def test_private_addresses_are_redacted_when_asked():
    f = PiiFilter(public_ips_only=False)
    text = "bound to 192.168.1.20 and fe80::7a31:c1ff:0:0 but not ::1 nor section 24.2.2.4"
    assert f.check(text) == "bound to <IP> and <IP> but not ::1 nor section 24.2.2.4"


def test_adjacent_and_overlapping_candidates():
    """A card number is never cut by a phone number inside it; values glued by punctuation are found apart."""
    f = PiiFilter()
    assert f.check("pay 4111-1111-1111-1111 now") == "pay <CARD> now"
    assert f.check("a@mailbox.org,b@mailbox.org;81.2.69.142.") == "<EMAIL>,<EMAIL>;<IP>."
    verdict = f.check("Call +1 (415) 555-0132 or 415-555-0132.\nMail jane@mailbox.org")
    assert verdict == "Call <PHONE> or <PHONE>.\nMail <EMAIL>"
    assert verdict.counts == {"pii_phone": 2, "pii_email": 1, "pii_documents": 1}


@pytest.mark.parametrize("number", CARDS + BAD_CHECK_DIGIT)
def test_luhn_against_the_definition(number):
    """The check digit is the one that makes the doubled-digit sum a multiple of 10 (ISO/IEC 7812)."""
    digits = [int(c) for c in number if c.isdigit()]
    body, check = digits[:-1], digits[-1]
    doubled = [sum(divmod(2 * d, 10)) if i % 2 == 0 else d for i, d in enumerate(reversed(body))]
    assert luhn_valid("".join(map(str, digits))) == ((10 - sum(doubled) % 10) % 10 == check)


def test_real_documentation_keeps_section_numbers_and_loopback(sample_corpora):
    """The PostgreSQL manual is full of 24.2.2.4-style section numbers and 127.0.0.1: none is redacted; what is
    found are its authors' and lists' e-mail addresses and the public address of an example."""
    f = PiiFilter()
    with gzip.open(sample_corpora["postgres_docs"], "rt", encoding="utf-8") as fh:
        texts = [normalize_text(json.loads(line)["text"]) for line in fh]
    found = [(kind, text[start:end]) for text in texts for start, end, kind in f.find(text)]
    assert {kind for kind, _ in found} <= {"email", "ip"} and len(found) > 10
    for kind, value in found:
        assert ("@" in value) if kind == "email" else any(len(octet) == 3 for octet in value.split("."))
    sections = sum(text.count("Section 24.2.2") for text in texts)
    assert sections and sum(str(f.check(t) or t).count("Section 24.2.2") for t in texts) == sections


def test_bad_settings_name_their_field(tmp_path):
    raw = {"output": str(tmp_path / "out"), "sources": {"s": {"path": str(tmp_path)}},
           "filters": {"pii": {"emails": "sometimes", "card_replacement": "#" * 101}}}
    expected = (r"prep\.yaml: 2 problems\n  filters\.pii\.emails: got 'sometimes', expected true or false\n"
                r"  filters\.pii\.card_replacement: 101 characters; at most 100")
    with pytest.raises(SpecError, match=expected):
        parse_prep_config(raw, source="prep.yaml")
