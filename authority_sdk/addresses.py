"""Email recipients, parsed strictly: the one parser of the rule matcher and the smtp executor.

A model's arguments are attacker-controlled, and the classic tricks all make a
reader (a glob, a person) see one recipient where the mail server sees another:
``"evil@attacker.com, boss@example.com"`` (two addresses in one value), a group
(``team: a@x.org, b@y.org;``), a comment (``boss@example.com (evil@x.org)``),
an encoded word that decodes to an address in the display name, an obsolete
source route, a quoted local part hiding an ``@``, invisible or bidi characters,
a line break that starts a new header. So one value is accepted only if it is
exactly one address and nothing else:

- a string of at most ``MAX_VALUE_CHARS`` characters, with no control, format
  (zero-width, bidi), line/paragraph separator, private-use or unassigned
  characters, and no encoded words (``=?``);
- that parses (``email.headerregistry``, policy ``default``) without a single
  defect to exactly one address outside any group, with no comment;
- whose local part is a dot-atom of printable ASCII (no quoted local part, no
  ``%`` or ``!`` relay hacks) and whose domain is a host name: letters, digits
  and hyphens in dot-separated labels (no address literal, no trailing dot).
  A non-ASCII domain is converted to its ASCII (IDNA, UTS #46) form, which is
  what the rule sees and what is sent; the local part must be ASCII (no SMTPUTF8);
- whose display name, if any, holds no ``@``, ``<`` or ``>`` (it must not pass
  for an address) and at most ``MAX_DISPLAY_NAME_CHARS`` characters (white space
  runs read as one space), and which reads back as the same address once written.

What is written back always quotes the display name when it needs quoting
(``"Smith, John" <j@example.com>``), so the message carries exactly the
recipients that were checked and shown.

Pure functions, no I/O; the ``email`` package is imported on first use.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "RECIPIENT_FIELDS",
    "AddressError",
    "Recipient",
    "domain_matches",
    "header_registry",
    "normalise_domain",
    "normalise_domain_pattern",
    "parse_address",
    "parse_recipient_field",
    "parse_recipients",
    "wire_header",
]

# The argument fields that name recipients, in the order the executor reads them.
RECIPIENT_FIELDS: tuple[str, ...] = ("to", "cc", "bcc")
MAX_VALUE_CHARS = 512
MAX_DISPLAY_NAME_CHARS = 128  # keeps every line of a header well under SMTP's 998
MAX_RECIPIENTS = 100  # per field: a bounded envelope, and bounded work for the matcher

_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
# RFC 5322 atext without "%" and "!" (old relay syntaxes that route past the domain).
_LOCAL_PART = re.compile(r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class AddressError(ValueError):
    """A value that is not exactly one acceptable address; ``problem`` never quotes the value."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        self.problem = problem
        self.field = field
        super().__init__(f"{field}: {problem}" if field else problem)


@dataclass(frozen=True, slots=True)
class Recipient:
    """One parsed address. ``domain`` is lower-case ASCII (IDNA), ``username`` as written."""

    display_name: str
    username: str
    domain: str

    @property
    def addr_spec(self) -> str:
        return f"{self.username}@{self.domain}"

    @property
    def header(self) -> str:
        """The address as a person reads it: display name quoted when it needs to be."""
        return _render(self.display_name, self.username, self.domain)

    @property
    def wire(self) -> str:
        """The address as it goes into the message: ASCII, a non-ASCII display name as
        one RFC 2047 encoded word on its own line. Written by us, not by the
        ``email`` package's folder, which can encode the comma between two addresses
        into an encoded word and so merge them (found by the round-trip property test)."""
        return _wire(self.display_name, self.username, self.domain)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.display_name, "address": self.addr_spec}


def _render(display_name: str, username: str, domain: str) -> str:
    from email.headerregistry import Address

    return str(Address(display_name=display_name, username=username, domain=domain))


def _wire(display_name: str, username: str, domain: str) -> str:
    if display_name.isascii():
        return _render(display_name, username, domain)
    import base64

    # One encoded word for the whole name, longer than RFC 2047's 75 characters if need be:
    # split into several, the space between them is dropped by RFC readers but kept by
    # Python's, so two readers would disagree on the name. Lines stay far under 998.
    encoded = base64.b64encode(display_name.encode("utf-8")).decode("ascii")
    return f"=?utf-8?b?{encoded}?=\n <{username}@{domain}>"


def wire_header(recipients: Iterable[Recipient]) -> str:
    """A To/Cc header value for ``recipients``: one address per line, folded by us."""
    return ",\n ".join(r.wire for r in recipients)


def normalise_domain(domain: str) -> str:
    """The lower-case ASCII form of a host name, or ``AddressError``.

    ASCII names must be letter-digit-hyphen labels; a non-ASCII one goes through
    IDNA (UTS #46 mapping, so full-width letters and ideographic full stops fold
    to their ASCII forms, and a look-alike letter from another script gives a
    different ``xn--`` name, never the one it imitates).
    """
    if not domain:
        raise AddressError("the domain is empty")
    if domain.isascii():
        ascii_domain = domain.lower()
    else:
        import idna

        try:
            ascii_domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise AddressError("the domain is not a valid internationalised host name") from None
    if len(ascii_domain) > 253:
        raise AddressError("the domain is longer than 253 characters")
    if not all(_LABEL.fullmatch(label) for label in ascii_domain.split(".")):
        raise AddressError("the domain is not a host name (letters, digits and hyphens in "
                           "dot-separated labels, no trailing dot)")
    return ascii_domain


def normalise_domain_pattern(pattern: str) -> str:
    """A policy's domain entry: ``example.com`` (that domain only) or ``*.example.com``
    (any subdomain of it, not the domain itself), normalised like an address's domain."""
    if not isinstance(pattern, str):
        raise AddressError("a domain must be a string")
    if pattern.startswith("*."):
        return "*." + normalise_domain(pattern[2:])
    return normalise_domain(pattern)


def domain_matches(domain: str, patterns: Iterable[str]) -> bool:
    """Whether a normalised ``domain`` is one of the normalised ``patterns``."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if domain.endswith(pattern[1:]):
                return True
        elif domain == pattern:
            return True
    return False


def _check_characters(value: str) -> None:
    for ch in value:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            what = "a line break" if ch in "\r\n\u2028\u2029\x85" else (
                f"the invisible or control character U+{ord(ch):04X}")
            raise AddressError(f"an address must not contain {what}")
    if "=?" in value:
        raise AddressError("encoded words (=?…?=) are not allowed in an address")


def _check_structure(value: str) -> None:
    # Outside a quoted display name, a comment is dropped silently by the header parser
    # ("boss@example.com (evil@x.org)"), and a comma, semicolon or colon separates
    # addresses or opens a group or route: one value, one address, nothing else.
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch in "()":
            raise AddressError("comments in parentheses are not allowed in an address")
        elif ch in ",;:":
            raise AddressError("one value must hold exactly one address (give a list of "
                               "addresses instead; quote a display name that has , ; or :)")


def parse_address(value: Any) -> Recipient:
    """Exactly one address from one value, or ``AddressError`` (module docstring has the rules)."""
    if not isinstance(value, str):
        raise AddressError(f"an address must be a string, not {_json_type(value)}")
    return _parse_address(value)


@lru_cache(maxsize=4096)
def _parse_address(value: str) -> Recipient:
    # Cached: the rule matcher, the approval preview and the executor parse the same values.
    if not value.strip():
        raise AddressError("the address is empty")
    if len(value) > MAX_VALUE_CHARS:
        raise AddressError(f"an address must be at most {MAX_VALUE_CHARS} characters")
    _check_characters(value)
    _check_structure(value)
    display, username, domain = _parse_one(value)
    if not username or not domain:
        raise AddressError("not an email address (expected name@domain or Name <name@domain>)")
    if len(username) > 64 or not username.isascii() or not _LOCAL_PART.fullmatch(username):
        raise AddressError("the part before @ must be ASCII letters, digits and "
                           "#$&'*+-/=?^_`{|}~ in dot-separated words (no quotes, % or !)")
    ascii_domain = normalise_domain(domain)
    # Runs of white space (NBSP included) in a display name read as one space; written
    # back unquoted they would be collapsed by the reader anyway.
    display = " ".join(display.split())
    if any(c in display for c in "@<>"):
        raise AddressError("a display name must not contain @, < or > (it could pass for an "
                           "address)")
    if len(display) > MAX_DISPLAY_NAME_CHARS:
        raise AddressError(f"a display name must be at most {MAX_DISPLAY_NAME_CHARS} characters")
    recipient = Recipient(display, username, ascii_domain)
    # What is shown and what is sent must read back as what was checked: else refuse.
    # (Each distinct form once: the stdlib parser is the slow part of all this.)
    for written in {recipient.header, recipient.wire.replace("\n", "")} - {value}:
        if _parse_one(written) != (display, username, ascii_domain):
            raise AddressError("the address does not read back the same once written")
    return recipient


@lru_cache(maxsize=1)
def header_registry() -> Any:
    """``email.policy.default``'s header registry, without its per-call cost: the stdlib
    builds a new class with ``type()`` on every header it parses or sets (about 0.1 ms
    each, most of the cost of building a message); the classes are kept here instead."""
    from email.headerregistry import HeaderRegistry

    class CachedHeaderRegistry(HeaderRegistry):
        def __init__(self) -> None:
            super().__init__()
            self._classes: dict[str, Any] = {}

        def __getitem__(self, name: str) -> Any:
            key = name.lower()
            cls = self._classes.get(key)
            if cls is None:
                cls = self._classes[key] = super().__getitem__(name)
            return cls

    return CachedHeaderRegistry()


def _parse_one(value: str) -> tuple[str, str, str]:
    try:
        header: Any = header_registry()("To", value)
        groups = header.groups
        defects = header.defects
    except Exception:  # the stdlib parser has raised on odd input before; refuse, don't crash
        raise AddressError("not an email address") from None
    if defects:
        raise AddressError("not a well-formed address (" + _defect_text(defects[0]) + ")")
    addresses = [a for g in groups for a in g.addresses]
    if len(addresses) != 1:
        raise AddressError(f"one value must hold exactly one address, found {len(addresses)} "
                           "(give a list of addresses instead)")
    if len(groups) != 1 or groups[0].display_name is not None:
        raise AddressError("group syntax (name: addresses;) is not allowed")
    address = addresses[0]
    return str(address.display_name), str(address.username), str(address.domain)


def _defect_text(defect: Exception) -> str:
    # Defect texts may quote the input; keep only the class of defect.
    name = type(defect).__name__
    words = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ",
                   name.removesuffix("Defect"))
    return words.lower() or "defect"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def parse_recipient_field(value: Any, field: str) -> list[Recipient]:
    """One recipient field's value: a string (one address) or a list of strings (one each)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise AddressError(f"must be an address or a list of addresses, not {_json_type(value)}",
                           field)
    if len(items) > MAX_RECIPIENTS:
        raise AddressError(f"at most {MAX_RECIPIENTS} addresses", field)
    out: list[Recipient] = []
    for i, item in enumerate(items):
        where = field if isinstance(value, str) else f"{field}[{i}]"
        try:
            out.append(parse_address(item))
        except AddressError as exc:
            raise AddressError(exc.problem, where) from None
    return out


def parse_recipients(arguments: Mapping[str, Any]) -> dict[str, list[Recipient]]:
    """Every present recipient field (``to``, ``cc``, ``bcc``; ``null`` counts as absent),
    parsed. Raises ``AddressError`` naming the field for the first value that does not parse."""
    return {field: parse_recipient_field(arguments[field], field)
            for field in RECIPIENT_FIELDS
            if field in arguments and arguments[field] is not None}
