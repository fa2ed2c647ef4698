"""Re-create the bundled samples under resources/ from ../shared/data (see resources/SOURCES.md).

RSS files are copied as they are. GSM8K: the first 400 train and 200 test lines.
MATH: per subject (file order), rows of levels 1-3 first, topped up with other levels
in file order, 60 per subject for train and 20 for test; lines stay byte-identical
and in source order.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RSS_FILES = ["guardian.rss", "heise.atom", "tpm.atom", "wapowellness.xml", "HuffPostCanada.xml", "rss_2.0_nbcny.xml"]
SUBJECTS = ["Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra",
            "Number Theory", "Prealgebra", "Precalculus"]
EASY = {"Level 1", "Level 2", "Level 3"}


def head_lines(src: Path, n: int) -> bytes:
    with open(src, "rb") as fh:
        return b"".join(line for _, line in zip(range(n), fh))


def math_sample(src: Path, per_subject: int) -> bytes:
    lines = src.read_bytes().splitlines(keepends=True)
    recs = [json.loads(line) for line in lines]
    chosen: set[int] = set()
    for subject in SUBJECTS:
        idx = [i for i, r in enumerate(recs) if r["type"] == subject]
        ranked = [i for i in idx if recs[i]["level"] in EASY] + [i for i in idx if recs[i]["level"] not in EASY]
        if len(ranked) < per_subject:
            raise SystemExit(f"{src}: only {len(ranked)} rows of {subject}")
        chosen.update(ranked[:per_subject])
    return b"".join(lines[i] for i in sorted(chosen))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="shared data folder")
    p.add_argument("--out", type=Path, default=ROOT / "resources", help="resources folder to write")
    args = p.parse_args(argv)
    for sub in ("rss", "gsm8k", "math"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    for name in RSS_FILES:
        shutil.copyfile(args.shared / "rss" / name, args.out / "rss" / name)
    for split, n in (("train", 400), ("test", 200)):
        (args.out / "gsm8k" / f"{split}.jsonl").write_bytes(head_lines(args.shared / "gsm8k" / f"{split}.jsonl", n))
    for split, n in (("train", 60), ("test", 20)):
        (args.out / "math" / f"{split}.jsonl").write_bytes(math_sample(args.shared / "math" / f"{split}.jsonl", n))
    print(f"wrote samples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
