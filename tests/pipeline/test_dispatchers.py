"""The dispatcher loops end when cancelled, whenever the cancel lands (Pipeline.run's `finally` gathers them).

On Python 3.11 `asyncio.wait_for` can swallow a cancel that arrives in the loop turn its inner wait completes
(CPython gh-86296): a dispatcher written with it kept looping after `cancel()`, and a SIGTERM'd service never exited.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, cast

import pytest

from service.core.batcher import Batcher
from service.core.file_batcher import FileBatcher, FileChange
from service.core.model import Action
from service.core.retry import Backoff, TokenBucket
from service.core.types import RecordRef
from service.pipeline.file_uploads import FileOutcomes, FileUploads
from service.pipeline.gate import UploadGate
from service.pipeline.uploads import Outcomes, Uploader, UploadScheduler
from service.tiktok.customer_files_api import CustomerFilesApi


def file_dispatcher(loop: asyncio.AbstractEventLoop) -> FileUploads:
    batcher = FileBatcher(interval_s=60, max_rows=5, clock=loop.time)
    change = FileChange("7", "f1", "401", None, "EMAIL_SHA256", Action.ADD, (("EMAIL_SHA256", "a" * 64),))
    batcher.add(RecordRef("src", 0, 0), change)  # a buffer: run() waits with a timeout (its interval)
    return FileUploads(
        batcher=batcher,
        api=cast(CustomerFilesApi, None),
        outcomes=cast(FileOutcomes, None),
        gate=UploadGate(1.0),
        backoff=Backoff(0.1, 1.0, 5.0, random.Random(1)),
        bucket=TokenBucket(10.0, clock=loop.time),
        creator=None,
        pressure=lambda: False,
        clock=loop.time,
    )


def mapping_dispatcher(loop: asyncio.AbstractEventLoop) -> UploadScheduler:
    return UploadScheduler(
        batcher=Batcher(max_rows=1000, max_bytes=2_000_000, linger_s=60.0, clock=loop.time),
        uploader=cast(Uploader, None),
        outcomes=cast(Outcomes, None),
        gate=UploadGate(1.0),
        backoff=Backoff(0.1, 1.0, 5.0, random.Random(1)),
        bucket=TokenBucket(10.0, clock=loop.time),
        max_inflight=4,
        clock=loop.time,
    )


@pytest.mark.parametrize("make", [file_dispatcher, mapping_dispatcher], ids=["files", "mappings"])
@pytest.mark.parametrize("steps", [0, 1, 2, 3])
async def test_a_cancel_landing_as_the_dispatcher_wakes_ends_it(make: Any, steps: int) -> None:
    dispatcher = make(asyncio.get_running_loop())
    task = asyncio.create_task(dispatcher.run())
    for _ in range(3):
        await asyncio.sleep(0)
    dispatcher.wake()  # something changed (a batch ended, a record came) ...
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()  # ... and the pipeline's `finally` cancels the dispatcher in the same loop turn
    done, _ = await asyncio.wait([task], timeout=1.0)
    assert done, "the dispatcher was still running a second after cancel()"
    assert task.cancelled()
    await dispatcher.close()
