"""The primary sources cards may link to: ``rules/sources.yaml``.

Rules cite sources by id; every URL a card shows (``card.source.url`` and ``card.links``) comes from
this file. Loading refuses a URL that is not https, a host outside the file's ``allowedHosts`` (the
hosts of clinical.md §3.0: the label and guideline publishers), and an entry without a title.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

SOURCES_FILE = "sources.yaml"
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")
# Any URL written into a card template (cards cite source ids; links are rendered from this file).
URL_IN_TEXT = re.compile(r"(?i)\b(?:https?|ftp)://[^\s)\]>\"']+|\bwww\.[a-z0-9-]+\.[a-z]{2,}[^\s)\]>\"']*")


@dataclass(frozen=True)
class Source:
    id: str
    title: str
    url: str
    publisher: str | None
    checked: str | None

    def link(self) -> dict:
        """A CDS Hooks 2.0 Link."""
        return {"label": self.title, "url": self.url, "type": "absolute"}


@dataclass(frozen=True)
class Sources:
    allowed_hosts: frozenset[str]
    by_id: dict[str, Source]

    def get(self, source_id: str) -> Source | None:
        return self.by_id.get(source_id)


def url_problem(url: object, allowed_hosts: frozenset[str]) -> str | None:
    """Why ``url`` may not be shown in a card, or None when it may."""
    if not isinstance(url, str) or not url:
        return "needs a url"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a valid URL ({exc})"
    if parts.scheme != "https":
        return f"{url!r}: only https links are allowed (plain http and other schemes are refused)"
    host = (parts.hostname or "").lower()
    if parts.username is not None or parts.password is not None or port not in (None, 443):
        return f"{url!r}: no user name, password or port in a card link"
    if host not in allowed_hosts:
        return (f"{url!r}: host {host!r} is not a primary source; allowed hosts (allowedHosts in "
                f"{SOURCES_FILE}): {', '.join(sorted(allowed_hosts))}")
    return None


def load_sources(rules_dir: Path) -> tuple[Sources, list[tuple[str, str]]]:
    """(sources, problems as (field, message)). A missing file is a problem: cards need their sources."""
    path = Path(rules_dir) / SOURCES_FILE
    problems: list[tuple[str, str]] = []
    empty = Sources(frozenset(), {})
    if not path.exists():
        return empty, [("(file)", f"{SOURCES_FILE} is missing: rules cite their sources by id from it")]
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        return empty, [("(yaml)", f"not valid YAML: {getattr(exc, 'problem', exc)}")]
    if not isinstance(doc, dict) or not isinstance(doc.get("allowedHosts"), list) \
            or not isinstance(doc.get("sources"), dict):
        return empty, [("(top level)", "needs allowedHosts (a list of host names) and sources (id -> source)")]
    hosts = set()
    for i, host in enumerate(doc["allowedHosts"]):
        if not isinstance(host, str) or not _HOST.match(host):
            problems.append((f"allowedHosts.{i}", f"{host!r} is not a lower-case host name (no scheme, port or path)"))
        else:
            hosts.add(host)
    allowed = frozenset(hosts)
    by_id: dict[str, Source] = {}
    for source_id, item in doc["sources"].items():
        where = f"sources.{source_id}"
        if not isinstance(source_id, str) or not _ID.match(source_id):
            problems.append((where, "a source id is lower-case letters, digits and hyphens"))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("title"), str) or len(item["title"].strip()) < 3:
            problems.append((where, "needs a title (the link label a clinician sees)"))
            continue
        unknown = set(item) - {"title", "url", "publisher", "checked", "how"}
        if unknown:
            problems.append((where, f"unknown fields {sorted(unknown)}; allowed: title, url, publisher, checked, how"))
            continue
        reason = url_problem(item.get("url"), allowed)
        if reason:
            problems.append((f"{where}.url", reason))
            continue
        checked = item.get("checked")
        by_id[source_id] = Source(source_id, item["title"].strip(), item["url"],
                                  str(item["publisher"]) if item.get("publisher") else None,
                                  str(checked) if checked else None)
    return Sources(allowed, by_id), problems
