"""`python -m sidecar replay --spool-dir DIR`: deliver what sidecars left in a spool."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from . import log
from .argv import _Parser, add_options
from .config import CONNECTION_OPTIONS, OPTIONS, UsageError, build_connection, mask_url
from .outbox import Outbox
from .spool import DAMAGED_DIR, Spool
from .transport import Sender

_OPTS = {*CONNECTION_OPTIONS, "spool_dir", "transport", "retry_max_s", "retention_s", "max_stream_len", "pubsub",
         "min_replicas_ack"}


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agent-sidecar replay",
                description="Deliver the output that sidecars left in a spool directory (Redis was down when "
                "they exited, or they were killed). Safe to run more than once: nothing is written twice.")
    add_options(p, [opt for opt in OPTIONS if opt.dest in _OPTS])
    p.add_argument("--timeout", type=float, default=60.0,
                   help="give up after this many seconds of trying (default 60); what is left stays in the spool")
    return p


def _gap_unused(key: str, first: int, last: int):  # type: ignore[no-untyped-def]
    raise AssertionError("replay never drops")


def main(argv: Sequence[str]) -> int:
    ns = parser().parse_args(list(argv))
    if not 0 <= ns.timeout <= 1e8:  # also refuses nan
        sys.stderr.write(f"agent-sidecar replay: error: --timeout {ns.timeout} must be between 0 and 1e8 seconds\n")
        return 2
    try:
        s = build_connection(vars(ns), dict(os.environ), _OPTS)
    except UsageError as exc:
        sys.stderr.write(f"agent-sidecar replay: error: {exc}\n")
        return 2
    log.configure(s.log_format, s.log_level)
    if not os.path.isdir(s.spool_dir):
        if os.path.lexists(s.spool_dir):
            sys.stderr.write(f"agent-sidecar replay: error: --spool-dir {s.spool_dir} is not a directory\n")
            return 2
        log.info("nothing to replay: no spool directory", spool_dir=s.spool_dir)
        return 0
    spool = Spool(s.spool_dir, None, 0)
    spool.open()
    refs = spool.adopt_orphans()
    outbox = Outbox(0, spool, "block", _gap_unused)
    outbox.adopt(refs)
    records = outbox.waiting_records
    sender = Sender(s, outbox, None)
    sender.start()
    sender.finish()
    deadline = time.monotonic() + ns.timeout
    while not sender.join(0.1):
        if time.monotonic() > deadline:
            break
    sender.abandon()
    sender.join(5)
    left = outbox.waiting_records
    spool.close()
    sender.close()
    failed = False
    if not outbox.empty():
        log.error("replay incomplete: Redis did not take everything; the rest stays in the spool",
                  redis=mask_url(s.redis_url), records_left=left, items_left=len(outbox))
        failed = True
    if spool.damaged:
        log.error("replay incomplete: spool data damaged on disk was skipped, what it held is lost; once the "
                  "rest of a segment is delivered, the segment is kept for inspection in "
                  f"{os.path.join(s.spool_dir, DAMAGED_DIR)}", places=len(spool.damaged), first=spool.damaged[0],
                  delivered_items=len(refs))
        failed = True
    if outbox.unreadable_records:
        log.error("replay incomplete: spool frames could not be read back", records=outbox.unreadable_records,
                  delivered_items=len(refs))
        failed = True
    if spool.unusable:
        log.error("replay incomplete: spool directories could not be opened or read", directories=len(spool.unusable),
                  first=spool.unusable[0], delivered_items=len(refs))
        failed = True
    if failed:
        return 1
    if spool.busy:
        log.info("spool directories held by a running sidecar or replay were left to it", directories=spool.busy)
    log.info("replay complete", items=len(refs), records=records, redis=mask_url(s.redis_url))
    return 0
