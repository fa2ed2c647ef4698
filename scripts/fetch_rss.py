"""Snapshot RSS/Atom feeds (see --help)."""
from rlmeta.data.rss import main_fetch

raise SystemExit(main_fetch())
