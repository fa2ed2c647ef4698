"""Reading W&B's offline run files, for the tests that check what a run logged (and that no key leaked)."""
from __future__ import annotations

import struct
import time
from pathlib import Path

FAKE_KEY = "fakeWandbKey0123456789abcdefDEADBEEF"
"""A value put in WANDB_API_KEY by the tests that check it is never written anywhere."""


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb file (LevelDB log format: 7-byte file header, 32 KiB blocks, 7-byte
    chunk headers crc32/len/type), parsed as wandb's protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST chunk
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def wandb_records_when_flushed(path: Path, timeout_s: float = 30.0) -> list:
    """The records once the run's ``exit`` record is on disk: wandb-core writes the file in its own
    process and may still be flushing when ``run.finish()`` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)
