"""RSS step: real feedparser over the bundled feed files, served over loopback HTTP."""
from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlmeta.cli import main
from rlmeta.data.rss import FeedError, build_headlines, fetch_feeds, headline_id, normalise_link, strip_html
from rlmeta.errors import UserError
from rlmeta.settings import ROOT as REPO
from rlmeta.tables import HEADLINES

RSS = REPO / "resources" / "rss"
UTC = dt.UTC
BOZO_WITH_ENTRIES = (b"<rss><channel><title>t</title><item><title>kept one</title><link>http://x.test/1</link></item>"
                     b"<item><title>two &bogus;</title><link>http://x.test/2</link></item></channel></rss>")
COUNTS = {"guardian": 55, "heise": 15, "tpm": 20, "wapo_wellness": 29, "huffpost_canada": 2, "nbc_ny": 1}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture(scope="module")
def server():
    """Loopback server: bundled feeds, a copy under a second name, broken feeds, 404s, 503s."""
    files = {f"/{p.name}": p.read_bytes() for p in RSS.iterdir()}
    files["/guardian-copy.rss"] = files["/guardian.rss"]
    files["/broken.xml"] = b"this is not a feed <<<"
    files["/bozo.xml"] = BOZO_WITH_ENTRIES
    state = {"agents": [], "hits": {}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["agents"].append(self.headers.get("User-Agent"))
            hits = state["hits"][self.path] = state["hits"].get(self.path, 0) + 1
            if self.path == "/always-503" or (self.path == "/flaky.rss" and hits == 1):
                self.send_error(503)
                return
            body = files.get(self.path if self.path != "/flaky.rss" else "/heise.atom")
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/feed.xml"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_http_fetch_skips_unreachable_and_malformed(server, tmp_path, caplog):
    base, state = server
    feeds = {"guardian": f"{base}/guardian.rss", "missing": f"{base}/missing.xml", "refused": closed_port_url(),
             "broken": f"{base}/broken.xml", "heise": f"{base}/heise.atom"}
    before = dt.datetime.now(UTC).replace(microsecond=0)
    statuses = fetch_feeds(feeds, tmp_path / "rss", timeout_s=5, retries=1, user_agent="rlmeta-test/1", backoff_s=0.01)
    assert statuses["guardian"] == statuses["heise"] == statuses["broken"] == "ok"
    assert statuses["missing"].startswith("error: HTTPError") and "404" in statuses["missing"]
    assert statuses["refused"].startswith("error:")
    assert "rlmeta-test/1" in state["agents"]
    for name in feeds:  # the rule's outputs always exist
        meta = json.loads((tmp_path / "rss" / f"{name}.json").read_text())
        xml = tmp_path / "rss" / f"{name}.xml"
        assert meta["sha256"] == sha(xml) and meta["url"] == feeds[name] and meta["status"] == statuses[name]
        assert dt.datetime.fromisoformat(meta["fetched_at"]) >= before
    assert (tmp_path / "rss" / "missing.xml").read_bytes() == b""
    assert (tmp_path / "rss" / "guardian.xml").read_bytes() == (RSS / "guardian.rss").read_bytes()

    caplog.set_level(logging.WARNING, logger="rlmeta.data.rss")
    n = build_headlines(tmp_path / "rss", list(feeds), tmp_path / "headlines.parquet")
    assert n == 55 + 15
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("missing", "refused", "broken"):
        assert f"feed {name} skipped" in warned
    table = pq.read_table(tmp_path / "headlines.parquet")
    assert table.schema.equals(HEADLINES, check_metadata=False)
    assert table.column("feed").to_pylist() == ["guardian"] * 55 + ["heise"] * 15
    fetched = json.loads((tmp_path / "rss" / "heise.json").read_text())["fetched_at"]
    assert table.column("fetched_at").to_pylist()[-1] == dt.datetime.fromisoformat(fetched)


def test_retries_then_success_and_give_up(server, tmp_path):
    base, state = server
    statuses = fetch_feeds({"flaky": f"{base}/flaky.rss", "down": f"{base}/always-503"}, tmp_path,
                           timeout_s=5, retries=2, backoff_s=0.01)
    assert statuses["flaky"] == "ok" and state["hits"]["/flaky.rss"] == 2
    assert "503" in statuses["down"] and state["hits"]["/always-503"] == 3  # 1 + 2 retries


def test_404_is_not_retried(server, tmp_path):
    base, state = server
    fetch_feeds({"gone": f"{base}/missing-once.xml"}, tmp_path, retries=3, backoff_s=0.01)
    assert state["hits"]["/missing-once.xml"] == 1


def test_dedup_across_feeds_first_wins(server, tmp_path):
    base, _ = server
    feeds = {"a": f"{base}/guardian.rss", "b": f"{base}/guardian-copy.rss", "c": f"{base}/heise.atom"}
    fetch_feeds(feeds, tmp_path / "rss", backoff_s=0.01)
    assert build_headlines(tmp_path / "rss", ["a", "b", "c"], tmp_path / "ab.parquet") == 70
    assert build_headlines(tmp_path / "rss", ["b", "a", "c"], tmp_path / "ba.parquet") == 70
    ab, ba = pq.read_table(tmp_path / "ab.parquet"), pq.read_table(tmp_path / "ba.parquet")
    assert set(ab.column("feed").to_pylist()) == {"a", "c"} and set(ba.column("feed").to_pylist()) == {"b", "c"}
    ids = ab.column("headline_id").to_pylist()
    assert len(set(ids)) == len(ids) and ids == ba.column("headline_id").to_pylist()  # ids do not depend on the feed


def test_all_fail_names_every_feed(server, tmp_path, caplog, capsys):
    base, _ = server
    feeds = {"nothere": f"{base}/nothere.xml", "garbage": f"{base}/broken.xml"}
    fetch_feeds(feeds, tmp_path, backoff_s=0.01, retries=0)
    with pytest.raises(FeedError, match="nothere.*garbage") as err:
        build_headlines(tmp_path, list(feeds), tmp_path / "h.parquet")
    assert isinstance(err.value, UserError)
    assert not (tmp_path / "h.parquet").exists()
    capsys.readouterr()
    # a user error: exit status 2 and one line naming the step and every feed tried
    assert main(["build-headlines", "--snapshots", str(tmp_path), "--feeds", *feeds, "--out",
                 str(tmp_path / "h.parquet")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("rlmeta build-headlines: error: no feed yielded a headline") and "nothere" in last, last
    assert "garbage" in last and not (tmp_path / "h.parquet").exists()


def test_bozo_feed_with_entries_is_kept_with_warning(server, tmp_path, caplog):
    base, _ = server
    fetch_feeds({"bozo": f"{base}/bozo.xml"}, tmp_path)
    caplog.set_level(logging.WARNING, logger="rlmeta.data.rss")
    assert build_headlines(tmp_path, ["bozo"], tmp_path / "h.parquet") == 2
    assert any("bozo" in r.getMessage() and "not well-formed" in r.getMessage() for r in caplog.records)


def test_published_is_utc(tmp_path):
    feeds = {"heise": str(RSS / "heise.atom"), "tpm": str(RSS / "tpm.atom"), "guardian": str(RSS / "guardian.rss")}
    fetch_feeds(feeds, tmp_path)
    build_headlines(tmp_path, list(feeds), tmp_path / "h.parquet")
    table = pq.read_table(tmp_path / "h.parquet")
    assert str(table.schema.field("published").type) == "timestamp[us, tz=UTC]"
    published = table.column("published").to_pylist()
    assert published[0] == dt.datetime(2016, 2, 1, 16, 22, tzinfo=UTC)  # 17:22+01:00
    assert published[15] == dt.datetime(2017, 11, 8, 23, 15, 58, tzinfo=UTC)  # 18:15:58-05:00
    assert published[35] == dt.datetime(2018, 1, 31, 7, 26, 5, tzinfo=UTC)  # GMT
    assert all(p is not None for p in published)
    assert table.column("fetched_at").null_count == len(table)  # file sources


def test_file_url_and_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    feeds = {"rel": "resources/rss/HuffPostCanada.xml", "uri": (RSS / "rss_2.0_nbcny.xml").as_uri(),
             "nofile": "resources/rss/does-not-exist.xml"}
    statuses = fetch_feeds(feeds, tmp_path)
    assert statuses["rel"] == statuses["uri"] == "ok" and statuses["nofile"].startswith("error: FileNotFoundError")
    assert json.loads((tmp_path / "uri.json").read_text())["fetched_at"] is None
    assert build_headlines(tmp_path, list(feeds), tmp_path / "h.parquet") == 3


def test_bundled_config_end_to_end_and_byte_identical(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for run in ("one", "two"):
        assert main(["fetch-rss", "--config", "config/config.yaml", "--name", "headlines",
                     "--out-dir", str(tmp_path / run)]) == 0
        assert main(["build-headlines", "--snapshots", str(tmp_path / run), "--feeds", *COUNTS,
                     "--out", str(tmp_path / f"{run}.parquet")]) == 0
    assert sha(tmp_path / "one.parquet") == sha(tmp_path / "two.parquet")
    table = pq.read_table(tmp_path / "one.parquet")
    assert table.schema.equals(HEADLINES, check_metadata=False) and len(table) == sum(COUNTS.values())
    feeds = table.column("feed").to_pylist()
    assert {f: feeds.count(f) for f in COUNTS} == COUNTS
    assert all(t and t == t.strip() for t in table.column("title").to_pylist())
    assert not any("<" in (s or "") and ">" in (s or "") for s in table.column("summary").to_pylist())


def test_helpers():
    assert strip_html("<p>Hello&nbsp;<b>world</b> &amp; co</p>\n") == "Hello world & co"
    assert normalise_link(" HTTPS://Example.COM/a/b/#frag ") == "https://example.com/a/b"
    assert headline_id("https://example.com/a/", "x") == headline_id("https://EXAMPLE.com/a", "y")
    assert headline_id(None, "Some  Title") == headline_id("", "some title")
    assert len(headline_id(None, "t")) == 16


def test_fetch_cli_dataset_block_and_errors(tmp_path, capsys):
    block = json.dumps({"kind": "rss", "feeds": {"heise": str(RSS / "heise.atom"), "tpm": (RSS / "tpm.atom").as_uri()}})
    assert main(["fetch-rss", "--dataset", block, "--out-dir", str(tmp_path / "snap")]) == 0
    assert {p.name for p in (tmp_path / "snap").iterdir()} == {"heise.xml", "heise.json", "tpm.xml", "tpm.json"}
    assert main(["build-headlines", "--snapshots", str(tmp_path / "snap"), "--feeds", "heise", "tpm",
                 "--out", str(tmp_path / "h.parquet")]) == 0
    assert pq.read_table(tmp_path / "h.parquet").column("feed").to_pylist() == ["heise"] * 15 + ["tpm"] * 20
    capsys.readouterr()
    # a config dataset of another kind is a one-line user error
    assert main(["fetch-rss", "--config", str(REPO / "config" / "config.yaml"), "--name", "gsm8k",
                 "--out-dir", str(tmp_path / "x")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("rlmeta fetch-rss: error: ") and "datasets.gsm8k is not an rss dataset" in last, last
    # a bad block is an argparse error (exit 2) that names the key
    with pytest.raises(SystemExit) as e:
        main(["fetch-rss", "--dataset", '{"kind": "rss", "feeds": {"a": "a.xml"}, "timeout": 3}',
              "--out-dir", str(tmp_path / "y")])
    assert e.value.code == 2 and "unknown key 'timeout' (did you mean 'timeout_s'?)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_steps_help():
    for step in ("fetch-rss", "build-headlines"):
        out = subprocess.run([sys.executable, "-m", "rlmeta", step, "--help"], capture_output=True, text=True,
                             check=True, cwd=REPO)
        assert "usage: rlmeta " + step in out.stdout
