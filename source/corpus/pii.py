"""PII and secret scrubbing: emails, phone numbers, IPv4 addresses, API keys and tokens.

Each match becomes a placeholder (<EMAIL>, <PHONE>, <IP>, <KEY>, <SECRET>) and is counted per
kind for the manifest. Design choices, mostly about *not* destroying documentation:
- Emails at reserved example domains (example.com/.org/.net, *.example, *.invalid, localhost)
  are kept: they are the documentation's placeholders already, and nobody's address.
- IPv4 addresses that are not globally routable (127.0.0.1, 10.x, 192.168.x, 192.0.2.x ...) are
  kept, judged by the stdlib `ipaddress` module; they are examples, not identities.
- Phone numbers need separators ("555-123-4567", "+44 20 7946 0958", "(555) 123 4567"): a
  bare digit run in docs is far more often a number than a phone.
- Keys are matched by vendor prefix (sk-, ghp_, github_pat_, AKIA, xox?-, AIza, glpat-, hf_) and by
  context (api_key = "...", token: ..., password=...). A free-standing long secret counts only if
  it mixes upper case, lower case and digits (base64-ish, 32+ chars), so hex digests in the
  hashlib docs survive.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from tqdm import tqdm

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})(?![\w-])")
EXAMPLE_DOMAIN = re.compile(r"(^|\.)(example\.(com|org|net)|[\w-]+\.(example|invalid|test)|localhost)$", re.I)
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.]|\.\d)")
PHONE = re.compile(
    r"(?<![\w+.-])(?<!\d )(?:"  # not inside a run of numbers (0 1 1 2 3 5 8 ... 610 987 1597)
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}"  # +44 20 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}([ .-])\d{3}\1\d{4}"  # 555-123-4567, 555.123.4567 (one separator: not "341-356 1976")
    r")(?![\w.-]*\d)")
KEY = re.compile(
    r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}"  # GitHub
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r")")
ASSIGNED = re.compile(
    r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|passw(?:or)?d|bearer)"
    r"\b[\"']?\s*[:=]?\s*[\"']?)([A-Za-z0-9+/_.=-]{16,})")
LONG_SECRET = re.compile(r"(?<![\w/+.-])[A-Za-z0-9+/_-]{32,}={0,2}(?![\w/+.-])")


def _email(m: re.Match, counts: Counter) -> str:
    if EXAMPLE_DOMAIN.search(m.group(1)):
        return m.group(0)
    counts["email"] += 1
    return "<EMAIL>"


def _ipv4(m: re.Match, counts: Counter) -> str:
    ip = m.group(0)
    # Private/loopback/documentation ranges are examples; all-single-digit ones look like versions
    # ("2.7.2.2") or are public resolvers (8.8.8.8): neither identifies anyone.
    if not ipaddress.IPv4Address(ip).is_global or all(len(o) == 1 for o in ip.split(".")):
        return ip
    counts["ipv4"] += 1
    return "<IP>"


def _assigned(m: re.Match, counts: Counter) -> str:
    value = m.group(2)
    # "token = tokenize.generate_tokens" is code, not a secret: require a digit and a letter.
    if not (re.search(r"\d", value) and re.search(r"[A-Za-z]", value)) or value.startswith("<"):
        return m.group(0)
    counts["secret"] += 1
    return m.group(1) + "<SECRET>"


def _long_secret(m: re.Match, counts: Counter) -> str:
    s = m.group(0)
    if not (re.search(r"[a-z]", s) and re.search(r"[A-Z]", s) and re.search(r"\d", s)) or "_" in s.strip("_"):
        return s  # hex digests, identifiers like PyUnicode_AsUTF8AndSize stay
    if any(run in s for run in ("abcdef", "ABCDEF", "012345")):
        return s  # an alphabet ("A-Za-z0-9+/" spelled out), not a random secret
    counts["secret"] += 1
    return "<SECRET>"


def _phone(m: re.Match, counts: Counter) -> str:
    digits = sum(c.isdigit() for c in m.group(0))
    if not 9 <= digits <= 15:  # E.164 allows at most 15; fewer than 9 is a short code or a range
        return m.group(0)
    counts["phone"] += 1
    return "<PHONE>"


def _count(kind: str, placeholder: str, counts: Counter):
    def sub(m: re.Match) -> str:
        counts[kind] += 1
        return placeholder
    return sub


def scrub(text: str, counts: Counter) -> str:
    """Replace PII in `text`, adding the number of replacements per kind to `counts`."""
    text = KEY.sub(_count("api_key", "<KEY>", counts), text)
    if "@" in text:  # the email pattern is the slowest; most records have no "@"
        text = EMAIL.sub(lambda m: _email(m, counts), text)
    text = ASSIGNED.sub(lambda m: _assigned(m, counts), text)
    text = LONG_SECRET.sub(lambda m: _long_secret(m, counts), text)
    text = IPV4.sub(lambda m: _ipv4(m, counts), text)
    text = PHONE.sub(lambda m: _phone(m, counts), text)
    return text


def scrub_records(records: list[dict], progress: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Scrub text and title in place; return (records, replacement counts by kind)."""
    counts: Counter = Counter()
    for r in tqdm(records, desc="pii", unit="rec", disable=not progress, leave=False):
        r["text"] = scrub(r["text"], counts)
        r["title"] = scrub(r["title"], counts)
    return records, {k: counts.get(k, 0) for k in ("email", "phone", "ipv4", "api_key", "secret")}
