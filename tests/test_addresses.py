"""The strict recipient parser shared by the smtp executor and the ``recipients`` matcher (G1)."""

from __future__ import annotations

import email
import email.policy
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import SmtpSink

from authority_sdk.addresses import (
    AddressError,
    Recipient,
    domain_matches,
    normalise_domain,
    normalise_domain_pattern,
    parse_address,
    parse_recipient_field,
    parse_recipients,
)
from authority_sdk.executors import build_executor
from authority_sdk.executors.smtp import build_message
from authority_sdk.policy import SmtpExecutor

KEY = "act_addresses"


@pytest.mark.parametrize(("value", "expected"), [
    ("boss@example.com", ("", "boss", "example.com")),
    ("Boss <boss@example.com>", ("Boss", "boss", "example.com")),
    ('"Smith, John" <j@example.com>', ("Smith, John", "j", "example.com")),
    ('"a\\"b; c: d" <c@x.org>', ('a"b; c: d', "c", "x.org")),
    ("Zoë Ünal <zoe@example.org>", ("Zoë Ünal", "zoe", "example.org")),
    ("<ann@x.org>", ("", "ann", "x.org")),
    ("A.B+tag@EXAMPLE.Com", ("", "A.B+tag", "example.com")),
    # Full-width letters: folded to ASCII, and sent to that ASCII domain.
    ("boss@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", ("", "boss", "example.com")),
    ("a@bücher.example", ("", "a", "xn--bcher-kva.example")),
])
def test_one_address_per_value(value: str, expected: tuple[str, str, str]) -> None:
    r = parse_address(value)
    assert (r.display_name, r.username, r.domain) == expected


@pytest.mark.parametrize(("value", "problem"), [
    # The attacks of issue 10 G1, and their relatives.
    ("evil@attacker.com, boss@example.com", "exactly one address"),
    ("evil@attacker.com; boss@example.com", "exactly one address"),
    ("team: evil@attacker.com, boss@example.com;", "exactly one address"),
    ("boss@example.com (evil@attacker.com)", "comments"),
    ("boss@example.com,", "exactly one address"),
    ("Smith, John <j@example.com>", "exactly one address"),
    ('"boss@example.com" <evil@attacker.com>', "display name must not contain @"),
    ('"Boss <boss" <evil@attacker.com>', "display name must not contain"),
    ("=?utf-8?q?boss=40example.com?= <evil@attacker.com>", "encoded words"),
    ('"evil@attacker.com"@example.com', "part before @"),
    ("evil%attacker.com@example.com", "part before @"),
    ("attacker.com!evil@example.com", "part before @"),
    ("<@example.com:evil@attacker.com>", "exactly one address"),
    ("evil@[203.0.113.9]", "not a host name"),
    ("boss@example.com.", "well-formed"),
    ("boss@example..com", "well-formed"),
    ("boss@-example.com", "not a host name"),
    ("boss@example.com\nBcc: evil@attacker.com", "line break"),
    ("boss@example.com\r\n", "line break"),
    ("boss@example.com\u2028", "line break"),
    ("boss@exam\u200bple.com", "U+200B"),
    ("\u202eboss@example.com", "U+202E"),  # right-to-left override: shows a different address
    ("Boss\u200d <boss@example.com>", "U+200D"),
    ("boss@example.com\x00", "U+0000"),
    ("zoë@example.org", "well-formed"),
    ("not-an-address", "well-formed"),
    ("@example.com", "well-formed"),
    ("boss@", "not an email address"),  # the stdlib parser raises on this one
    ("", "empty"),
    ("   ", "empty"),
    ("a" * 600 + "@example.com", "at most"),
    ("x@" + "a" * 64 + ".com", "not a host name"),
])
def test_hostile_values_are_refused(value: str, problem: str) -> None:
    with pytest.raises(AddressError) as ei:
        parse_address(value)
    assert problem in ei.value.problem
    # The message never quotes the value: it may be a redacted field, or huge.
    if len(value.strip()) > 3:
        assert value.strip() not in str(ei.value)


@pytest.mark.parametrize("value", [42, None, True, {"to": "a@x.org"}, ["a@x.org"]])
def test_a_value_must_be_a_string(value: Any) -> None:
    with pytest.raises(AddressError, match="must be a string"):
        parse_address(value)


def test_fields_take_a_string_or_a_list_and_name_the_failing_item() -> None:
    assert parse_recipient_field("a@x.org", "to") == [Recipient("", "a", "x.org")]
    assert parse_recipient_field([], "cc") == []
    with pytest.raises(AddressError) as ei:
        parse_recipient_field(["a@x.org", "b@y.org, c@z.org"], "cc")
    assert ei.value.field == "cc[1]"
    with pytest.raises(AddressError) as ei:
        parse_recipient_field({"x": 1}, "bcc")
    assert ei.value.field == "bcc" and "not an object" in ei.value.problem
    with pytest.raises(AddressError, match="at most 100"):
        parse_recipient_field([f"u{i}@x.org" for i in range(101)], "to")


def test_parse_recipients_reads_to_cc_and_bcc_only() -> None:
    got = parse_recipients({"to": "a@x.org", "cc": None, "bcc": ["b@y.org"], "subject": "c@z"})
    assert {f: [r.addr_spec for r in rs] for f, rs in got.items()} == {
        "to": ["a@x.org"], "bcc": ["b@y.org"]}


def test_domains_and_patterns() -> None:
    assert normalise_domain("Example.COM") == "example.com"
    assert normalise_domain("EXAMPLE。com") == "example.com"  # ideographic full stop
    # A look-alike from another script is another domain, never the one it imitates.
    assert normalise_domain("ex\u0430mple.com") != "example.com"  # Cyrillic a
    assert normalise_domain_pattern("*.Example.com") == "*.example.com"
    for bad in ("", "a_b.com", "example.com.", "-x.com", "[1.2.3.4]", "*", "*.", "a..b"):
        with pytest.raises(AddressError):
            normalise_domain_pattern(bad)
    assert domain_matches("example.com", ["example.com"])
    assert not domain_matches("mail.example.com", ["example.com"])  # no subdomain unless listed
    assert domain_matches("mail.example.com", ["*.example.com"])
    assert not domain_matches("example.com", ["*.example.com"])
    assert not domain_matches("badexample.com", ["*.example.com", "example.com"])
    assert not domain_matches("example.com.evil.org", ["example.com"])


# ------------------------------------------------------------ round trip (approver == sent)

_ATEXT = string.ascii_letters + string.digits + "#$&'*+/=?^_`{|}~-"
_local = st.lists(st.text(_ATEXT, min_size=1, max_size=8), min_size=1, max_size=3).map(
    ".".join).filter(lambda s: "=?" not in s)  # refused on purpose: it looks like an encoded word
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=3).map(".".join)
# Display names with everything that needs quoting: , ; : " \ ( ) and non-ASCII letters.
_name = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"),
                  exclude_characters="@<>"),
    max_size=20).filter(lambda s: "=?" not in s)


@st.composite
def recipient_values(draw: st.DrawFn) -> tuple[str, Recipient]:
    """A value as a model may write it, and the recipient it must parse to."""
    name, local, domain = draw(_name), draw(_local), draw(_domain)
    r = Recipient(" ".join(name.split()), local, domain)
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    value = draw(st.sampled_from([r.header, f"{quoted} <{r.addr_spec}>"]) if name.strip()
                 else st.just(r.addr_spec))
    return value, r


def _header_addresses(msg: email.message.EmailMessage, name: str) -> list[tuple[str, str]]:
    header = msg[name]
    if header is None:
        return []
    return [(a.display_name, a.addr_spec) for a in header.addresses]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(to=st.lists(recipient_values(), min_size=1, max_size=3),
       cc=st.lists(recipient_values(), max_size=3),
       bcc=st.lists(recipient_values(), max_size=2))
def test_round_trip_what_is_sent_is_what_was_parsed(
        to: list[tuple[str, Recipient]], cc: list[tuple[str, Recipient]],
        bcc: list[tuple[str, Recipient]]) -> None:
    """Parse the arguments; build the message; parse the bytes that go on the wire: the
    recipients by field, with their display names, are the ones the rule and approver saw."""
    args = {"to": [v for v, _ in to], "cc": [v for v, _ in cc], "bcc": [v for v, _ in bcc],
            "subject": "s", "body": "b"}
    parsed = parse_recipients(args)
    assert parsed == {"to": [r for _, r in to], "cc": [r for _, r in cc],
                      "bcc": [r for _, r in bcc]}
    msg, envelope, by_field = build_message("agent@example.com", args, KEY)
    assert by_field == parsed
    wire = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert isinstance(wire, email.message.EmailMessage)
    for field, header in (("to", "To"), ("cc", "Cc")):
        assert _header_addresses(wire, header) == [(r.display_name, r.addr_spec)
                                                   for r in parsed[field]]
    assert wire["Bcc"] is None  # bcc recipients are in the envelope only
    assert envelope == list(dict.fromkeys(r.addr_spec for rs in parsed.values() for r in rs))
    # And what is written parses back to itself: an approver's copy re-checks the same.
    for rs in parsed.values():
        for r in rs:
            assert parse_address(r.header) == r


def test_round_trip_through_a_real_smtp_server() -> None:
    args = {"to": ['"Smith, John" <john@example.com>', "Zoë <zoe@example.org>"],
            "cc": ['"a\\"b" <ab@example.com>'], "bcc": "hidden@example.net",
            "subject": "s", "body": "b"}
    with SmtpSink() as sink:
        ex = build_executor("email", SmtpExecutor(type="smtp", host="127.0.0.1", port=sink.port,
                                                  sender="agent@example.com", timeout_s=5))
        preview = ex.describe("send_email", args, KEY)
        assert ex.execute("send_email", args, KEY).ok
        [mail] = sink.messages
    assert preview["recipients"] == {"to": ['"Smith, John" <john@example.com>',
                                            "Zoë <zoe@example.org>"],
                                     "cc": ['"a\\"b" <ab@example.com>'],
                                     "bcc": ["hidden@example.net"]}
    assert mail.rcpt_tos == preview["envelope"]["rcpt_to"] == [
        "john@example.com", "zoe@example.org", "ab@example.com", "hidden@example.net"]
    assert _header_addresses(mail.message, "To") == [("Smith, John", "john@example.com"),
                                                     ("Zoë", "zoe@example.org")]
    assert _header_addresses(mail.message, "Cc") == [('a"b', "ab@example.com")]
    assert "hidden" not in mail.data.decode()


@pytest.mark.parametrize("field", ["to", "cc", "bcc"])
def test_executor_refuses_two_addresses_in_one_value_in_every_field(field: str) -> None:
    args: dict[str, Any] = {"to": "boss@example.com", "subject": "s", "body": "b",
                            field: "evil@attacker.com, boss@example.com"}
    with SmtpSink() as sink:
        ex = build_executor("email", SmtpExecutor(type="smtp", host="127.0.0.1", port=sink.port,
                                                  sender="agent@example.com", timeout_s=5))
        res = ex.execute("send_email", args, KEY)
        assert sink.messages == []
    assert not res.ok and res.error == (
        f"email not sent: argument '{field}': one value must hold exactly one address (give a "
        "list of addresses instead; quote a display name that has , ; or :)")
