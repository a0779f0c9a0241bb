"""Sustained load: many studies sent back to back over parallel associations to one listener, as
a busy CT list would. Reports what a site sizes by: studies per hour and the latency of each study
from its first C-STORE to its published report (median, p95, worst)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from tqdm import tqdm

from thighseg.apps.ingest import listener_process, push, wait_for_report
from thighseg.core.constants import AE_TITLE


def run_sustained(
    studies: list[list[Path]],
    triton_url: str,
    work: Path,
    model: str,
    associations: int,
    workers: int,
) -> dict:
    """Each of `associations` senders (DCMTK storescu, `TCP_NODELAY=1`) sends one whole study in
    one association, then the next, until all are sent; the listener runs `workers` series at
    once."""
    uids = [str(pydicom.dcmread(s[0], stop_before_pixels=True).StudyInstanceUID) for s in studies]
    out = work / "sustained-out"
    sent_at: dict[str, float] = {}
    options = ("--workers", str(workers))
    with listener_process(
        triton_url, work / "sustained-spool", out, 1.0, model=model, options=options
    ) as (port, _):

        def send(index: int) -> None:
            sent_at[uids[index]] = time.time()
            push(studies[index], port, 1, AE_TITLE)

        started = time.time()
        with ThreadPoolExecutor(associations) as senders:
            list(senders.map(send, range(len(studies))))
        published_at = {}
        for uid in tqdm(uids, desc="sustained: reports"):
            wait_for_report(out, uid)
            published_at[uid] = max(p.stat().st_mtime for p in (out / uid).glob("*/report.json"))
    latencies = [published_at[uid] - sent_at[uid] for uid in uids]
    seconds = max(published_at.values()) - started
    return {
        "model": model,
        "studies": len(studies),
        "instances_per_study": len(studies[0]),
        "associations": associations,
        "listener_workers": workers,
        "seconds": round(seconds, 1),
        "studies_per_hour": round(len(studies) * 3600 / seconds, 1),
        "latency_s": {
            "p50": round(float(np.percentile(latencies, 50)), 2),
            "p95": round(float(np.percentile(latencies, 95)), 2),
            "max": round(max(latencies), 2),
        },
    }
