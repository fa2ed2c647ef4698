"""RSS/Atom feeds -> raw snapshots -> ``headlines.parquet`` (schema HEADLINES).

Two steps, so the workflow can keep the network fetch apart from parsing:

* :func:`fetch_feeds` writes ``<out_dir>/<feed>.xml`` (raw bytes, empty when the feed
  could not be read) and ``<feed>.json`` (url, fetched_at, sha256, status).
* :func:`build_headlines` parses the snapshots with feedparser, normalises and
  deduplicates the entries and writes the table.
"""
from __future__ import annotations

import argparse
import calendar
import datetime as dt
import hashlib
import html
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import feedparser
import pyarrow as pa

from rlmeta.errors import UserError
from rlmeta.io import write_bytes, write_json, write_table
from rlmeta.settings import FEED_NAME
from rlmeta.tables import HEADLINES

log = logging.getLogger(__name__)

_RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


class FeedError(UserError):
    """No configured feed yielded a headline."""


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _fetch_http(url: str, timeout_s: float, retries: int, user_agent: str, backoff_s: float) -> bytes:
    """GET ``url``; retry network errors and 408/429/5xx up to ``retries`` extra times."""
    req = urllib.request.Request(url, headers={"User-Agent": user_agent, "Accept": "*/*"})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code not in _RETRYABLE_HTTP or attempt == retries:
                raise
            err: Exception = exc
        except (urllib.error.URLError, OSError) as exc:
            if attempt == retries:
                raise
            err = exc
        delay = backoff_s * 2**attempt
        log.info("%s: attempt %d failed (%s); retrying in %.1fs", url, attempt + 1, err, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


def _local_path(source: str) -> Path:
    if source.startswith("file:"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    return Path(source)  # relative to the working directory


def fetch_feeds(
    feeds: dict[str, str],
    out_dir: str | Path,
    timeout_s: float = 10,
    retries: int = 2,
    user_agent: str = "rlmeta/0.1",
    backoff_s: float = 0.5,
) -> dict[str, str]:
    """Snapshot each feed to ``out_dir/<name>.xml`` plus a ``<name>.json`` sidecar.

    ``feeds`` maps name -> http(s) URL, file:// URL or path relative to the working
    directory. A feed that cannot be read gets an empty snapshot and status
    ``"error: ..."``, so both output files always exist. Returns name -> status.
    """
    out_dir = Path(out_dir)
    statuses: dict[str, str] = {}
    for name, source in feeds.items():
        if not FEED_NAME.match(name):
            raise ValueError(f"feed name {name!r} is not usable as a file name (letters, digits, _ . -)")
        is_http = urllib.parse.urlparse(source).scheme in ("http", "https")
        fetched_at = _utc_now() if is_http else None
        try:
            if is_http:
                data = _fetch_http(source, timeout_s, retries, user_agent, backoff_s)
            else:
                data = _local_path(source).read_bytes()
            status = "ok"
        except Exception as exc:
            data, status = b"", f"error: {type(exc).__name__}: {exc}"
            log.warning("feed %s (%s) unreachable: %s", name, source, status)
        write_bytes(out_dir / f"{name}.xml", data)
        sidecar = {"url": source, "fetched_at": fetched_at, "sha256": hashlib.sha256(data).hexdigest(),
                   "status": status}
        write_json(out_dir / f"{name}.json", sidecar)
        statuses[name] = status
        log.info("feed %s: %s, %d bytes", name, status, len(data))
    return statuses


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def strip_html(text: str | None) -> str:
    """Plain text of an HTML fragment: tags dropped, entities decoded, whitespace collapsed."""
    if not text:
        return ""
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return " ".join(html.unescape("".join(parser.parts)).split())


def normalise_link(link: str) -> str:
    """Lower-case scheme and host, drop the fragment and a trailing ``/``."""
    parts = urllib.parse.urlsplit(link.strip())
    path = parts.path.rstrip("/") if parts.path != "/" else ""
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def headline_id(link: str | None, title: str) -> str:
    """First 16 hex chars of sha256 of the normalised link, else of the casefolded title."""
    key = normalise_link(link) if link and link.strip() else " ".join(title.split()).casefold()
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _to_utc(struct: time.struct_time | None) -> dt.datetime | None:
    """feedparser's ``*_parsed`` values are UTC struct_times."""
    if not struct:
        return None
    return dt.datetime.fromtimestamp(calendar.timegm(struct), tz=dt.UTC)


def _parse_snapshot(name: str, snapshot_dir: Path) -> tuple[list, dt.datetime | None, str | None]:
    """Entries of one snapshot, its fetch time, and the reason it was skipped (or None)."""
    xml_path, meta_path = snapshot_dir / f"{name}.xml", snapshot_dir / f"{name}.json"
    if not xml_path.exists():
        return [], None, f"no snapshot {xml_path}"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    status = meta.get("status", "ok")
    if status != "ok":
        return [], None, status
    fetched_at = dt.datetime.fromisoformat(meta["fetched_at"]) if meta.get("fetched_at") else None
    try:
        parsed = feedparser.parse(xml_path.read_bytes())
    except Exception as exc:
        return [], None, f"malformed: {type(exc).__name__}: {exc}"
    if parsed.bozo and not parsed.entries:
        return [], None, f"malformed: {parsed.get('bozo_exception')}"
    if parsed.bozo:
        log.warning("feed %s is not well-formed (%s); keeping its %d entries", name, parsed.get("bozo_exception"),
                    len(parsed.entries))
    if not parsed.entries:
        return [], None, "no entries"
    return parsed.entries, fetched_at, None


def build_headlines(snapshot_dir: str | Path, feed_names: list[str], out_path: str | Path) -> int:
    """Normalise snapshots into ``out_path`` (HEADLINES); returns the number of rows.

    Feeds are read in the given order; a headline seen before (same ``headline_id``)
    is dropped, so the first feed wins. Malformed, empty or unreachable feeds are
    skipped with a warning naming them; :class:`FeedError` when none yields a row.
    """
    snapshot_dir = Path(snapshot_dir)
    rows: list[dict] = []
    seen: set[str] = set()
    skipped: dict[str, str] = {}
    for name in feed_names:
        entries, fetched_at, reason = _parse_snapshot(name, snapshot_dir)
        if reason:
            log.warning("feed %s skipped: %s", name, reason)
            skipped[name] = reason
            continue
        kept = dupes = untitled = 0
        for entry in entries:
            title = strip_html(entry.get("title"))
            link = (entry.get("link") or "").strip() or None
            if not title:
                untitled += 1
                continue
            hid = headline_id(link, title)
            if hid in seen:
                dupes += 1
                continue
            seen.add(hid)
            published = _to_utc(entry.get("published_parsed") or entry.get("updated_parsed"))
            summary = strip_html(entry.get("summary")) or None
            rows.append(dict(headline_id=hid, feed=name, title=title, link=link, summary=summary,
                             published=published, fetched_at=fetched_at))
            kept += 1
        log.info("feed %s: %d entries, %d kept, %d duplicates, %d without title", name, len(entries), kept, dupes,
                 untitled)
    if not rows:
        tried = "; ".join(f"{n} ({skipped.get(n, 'no usable entries')})" for n in feed_names)
        raise FeedError(f"no feed yielded a headline; feeds tried: {tried}")
    write_table(out_path, pa.Table.from_pylist(rows, schema=HEADLINES), HEADLINES)
    return len(rows)


def fetch_command(p: argparse.ArgumentParser):
    """``rlmeta fetch-rss``: snapshot feeds to <out-dir>/<feed>.xml + <feed>.json."""
    from rlmeta.cli import settings_type
    from rlmeta.settings import RSSDataset

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", type=settings_type(RSSDataset, "dataset"),
                     help='an rss dataset block, e.g. \'{"kind": "rss", "feeds": {"bbc": "https://..."}}\'')
    src.add_argument("--config", help="config YAML to read datasets.<--name> from")
    p.add_argument("--name", default="headlines", help="rss dataset name in --config (default: headlines)")
    p.add_argument("--out-dir", required=True, help="folder for the snapshots")

    def run(a):
        block = a.dataset
        if block is None:
            from rlmeta.settings import load_config

            block = load_config(a.config).datasets.get(a.name)
            if not isinstance(block, RSSDataset):
                raise UserError(f"{a.config}: datasets.{a.name} is not an rss dataset")
        start = time.monotonic()
        statuses = fetch_feeds(block.feeds, a.out_dir, timeout_s=block.timeout_s, retries=block.retries,
                               user_agent=block.user_agent)
        failed = [n for n, s in statuses.items() if s != "ok"]
        log.info("fetched %d/%d feeds in %.1fs%s", len(statuses) - len(failed), len(statuses), time.monotonic() - start,
                 f"; failed: {', '.join(failed)}" if failed else "")
    return run


def build_command(p: argparse.ArgumentParser):
    """``rlmeta build-headlines``: parse snapshots into a deduplicated headlines.parquet."""
    from rlmeta.cli import existing_dir

    p.add_argument("--snapshots", required=True, type=existing_dir, help="folder with <feed>.xml and <feed>.json")
    p.add_argument("--feeds", nargs="+", required=True, help="feed names in priority order (first wins on duplicates)")
    p.add_argument("--out", required=True, help="output parquet path")

    def run(a):
        start = time.monotonic()
        n = build_headlines(a.snapshots, a.feeds, a.out)
        log.info("wrote %d headlines to %s in %.1fs", n, a.out, time.monotonic() - start)
    return run
