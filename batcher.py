"""An async request batcher for Gemini embeddings.

Inputs stream in; a Batcher groups them by size or timeout; batches go to the
Gemini embed_content API, several calls at a time; results reach a logger, or a file.

    python batcher.py                      # the document's demo, offline: a simulated client
    GEMINI_API_KEY=... python batcher.py   # the real API through genai.Client()
    python batcher.py --input corpus.txt --output embeddings.jsonl --rpm 2900   # your corpus
    python batcher.py --input chunks.jsonl --output index.jsonl \\
        --task-type RETRIEVAL_DOCUMENT --dimensions 768 --tpm 950000   # JSONL rows {"text", "id"?, ...}
    python batcher.py --input corpus.txt --output e.jsonl --price 0.15 --dry-run   # its size and cost
    python batcher.py --help               # every flag

The stages, in order, joined by bounded asyncio queues. Each stage ends its own output
queue with the None sentinel:

    enqueue_inputs (demo) | read_corpus -> Batcher.batch -> embed_content -> log_outputs (or --output)

Application code that wants one embedding per await uses BatchedEmbedder instead:

    async with BatchedEmbedder(client, batch_size=32, timeout=timedelta(milliseconds=20)) as e:
        embedding = await e.embed("some text")

The file, in order: the document's stages and main(), which wires them; the modes (the Batch
API's EmbedJobs, BatchedEmbedder); safe re-runs (the output's Ledger: its manifest, records and
jobs; the input formats); the runtime shared byte for byte with pipeline.py (errors, Retrier,
Gate and Cost, Shutdown, files, the client, the Batch API stage BatchJobs and --batch-cancel,
--dry-run's Tally, the flags); the offline simulation; the command line (Config: one field per
flag).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import functools
import hashlib
import importlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, NamedTuple, NoReturn, Protocol, TypeAlias, TypeVar

import aiofiles
from google import genai
from google.genai import errors, types

PROG = "batcher"  # in messages; the shared runtime (below) names the script by it
log = logging.getLogger(PROG)

MAX_BATCH_SIZE = 100  # the API rejects more than 100 texts in one call
FULL_SIZE = 3072  # gemini-embedding-001's vectors, unless asked for fewer (--dimensions)
DEMO_DIMENSIONS = 3  # the document's demo prints each vector: it asks for 3 values
QUEUE_SIZE = 256  # bound of the item queues: backpressure instead of unbounded memory
# One batch waiting is enough to keep the calls busy: the next forms while it waits. A deeper
# queue holds batches frozen at their size while the items behind them wait (p99 at 500/s,
# --adaptive: 0.54 s with 4, 0.36 s with 1); with --adaptive, the one waiting batch keeps growing.
BATCH_QUEUE_SIZE = 1
# The embed stage hands over each batch's outputs at once: a queue handoff per text cost as much as
# writing its record (the README's SDK figures). At most 8 batches wait for the logger, so memory
# stays bounded at 3,072 dimensions too.
OUTPUT_QUEUE_SIZE = 8
# The SDK sends requests with no timeout at all, so one unanswered call would hang a run.
# An embed call of 100 texts is answered in about a second: 60 s is far past any healthy reply.
REQUEST_TIMEOUT_S = 60.0
# Permanent errors about the request's content: splitting the batch isolates the bad text.
# Others (401, 403, 404: the key or the model) fail every text alike, so they are not split.
BISECT_CODES = frozenset({400, 413, 422})
# Adaptive mode flushes a partial batch once another arrival before its deadline is less likely
# than not: for Poisson arrivals, once the time left is under ln 2 x the mean gap between them.
ADAPTIVE_FLUSH_GAPS = math.log(2)
ADAPTIVE_ALPHA = 0.1  # weight of the newest gap in the moving average (a plain mean for the first 10)

T = TypeVar("T")


class Input(NamedTuple):
    """One text to embed. In the document's demo the id is the text; in a corpus it is
    "<file name>:<line>", or a JSONL row's "id". A row may carry a title (see EmbedSettings)
    and other fields, which its record keeps as "metadata"."""

    id: str
    text: str
    title: str | None = None
    metadata: dict[str, Any] | None = None


InputBatch: TypeAlias = list[Input]
# A failed item travels as (item, error) instead of (item, embedding); the output queue carries
# them a batch at a time.
Output: TypeAlias = tuple[Input, "types.ContentEmbedding | Exception"]
Outputs: TypeAlias = list[Output]
Client: TypeAlias = Any  # genai.Client or SimulatedClient: both have .aio.models.embed_content


# === The document: the four stages, in its order, and main() ===

# --- Stage 1: the input enqueuer (the demo) or the corpus reader ---


async def enqueue_inputs(
    input_queue: asyncio.Queue[Input | None], *, num_inputs: int = 100, max_delay_s: float = 0.3,
    skip: Collection[str] = frozenset(), stats: RunStats, shutdown: Shutdown,
) -> None:  # fmt: skip
    """The document's demo: puts input-0, input-1, ... with random gaps (the id is the text),
    passing over the ids in `skip` (already in --output). Ends its output queue with the
    None sentinel, early on a shutdown request."""
    loop = asyncio.get_running_loop()
    for i in range(num_inputs):
        if shutdown.requested:
            break
        content = f"input-{i}"
        if content in skip:
            stats.skipped += 1
            continue
        stats.arrived_at[content] = loop.time()
        stats.enqueued += 1
        await input_queue.put(Input(content, content))
        await asyncio.sleep(random.uniform(0, max_delay_s))
    await input_queue.put(None)
    log.info("All inputs enqueued.")


async def read_corpus(
    run: Run, source: Path | None, input_queue: asyncio.Queue[Input | None], output_queue: asyncio.Queue[Outputs | None]
) -> None:  # fmt: skip
    """A real corpus: puts an Input for each non-blank line of the file (None: stdin), as fast as
    the bounded queue takes them. A plain line is one text, stripped, with the id
    "<file name>:<line number>" ("stdin:<n>"); in JSONL (config.jsonl), a line is a row (see
    parse_row). What run.ledger says is done, or queued in a live job, is passed over. A line that
    cannot be embedded (not UTF-8, a bad row) goes to output_queue as failed, alone, and reading
    goes on. Another text under a done or queued id (the ledger counts it) stops the run
    (shutdown.fail): nothing more is sent, and the rest is read only to count the changed ones.
    Ends input_queue with the None sentinel (output_queue is ended by embed_content, later)."""
    jsonl, ledger, stats, shutdown = run.config.jsonl, run.ledger, run.stats, run.shutdown
    name, number, seen = source.name if source is not None else "stdin", 0, set[str]()
    async with contextlib.AsyncExitStack() as stack:
        if source is None:
            read = aiofiles.stdin_bytes.read1  # read1: what the pipe has now, not a full chunk
        else:
            read = (await stack.enter_async_context(open_file(source, "rb"))).read
        async for raw in read_lines(read):
            if shutdown.signal is not None or (shutdown.requested and not ledger.changed):
                break
            number += 1
            if (parsed := parse_line(raw, f"{name}:{number}", name, jsonl=jsonl, seen=seen)) is None:
                continue  # blank
            item, error = parsed
            if (verdict := ledger.verdict(item)) == "skip":
                stats.skipped += 1
            elif verdict == "refuse":  # another text under a done id: the run is refused; count the rest
                shutdown.fail(f"the input of {item.id} changed")
            elif ledger.changed:
                continue  # refused: nothing more is sent
            elif error is not None:
                stats.enqueued += 1
                await output_queue.put([(item, error)])
            else:
                stats.enqueued += 1
                await input_queue.put(item)
    await input_queue.put(None)


# --- Stage 2: the batcher ---


class Batcher(Generic[T]):
    """Groups items from an input queue into batches on a batch queue.

    A batch leaves when it holds batch_size items, or when timeout has passed since its first
    item arrived. While idle the batcher waits for an item with no timer running; items already
    waiting are taken with get_nowait(), with no timer and no task per item. The None sentinel
    flushes the partial batch and is passed on. No batch is empty, and items keep their order.

    adaptive=True fits batches to the arrival rate, both ways. Slow arrivals: a partial batch
    leaves early once the observed rate says another item is less likely than not before the
    deadline. Fast arrivals: a batch that finds batch_queue full (the calls cannot keep up) keeps
    taking items while it waits for a slot, up to MAX_BATCH_SIZE, so fewer, fuller calls catch up.

    counts: how many batches left how ("full", "timed out", "flushed at end"); items: how
    many items they held.
    """

    def __init__(self, batch_size: int, timeout: timedelta, *, adaptive: bool = False) -> None:
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}")
        if not timeout.total_seconds() > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._batch_size = batch_size
        self._timeout_s = timeout.total_seconds()
        self._adaptive = adaptive
        self._mean_gap_s: float | None = None  # moving average of inter-arrival gaps
        self._gaps = 0  # gaps seen
        self._last_arrival = 0.0
        self.counts: Counter[str] = Counter()
        self.items = 0

    async def batch(self, input_queue: asyncio.Queue[T | None], batch_queue: asyncio.Queue[list[T] | None]) -> None:
        """Batches until the None sentinel, then ends batch_queue with it."""
        loop = asyncio.get_running_loop()
        # The hot loop looks its names up once, takes waiting items with get_nowait() in a
        # try, and checks `adaptive` inline. Measured (bench.py, Batcher stage / plain drain,
        # target >= 0.70): about 1.0 at batch 8 and 100 with these; 0.70 and 0.61 with empty() and
        # a method call per item.
        size, get_nowait, adaptive = self._batch_size, input_queue.get_nowait, self._adaptive
        ended, carried = False, list[T]()
        while not ended:
            try:
                item = carried.pop() if carried else get_nowait()
            except asyncio.QueueEmpty:
                item = await input_queue.get()  # idle: one get(), no timer, until an item comes
            if item is None:
                break
            if adaptive:
                self._observe_arrival(loop.time())
            batch, deadline = [item], None
            while len(batch) < size:
                try:
                    item = get_nowait()
                except asyncio.QueueEmpty:
                    if deadline is None:  # no await since the first item came: now is its time
                        deadline = loop.time() + self._timeout_s
                    wait_s = self._flush_at(deadline) - loop.time()
                    if wait_s <= 0:
                        break
                    try:
                        # One timer per wait on an empty queue, never one per item. It cannot
                        # lose an item: Queue.get removes one only after its wait has succeeded.
                        async with asyncio.timeout(wait_s):
                            item = await input_queue.get()
                    except TimeoutError:
                        break
                if item is None:
                    ended = True
                    break
                if adaptive:
                    self._observe_arrival(loop.time())
                batch.append(item)
            reason = "full" if len(batch) == size else "flushed at end" if ended else "timed out"
            self.counts[reason] += 1
            if adaptive and not ended and batch_queue.full():
                ended, carried = await self._fill_while_queued(batch, input_queue, batch_queue)
            else:
                await batch_queue.put(batch)  # backpressure: wait for the embed stage
            self.items += len(batch)
            log.info("batch of %d left (%s)", len(batch), reason)
        await batch_queue.put(None)

    async def _fill_while_queued(
        self, batch: list[T], input_queue: asyncio.Queue[T | None], batch_queue: asyncio.Queue[list[T] | None]
    ) -> tuple[bool, list[T]]:
        """Puts batch on the full batch_queue; until a slot opens, the batch takes each item that
        comes, up to MAX_BATCH_SIZE. Returns whether the sentinel came, and the item (if any)
        that came as the slot opened: it starts the next batch."""
        loop = asyncio.get_running_loop()
        # The batch goes in with the put below, so it may grow only while that put is pending.
        put, get = asyncio.ensure_future(batch_queue.put(batch)), None
        try:
            while len(batch) < MAX_BATCH_SIZE and not put.done():
                try:
                    item = input_queue.get_nowait()
                except asyncio.QueueEmpty:
                    get = asyncio.ensure_future(input_queue.get())
                    await asyncio.wait((put, get), return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():  # the slot opened first: stop waiting for an item
                        get.cancel()  # a cancelled get() takes no item: it stays queued
                        await asyncio.wait((get,))
                    if get.cancelled():
                        break
                    item = get.result()
                if item is None:
                    await put
                    return True, []
                if put.done():
                    return False, [item]
                self._observe_arrival(loop.time())
                batch.append(item)
            await put
            return False, []
        finally:
            for task in (put, get):
                if task is not None:
                    task.cancel()  # when we are cancelled; a no-op for a task done

    def _observe_arrival(self, now: float) -> None:
        if self._last_arrival:
            gap_s, mean = now - self._last_arrival, self._mean_gap_s
            self._gaps += 1
            weight = max(ADAPTIVE_ALPHA, 1 / self._gaps)
            self._mean_gap_s = gap_s if mean is None else mean + weight * (gap_s - mean)
        self._last_arrival = now

    def _flush_at(self, deadline: float) -> float:
        """When the partial batch leaves if nothing more comes."""
        if self._adaptive and self._mean_gap_s is not None:
            return deadline - ADAPTIVE_FLUSH_GAPS * self._mean_gap_s
        return deadline


# --- Stage 3: the embedding generator ---


async def embed_content(
    client: Client, batch_queue: asyncio.Queue[InputBatch | None], output_queue: asyncio.Queue[Outputs | None], *,
    settings: EmbedSettings, retrier: Retrier, shutdown: Shutdown, concurrency: int = 4,
) -> None:  # fmt: skip
    """Embeds each batch, up to `concurrency` calls in flight, and puts its outputs on
    output_queue, an (item, embedding) or (item, error) pair per item. The texts go out as
    `settings` shape them (a task, titles: see EmbedSettings), so a batch may take one call per
    title. An error about the request as a whole (a bad key or model, a spent daily quota) calls
    shutdown.fail: that batch and the rest are not reported, but left for the next run; so are
    the first three batches when they all fail with one same error (see FailingAlike). Ends
    output_queue with the None sentinel once its workers are done."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    alike = FailingAlike(3, shutdown=shutdown)

    async def worker() -> None:
        while (batch := await batch_queue.get()) is not None:
            if shutdown.requested:
                continue  # drain without calling: the rest is left for the next run
            texts, titles = [item.text for item in batch], [item.title for item in batch]
            try:
                async with shutdown.abandonable():
                    results = await embed_batch(client, texts, settings=settings, retrier=retrier, titles=titles)
            except (TimeoutError, Stopped):
                log.info("a batch of %d abandoned as the run stops; the next run redoes it", len(batch))
                continue
            failures = [result for result in results if isinstance(result, Exception)]
            if failures and (reason := stop_reason(failures[0], settings.model)) is not None:
                shutdown.fail(reason)
                continue
            if outputs := alike.take(list(zip(batch, results, strict=True))):
                await output_queue.put(outputs)
        batch_queue.put_nowait(None)  # the slot we just emptied: wake the next worker

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    if held := alike.release():  # fewer failing batches than it takes to stop the run: reported
        await output_queue.put(held)
    await output_queue.put(None)


async def embed_batch(
    client: Client, texts: list[str], *, settings: EmbedSettings, retrier: Retrier,
    titles: list[str | None] | None = None,
) -> list[types.ContentEmbedding | Exception]:  # fmt: skip
    """Embeds texts (with their titles, if any); returns an embedding or an error per text, in
    order. One call, or one per title where the model takes a title per call (EmbedSettings)."""
    titles = titles or [None] * len(texts)
    if not settings.titles_per_call and settings.sends_text_as_given:  # the common case: one call, as given
        return await embed_call(client, texts, settings, None, retrier)
    calls: dict[str | None, list[int]] = {}  # the texts' places, by the title their call carries
    for i, title in enumerate(titles):
        calls.setdefault(title if settings.titles_per_call else None, []).append(i)
    results: list[types.ContentEmbedding | Exception] = [MalformedReply("not embedded")] * len(texts)
    for title, places in calls.items():
        sent = [settings.sent_text(texts[i], titles[i]) for i in places]
        for i, result in zip(places, await embed_call(client, sent, settings, title, retrier), strict=True):
            results[i] = result
    return results


async def embed_call(
    client: Client, texts: list[str], settings: EmbedSettings, title: str | None, retrier: Retrier
) -> list[types.ContentEmbedding | Exception]:
    """Embeds texts, as sent, in one call; with settings.normalize each vector is scaled to unit
    length (see unit_vector).

    A permanent error on the content (400, 413, 422) is bisected, so only the bad texts
    fail: one bad text in 100 costs at most 2*ceil(log2(100)) more calls. Bisection stops
    when both halves fail alike (the error does not depend on the texts), and never starts
    for an error about the request as a whole (the key, the model).
    """
    config = settings.config(title)

    async def request(part: list[str]) -> list[types.ContentEmbedding]:
        # One input per text, in the form the SDK sends at least cost. gemini-embedding-001 (a
        # model that takes the task as a field) gets plain strings, each its own input; for newer
        # models the SDK merges a list of strings into one multi-part input (N texts, one vector),
        # so each text goes as its own {"parts"} dict: a third of the SDK's work for a types.Content.
        contents: list[Any] = list(part) if not settings.task_in_text else [{"parts": [{"text": t}]} for t in part]
        try:
            response = await client.aio.models.embed_content(model=settings.model, contents=contents, config=config)
        except ValueError as exc:
            if not is_unparsable_reply(exc):
                raise  # raised before sending ("model is required."): a fault of the call, not the reply
            raise MalformedReply(f"unreadable reply: {exc}") from exc
        if len(embeddings := response.embeddings or []) != len(part):
            raise MalformedReply(f"{len(embeddings)} embeddings returned for {len(part)} texts")
        if settings.normalize:
            for embedding in embeddings:
                embedding.values = unit_vector(embedding.values or [])
        return embeddings

    async def attempt(part: list[str]) -> list[types.ContentEmbedding | Exception] | Exception:
        """One call, retried: the embeddings, or the error that ended it."""
        tokens = estimated_tokens(part)
        try:
            embeddings = await retrier.call(lambda: request(part), tokens=tokens, cost_usd=retrier.cost.of(tokens))
            retrier.cost.pay(tokens)
            return list(embeddings)
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, errors.APIError) or is_auth_error(exc)):
                raise  # a bug, not a fault of this batch: let it surface
            return exc

    async def bisect(part: list[str], error: Exception) -> list[types.ContentEmbedding | Exception]:
        """Splits `part`, which failed with `error`, while a split can tell which texts cause it."""
        if len(part) == 1 or not isinstance(error, errors.APIError) or error.code not in BISECT_CODES:
            return [error] * len(part)
        if is_request_wide(error):  # a 400 for a bad key: no text causes it
            return [error] * len(part)
        halves = [part[: len(part) // 2], part[len(part) // 2 :]]
        outcomes = [await attempt(half) for half in halves]
        if all(isinstance(o, errors.APIError) and (o.code, o.message) == (error.code, error.message) for o in outcomes):
            return [error] * len(part)  # both halves fail alike: the error does not depend on the texts
        results: list[types.ContentEmbedding | Exception] = []
        for half, outcome in zip(halves, outcomes, strict=True):
            results += outcome if isinstance(outcome, list) else await bisect(half, outcome)
        return results

    outcome = await attempt(texts)
    return outcome if isinstance(outcome, list) else await bisect(texts, outcome)


# --- Stage 4: the output logger (or, for a corpus, the output writer) ---


async def log_outputs(
    output_queue: asyncio.Queue[Outputs | None], *, stats: RunStats, quiet: bool = False, output: Any = None
) -> None:
    """Until the sentinel: prints one line per item, as in the document, and records outcome
    and latency. With `output` (an open aiofiles file) the embeddings are appended to it as
    JSONL records instead, whatever is waiting in one write and one flush, and only failures
    are printed. A failed item is never written, so a re-run tries it again."""
    loop = asyncio.get_running_loop()
    ended = False
    while not ended:
        taken = [await output_queue.get()]
        while not output_queue.empty():  # and whatever else is waiting: one write for them all
            taken.append(output_queue.get_nowait())
        ended = taken[-1] is None  # embed_content puts the sentinel after every output
        lines = []
        for item, result in itertools.chain.from_iterable(filter(None, taken)):
            if (arrived := stats.arrived_at.pop(item.id, None)) is not None:
                stats.latencies_s.append(loop.time() - arrived)
            if isinstance(result, Exception):
                stats.failed += 1
                if not quiet:
                    clear = CLEAR_LINE if sys.stdout.isatty() else ""  # the progress line may be there
                    print(f"{clear}Failed: {item.id} -> {describe(result)}", flush=True)
            elif output is not None:
                lines.append(record_line(item, result.values or []))
            else:
                stats.succeeded += 1
                if not quiet:
                    print(f"Content: {item.text} -> Embedding: {result.values}")
        if lines:
            await append(output, lines)
            stats.succeeded += len(lines)


# --- main: wires the stages ---


async def main(config: Config, client: Client, *, shutdown: Shutdown) -> int:
    """Runs the four stages; returns the exit status: 0 all embedded, 1 some failed, 2 an
    error about every request (a bad key or model), 130 or 143 interrupted. Raises
    UsageError on bad input, or when another run holds the output file."""
    check_paths(config)
    if isinstance(client, SimulatedClient):
        notice = f"no GEMINI_API_KEY, or --offline: using the simulated client (latency {client.latency_s}s)"
        log.warning(notice)
    batcher: Batcher[Input] = Batcher(config.batch_size, timedelta(seconds=config.timeout_s), adaptive=config.adaptive)
    run = Run(config, client, shutdown=shutdown)
    stats, retrier, tty = run.stats, run.retrier, sys.stderr.isatty()
    input_queue: asyncio.Queue[Input | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
    batch_queue: asyncio.Queue[InputBatch | None] = asyncio.Queue(maxsize=BATCH_QUEUE_SIZE)
    output_queue: asyncio.Queue[Outputs | None] = asyncio.Queue(maxsize=OUTPUT_QUEUE_SIZE)
    file_errors: list[BaseException] = []  # a disk or file error: what was written stays valid

    async def keep_file_error(exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        """Closing the output on a full disk fails too: one line for it, after the summary."""
        if isinstance(exc, OSError) and exc.filename not in {getattr(e, "filename", 0) for e in file_errors}:
            file_errors.append(exc)
        return isinstance(exc, OSError)

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_exit(keep_file_error)  # first in, so last out: after the output's close
        output, ledger, dry = None, run.ledger, config.dry_run
        if config.output is not None:
            if not (dry and not config.output.exists()):  # a dry run makes no file
                try:
                    output = await stack.enter_async_context(open_file(config.output, "rb" if dry else "ab"))
                except OSError as exc:  # a read-only file system, a dangling symlink, no permission
                    raise UsageError(f"cannot write the output file {config.output}: {exc.strerror}") from None
                lock_output(output, config.output)  # before reading it: another run may be writing
                ledger = run.ledger = await open_ledger(config.output, config, dry_run=dry)
                output = None if dry else output  # written to only by a real run
            if config.batch_cancel:
                return await cancel_jobs(run)
            if ledger.done:
                log.warning("resuming: %d texts already in %s", len(ledger.done), config.output)
            if ledger.live and not config.batch_api:
                raise UsageError(
                    f"{plural(len(ledger.live), 'Batch API job')} of an earlier --batch-api run may still embed "
                    f"texts for {config.output}: run with --batch-api to collect them, or --batch-cancel"
                )
        if config.input is None:  # the document's demo
            source = enqueue_inputs(
                input_queue, num_inputs=config.num_inputs, max_delay_s=config.input_delay_s, skip=ledger.done,
                stats=stats, shutdown=shutdown,
            )  # fmt: skip
        else:
            path = None if config.input == STDIN else config.input
            source = read_corpus(run, path, input_queue, output_queue)
        stages, tally = [source], Tally[Input](lambda item: estimated_tokens([item.text]))
        if dry:  # a tally in place of stages 2 and 3: nothing is called
            stages.append(tally.run(input_queue, output_queue))
        elif config.batch_api:  # the Batch API batches and embeds: one stage in place of two
            stages.append(BatchJobs(run, EmbedJobs(run, output_queue)).run(input_queue))
        else:
            stages.append(batcher.batch(input_queue, batch_queue))
            stages.append(embed_content(
                client, batch_queue, output_queue, settings=config.embedding, retrier=retrier, shutdown=shutdown,
                concurrency=config.concurrency,
            ))  # fmt: skip
        # The demo prints a line per item (the document's output); with --output only failures are
        # printed; a corpus with neither is a dry run. Without a line per item, a progress line shows.
        per_item_lines = config.input is None and output is None
        quiet = config.quiet or (output is None and not per_item_lines)
        stages.append(log_outputs(output_queue, stats=stats, quiet=quiet, output=output))
        progress = None
        if not (config.quiet or dry) and (not per_item_lines or not tty):
            progress = asyncio.create_task(show_progress(stats, tty=tty))
        try:
            async with asyncio.TaskGroup() as tg:
                for stage in stages:
                    tg.create_task(stage)
        except* OSError as group:
            file_errors += leaf_exceptions(group)
        finally:
            if progress is not None:
                progress.cancel()
        if ledger.changed:
            await ledger.refuse(output)
        if dry:
            calls = math.ceil(tally.items / config.batch_size)
            print(estimate("text", sent=tally.items, skipped=stats.skipped, calls=calls,
                           input_tokens=tally.tokens, output_tokens=None, config=config,
                           half_price="with the Batch API"))  # fmt: skip
            return 0
        if config.batch_api and not file_errors:  # the records of collected jobs are written
            await ledger.drop_collected()
    stopped = shutdown.requested or bool(file_errors)
    return end_of_run(
        summary(batcher, retrier, stats, stopped=stopped, batch_api=config.batch_api), shutdown=shutdown,
        file_errors=file_errors, live_jobs=len(ledger.live) if config.batch_api else 0, failed=bool(stats.failed),
    )  # fmt: skip


@dataclass
class Run:
    """What the stages of one run share, made once by main(): the settings, the client, the
    counts, the shutdown, the Retrier that every call goes through (rpm, tpm and retries as the
    settings say), and what the output file holds (the ledger; the demo's is empty)."""

    config: Config
    client: Client = None
    stats: RunStats = field(default_factory=lambda: RunStats())
    shutdown: Shutdown = field(default_factory=lambda: Shutdown())
    ledger: Ledger = field(default_factory=lambda: Ledger())
    retrier: Retrier = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        self.stats.cost = Cost(c.price, half_price="Batch API" if c.batch_api else "", max_usd=c.max_cost_usd)
        self.retrier = Retrier(
            max_attempts=c.max_attempts, request_timeout_s=c.request_timeout_s,
            rpm=None if c.batch_api else c.rpm, tpm=None if c.batch_api else c.tpm,  # the Batch API has its own quota
            shutdown=self.shutdown, cost=self.stats.cost,
        )  # fmt: skip


@dataclass
class RunStats:
    """What the logger saw, and when each input arrived (for latency)."""

    arrived_at: dict[str, float] = field(default_factory=dict)  # by id
    latencies_s: list[float] = field(default_factory=list)
    enqueued: int = 0
    skipped: int = 0  # already in the output file
    succeeded: int = 0
    failed: int = 0
    batch_jobs: int = 0  # Batch API jobs created (--batch-api)
    cost: Cost = field(default_factory=lambda: Cost())  # the dollars of the texts embedded, and the budget
    started: float = field(default_factory=time.perf_counter)


def summary(
    batcher: Batcher[Input], retrier: Retrier, stats: RunStats, *, stopped: bool, batch_api: bool = False
) -> str:
    """What the run did. Latency is measured in the demo, where inputs arrive over time; a corpus
    is read as fast as the queues take it, so its summary has none. A stopped run (a bad key, a
    spent quota, Ctrl-C) says what it leaves for the next run."""
    lat, wall_s, counts = stats.latencies_s, time.perf_counter() - stats.started, batcher.counts
    mean_batch = batcher.items / counts.total() if counts else 0.0
    skipped = f", {stats.skipped} skipped (already in the output)" if stats.skipped else ""
    latency = ""
    if lat:
        latency = f"item latency p50 {percentile(lat, 50):.3f}s, p99 {percentile(lat, 99):.3f}s, max {max(lat):.3f}s; "
    lines = [
        f"Summary: {plural(batcher.items, 'item')} in {plural(counts.total(), 'batch', 'batches')} ({counts['full']} "
        f"full, {counts['timed out']} timed out, {counts['flushed at end']} flushed at end){skipped}",
    ]
    if batch_api:  # Google's Batch API made the batches
        lines = [
            f"Summary: {plural(stats.batch_jobs, 'Batch API job')} created, billed at the batch price (half the "
            f"interactive one){skipped}",
            f"  {stats.succeeded} embedded, {plural(stats.failed, 'failed item')}",
        ]
    else:
        lines.append(
            f"  mean batch size {mean_batch:.2f}, {plural(retrier.calls, 'API call')}, "
            f"{plural(retrier.retries, 'retry', 'retries')}, {stats.succeeded} embedded, "
            f"{plural(stats.failed, 'failed item')}"
        )
    lines += [stats.cost.summary(), f"  {latency}wall time {wall_s:.2f}s"]
    if stopped:
        left = stats.enqueued - stats.succeeded - stats.failed
        lines.append(f"  left for the next run: {plural(left, 'item')} read but not done, and those not read")
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (0..100) of values (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def check_paths(config: Config) -> None:
    """Raises UsageError, naming the path, for an input or output that cannot work."""
    source, output = config.input, config.output
    if config.batch_api and (source is None or output is None):
        raise UsageError("--batch-api embeds a corpus: give --input and --output")
    if config.batch_cancel and (output is None or not output.exists()):
        raise UsageError(f"--batch-cancel cancels the jobs of an existing --output file, got {output or 'none'}")
    if source is not None and source != STDIN:
        if not source.exists():
            raise UsageError(f"input file not found: {source}")
        if not source.is_file():
            pipe = "" if source.is_dir() else " (to read a pipe, give --input - and pipe it in)"
            raise UsageError(f"input is not a file: {source}{pipe}")
    if output is not None:
        if not output.parent.is_dir():
            raise UsageError(f"output folder not found: {output.parent}")
        if output.is_dir():
            raise UsageError(f"output is a folder, not a file: {output}")
        if source is not None and source != STDIN and output.exists() and output.samefile(source):
            raise UsageError(f"output is the input file: {output}")


async def show_progress(stats: RunStats, *, tty: bool) -> None:
    """Until cancelled: on a terminal, one line redrawn 4 times a second; elsewhere (nohup,
    containers, CI logs) a plain line every PROGRESS_EVERY_S, so a stall shows as counts
    that stop moving."""
    try:
        while True:
            await asyncio.sleep(0.25 if tty else PROGRESS_EVERY_S)
            done, elapsed = stats.succeeded + stats.failed, time.perf_counter() - stats.started
            line = f"{done} done, {stats.failed} failed, {stats.enqueued - done} in flight, {done / elapsed:.0f}/s"
            line += stats.cost.progress()
            print(f"\r{line}   " if tty else f"progress: {line}", end="" if tty else "\n", file=sys.stderr, flush=True)
    finally:
        if tty:
            print(file=sys.stderr)


def estimated_tokens(texts: list[str]) -> float:
    """The input tokens of texts, for --tpm, --price and --dry-run alike: characters / 4 (the
    Developer API reports no usage for embeddings)."""
    return sum(map(len, texts)) / 4


def unit_vector(values: list[float]) -> list[float]:
    """values scaled to length 1, so a dot product is the cosine. Google's embeddings guide says
    to normalize gemini-embedding-001's vectors below 3072 dimensions (768, 1536) yourself: only
    the full size comes normalized. A unit vector stays as it is; a zero vector too."""
    norm = math.hypot(*values)
    return [value / norm for value in values] if norm else values


# The task types of Google's embeddings guide. gemini-embedding-001 takes one as the task_type
# field; gemini-embedding-2 rejects that field and takes the task in the text, in these forms
# (the guide's): "task: <name> | query: <text>", and "title: <title> | text: <text>" for documents.
TASK_NAMES = {
    "RETRIEVAL_QUERY": "search result",
    "RETRIEVAL_DOCUMENT": None,  # a document: "title: ... | text: ..."
    "QUESTION_ANSWERING": "question answering",
    "FACT_VERIFICATION": "fact checking",
    "CODE_RETRIEVAL_QUERY": "code retrieval",
    "SEMANTIC_SIMILARITY": "sentence similarity",
    "CLASSIFICATION": "classification",
    "CLUSTERING": "clustering",
}
FIELD_TASK_MODELS = ("gemini-embedding-001", "gemini-embedding-exp", "text-embedding-")  # task_type as a field


@dataclass(frozen=True)
class EmbedSettings:
    """What shapes each vector; the output's manifest records them, so a resumed run keeps them.

    task_type is one of TASK_NAMES, or None (the model's default). gemini-embedding-001 gets it
    as the task_type field, and with RETRIEVAL_DOCUMENT a text's title as the title field, which
    holds for a whole call: texts of different titles go in different calls. Newer models
    (gemini-embedding-2) take task and title in the text sent instead (see sent_text); the
    record's text stays the text as given. normalize: unit vectors (see unit_vector)."""

    model: str = "gemini-embedding-001"
    dimensions: int | None = None  # output_dimensionality; None: the model's full size
    normalize: bool = True
    task_type: str | None = None

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model must be a model name, got ''")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")
        if self.task_type is not None and self.task_type not in TASK_NAMES:
            raise ValueError(f"task_type must be one of {', '.join(TASK_NAMES)}, got {self.task_type!r}")

    @functools.cached_property
    def task_in_text(self) -> bool:
        return not self.model.rsplit("/", 1)[-1].startswith(FIELD_TASK_MODELS)

    @property
    def sends_text_as_given(self) -> bool:
        """Whether sent_text is the text itself (no task or title goes in it)."""
        return not self.task_in_text or self.task_type is None

    @property
    def titles_per_call(self) -> bool:
        """Whether a title goes in the call's config (one title per call) rather than the text."""
        return self.task_type == "RETRIEVAL_DOCUMENT" and not self.task_in_text

    def sent_text(self, text: str, title: str | None) -> str:
        if not self.task_in_text or self.task_type is None:
            return text
        if (task := TASK_NAMES[self.task_type]) is None:
            return f"title: {title or 'none'} | text: {text}"
        return f"task: {task} | query: {text}"

    def config(self, title: str | None) -> types.EmbedContentConfig:
        field_task = None if self.task_in_text else self.task_type
        title = title if self.titles_per_call else None
        return types.EmbedContentConfig(output_dimensionality=self.dimensions, task_type=field_task, title=title)


class FailingAlike:
    """Stops a run whose calls all fail alike: a setting the model rejects fails every batch with
    one same 400, so reporting each text as failed would only have to be undone. Until a batch
    succeeds, a batch whose texts all failed with one same API error is held back; when the first
    `limit` batches all failed so, the run stops (shutdown.fail, quoting the error) and their texts
    are left for the next run. Any other outcome releases what is held, reported as usual."""

    def __init__(self, limit: int, *, shutdown: Shutdown) -> None:
        self._limit = limit
        self._shutdown = shutdown
        self._errors: list[str] = []  # the error of each batch held
        self._held: list[Output] = []
        self._deciding = True

    def take(self, outputs: list[Output]) -> list[Output]:
        """The outputs to report now, given one more batch's."""
        results = {describe(r) if isinstance(r, errors.APIError) and not is_transient(r) else "" for _, r in outputs}
        error = results.pop() if len(results) == 1 else ""
        if self._deciding and error and all(held == error for held in self._errors):
            self._errors.append(error)
            self._held += outputs
            if len(self._errors) == self._limit:
                self._shutdown.fail(f"the first {self._limit} batches all failed alike: {error}")
            return []
        return outputs if not self._deciding else self.release() + outputs

    def release(self) -> list[Output]:
        """What is held, unless the run stopped for it; from here on, nothing is held."""
        self._deciding, held, self._held = False, self._held, []
        return held if len(self._errors) < self._limit else []


@functools.cache
def vector_format(length: int) -> str:
    """The JSON of a vector of `length` values, to fill with str.format: "{:.9}" is 9 significant
    digits, 3.0 as "3.0" (one call for the whole vector: half the cost of one per value)."""
    return "[" + ", ".join(["{:.9}"] * length) + "]"


def record_line(item: Input, embedding: list[float]) -> str:
    """The output record of an item: {"id", "text", "title"?, "metadata"?, "embedding"}, in that
    order (a resume reads the id, text and title alone), as one line of JSON."""
    # Joined by hand, at a fifth of json.dumps's cost. Each value with 9 significant digits: every
    # float32 (what the API sends) round-trips, and a normalized value keeps all the API gave;
    # repr writes a float64's 17 digits, at nearly twice the cost, and the file grows by half.
    title = f', "title": {JSON_STRING(item.title)}' if item.title is not None else ""
    metadata = f', "metadata": {json.dumps(item.metadata)}' if item.metadata else ""
    if "n" in (values := vector_format(len(embedding)).format(*embedding)):  # nan, inf: as json.dumps writes them
        values = json.dumps(embedding)
    return (
        f'{{"id": {JSON_STRING(item.id)}, "text": {JSON_STRING(item.text)}{title}{metadata}, "embedding": {values}}}\n'
    )


# === Modes: the Batch API stage, and BatchedEmbedder ===
# --batch-api: each live job's texts wait beside the output, in <output>.batch/, until collected.
BATCH_SUFFIX = ".batch"
JOB_TEXTS = 20_000  # texts per Batch API job at most (--batch-job-size; and JOB_BYTES of requests)
POLL_INTERVAL_S = 30.0  # between two looks at the waiting jobs, as Google's guide polls (offline: 0.5 s)


class JobFiles:
    """A job being filled: its texts (path, kept until its records are written) and its Batch API
    input ({"key": id, "request": EmbedContentRequest} per line: requests_path, to upload), both
    appended to through aiofiles every WRITE_EVERY texts."""

    def __init__(self, path: Path, settings: EmbedSettings) -> None:
        self.path, self.requests_path = path, path.with_suffix(".requests.jsonl")
        self.count = self.size = 0
        self.input_tokens, self.output_tokens = 0.0, 0.0  # estimated (see estimated_tokens): no output
        self._settings = settings
        self._held: list[Input] = []

    async def add(self, item: Input) -> None:
        self._held.append(item)
        self.count += 1
        self.size += len(item.text) + 200
        self.input_tokens += estimated_tokens([item.text])
        if len(self._held) == WRITE_EVERY:
            await self.flush()

    async def flush(self) -> None:
        held, self._held = self._held, []
        if not held:
            return
        s = self._settings
        lines, requests = [], []
        for item in held:
            lines.append(json.dumps({"id": item.id, "text": item.text, "title": item.title, "metadata": item.metadata}))
            request: dict[str, Any] = {"content": {"parts": [{"text": s.sent_text(item.text, item.title)}]}}
            config = s.config(item.title)  # the fields an interactive call would send
            if config.task_type is not None:
                request["taskType"] = config.task_type
            if config.title is not None:
                request["title"] = config.title
            if config.output_dimensionality is not None:
                request["outputDimensionality"] = config.output_dimensionality
            requests.append(json.dumps({"key": item.id, "request": request}))
        for target, data in ((self.path, lines), (self.requests_path, requests)):
            async with open_file(target, "ab") as f:
                await append(f, [line + "\n" for line in data])


def batch_embedding(row: dict[str, Any], normalize: bool) -> types.ContentEmbedding | Exception:
    """The embedding of one line of a job's results file, or the error that failed it."""
    if isinstance(error := row.get("error"), dict):
        message = f"{error.get('code', '?')} {error.get('status', '')}: {error.get('message', '')}"
        return MalformedReply(f"batch: {message}")
    values = ((row.get("response") or {}).get("embedding") or {}).get("values")
    if not (isinstance(values, list) and values):
        return MalformedReply("batch: no embedding in the result")
    return types.ContentEmbedding(values=unit_vector(values) if normalize else values)


class EmbedJobs:
    """Embeddings for BatchJobs (stages 2 and 3 with --batch-api): a job's texts and its
    EmbedContentRequests (JobFiles), created by batches.create_embeddings; each result is shaped
    as an interactive run's (normalization) and goes to output_queue alone, as a failure does."""

    noun = "text"

    def __init__(self, run: Run, output_queue: asyncio.Queue[Outputs | None]) -> None:
        self.client, self.settings, self.output_queue = run.client, run.config.embedding, output_queue
        self.cost = run.stats.cost

    def files(self, path: Path) -> JobFiles:
        return JobFiles(path, self.settings)

    async def create(self, file_name: str, display_name: str) -> types.BatchJob:
        with warnings.catch_warnings():  # "batches.create_embeddings() is experimental": said in the README
            warnings.simplefilter("ignore")
            created: types.BatchJob = await self.client.aio.batches.create_embeddings(
                model=self.settings.model, src={"file_name": file_name}, config={"display_name": display_name}
            )
            return created

    def item_of(self, row: dict[str, Any]) -> tuple[str, Input]:
        return row["id"], Input(row["id"], row["text"], row["title"], row["metadata"])

    async def deliver(self, item: Input, row: dict[str, Any], job: Job) -> None:
        if not isinstance(embedding := batch_embedding(row, self.settings.normalize), Exception):
            self.cost.pay(estimated_tokens([item.text]))
        await self.output_queue.put([(item, embedding)])

    async def fail(self, item: Input, reason: str, job: Job) -> None:
        await self.output_queue.put([(item, MalformedReply(f"batch: {reason}"))])

    async def end(self) -> None:
        await self.output_queue.put(None)


class EmbeddingFailed(Exception):
    """One caller's text could not be embedded. `error` is the API's error (an
    errors.APIError, say), shared by the batch; each caller gets its own EmbeddingFailed."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(describe(error))
        self.error = error
        self.__cause__ = error


_Request: TypeAlias = tuple[str, asyncio.Future[types.ContentEmbedding]]  # a caller's text, and its answer


class BatchedEmbedder:
    """Await one embedding per call; calls are batched underneath.

        async with BatchedEmbedder(client, batch_size=32, timeout=timedelta(milliseconds=20)) as e:
            embedding = await e.embed("some text")

    A caller whose text failed gets EmbeddingFailed (its .error is the API's error); the others
    in its batch still get their embeddings. A cancelled caller's text is dropped from its batch
    if the batch has not been sent. Leaving the block flushes the last batch. If the block ends
    with an error or a cancellation, or a worker fails, every caller still waiting gets
    EmbeddingFailed at once. embed() outside the block raises RuntimeError.
    """

    def __init__(
        self, client: Client, *, batch_size: int = 8, timeout: timedelta = timedelta(milliseconds=50),
        concurrency: int = 4, model: str = "gemini-embedding-001", dimensions: int | None = None,
        task_type: str | None = None, normalize: bool = True, adaptive: bool = False, max_attempts: int = 5,
        request_timeout_s: float = REQUEST_TIMEOUT_S, rpm: float | None = None, tpm: float | None = None,
    ) -> None:  # fmt: skip
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._client = client
        self._settings = EmbedSettings(model, dimensions, normalize, task_type)
        self._batcher: Batcher[_Request] = Batcher(batch_size, timeout, adaptive=adaptive)
        self._concurrency = concurrency
        self.retrier = Retrier(max_attempts=max_attempts, request_timeout_s=request_timeout_s, rpm=rpm, tpm=tpm)
        self._requests: asyncio.Queue[_Request | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._batches: asyncio.Queue[list[_Request] | None] = asyncio.Queue(maxsize=BATCH_QUEUE_SIZE)
        self._tasks = asyncio.TaskGroup()
        self._open = False
        self._waiting: set[asyncio.Future[types.ContentEmbedding]] = set()  # callers still in embed()

    async def __aenter__(self) -> BatchedEmbedder:
        await self._tasks.__aenter__()
        self._tasks.create_task(self._batcher.batch(self._requests, self._batches))
        for _ in range(self._concurrency):
            self._tasks.create_task(self._serve())
        self._open = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._open = False  # from here on, embed() raises at once
        try:
            if exc_type is None:
                await self._requests.put(None)  # the batcher flushes, then the workers finish
        except BaseException as stop:  # cancelled while flushing: a worker failed, or our owner was cancelled
            exc_type, exc, tb = type(stop), stop, stop.__traceback__
        try:
            await self._tasks.__aexit__(exc_type, exc, tb)  # on an error, this cancels our tasks first
        finally:
            await self._fail_waiting()

    async def embed(self, text: str) -> types.ContentEmbedding:
        if not self._open:
            raise RuntimeError("BatchedEmbedder.embed() called outside its `async with` block")
        future: asyncio.Future[types.ContentEmbedding] = asyncio.get_running_loop().create_future()
        self._waiting.add(future)
        try:
            await self._requests.put((text, future))
            return await future  # a cancelled caller cancels its future too
        finally:
            self._waiting.discard(future)

    async def _serve(self) -> None:
        while (batch := await self._batches.get()) is not None:
            if not (live := [(text, future) for text, future in batch if not future.done()]):
                continue  # every caller of this batch was cancelled
            texts = [text for text, _ in live]
            results = await embed_batch(self._client, texts, settings=self._settings, retrier=self.retrier)
            for (_, future), result in zip(live, results, strict=True):
                if future.done():  # cancelled while in flight
                    continue
                if isinstance(result, Exception):
                    future.set_exception(EmbeddingFailed(result))
                else:
                    future.set_result(result)
        self._batches.put_nowait(None)

    async def _fail_waiting(self) -> None:
        """Our tasks are gone: answer every caller still waiting, and make room for those
        blocked on the full request queue (their futures have already failed) until all left."""
        stopped = RuntimeError("BatchedEmbedder stopped before this text was embedded")
        for future in self._waiting:
            if not future.done():
                future.set_exception(EmbeddingFailed(stopped))
        while self._waiting:
            with contextlib.suppress(asyncio.QueueEmpty):
                self._requests.get_nowait()
            await asyncio.sleep(0)


# === Safe re-runs: the ledger of the output, and the input formats ===
ID_PREFIX = b'{"id": '  # how every output record starts, so a resume reads the id alone
TEXT_AFTER_ID = ', "text": '  # and what follows the id: then the text, read without the embedding
TITLE_AFTER_TEXT = ', "title": '  # and then, in a record of a JSONL row with a title, the title
MANIFEST_SUFFIX = ".manifest.json"  # beside --output: the settings that shaped its records
ID_DECODER = json.JSONDecoder()
JSON_STRING = json.encoder.encode_basestring_ascii  # json.dumps(a_str), without the encoder around it


@dataclass
class Job:
    """A Batch API job, as the output's manifest records it: the API's name ("" until the create
    returns), the file beside the output that holds its texts (id, text, title, metadata), which
    attempt it is for them, and its display name, unique to it (see BatchJobs.submit)."""

    name: str
    texts: str  # the file's name in <output>.batch/: job_00001.jsonl
    attempt: int = 1
    display_name: str = ""


@dataclass
class Ledger:
    """The output file's state, in one place, read once when the run starts (open_ledger): the
    manifest (the settings that shaped its vectors, and the live Batch API jobs), and the ids done
    (with a record in the output) and queued (in a live job), each with its text and title, or a
    hash of them: an id is done only for the text its record embeds. verdict() answers, for each
    text read: send it, skip it (done or queued, unchanged), or refuse the run (another text under
    that id); a refused run puts the output back as it was (refuse).

    Creating a Batch API job is not idempotent and every job is billed, so a job is recorded (one
    atomic manifest write) before its create is called (record); a re-run waits on the recorded
    jobs and never submits their texts again. A job leaves the ledger, and its file goes, once its
    records are written: drop_collected, at the end of the run. Job files are named relative to
    the batch folder, so a re-run from any folder finds them."""

    output: Path = Path()  # the demo has none: nothing is done
    manifest: dict[str, Any] = field(default_factory=dict)  # as this run wrote it: settings and jobs
    manifest_created: bool = False  # by this run (so a refused run removes it)
    size: int = 0  # the output's bytes when the run started: what a refused run leaves
    done: dict[str, int] = field(default_factory=dict)  # by id: input_hash of its record's text
    queued: dict[str, Input] = field(default_factory=dict)  # in a live Batch API job
    changed: int = 0  # texts read that are not the text of their id's record or job any more
    first_changed: Input | None = None  # the first of them, as it is now
    live: list[Job] = field(default_factory=list)  # the recorded jobs
    states: dict[str, str] = field(default_factory=dict)  # each job's last state seen, for the progress line
    collected: list[Job] = field(default_factory=list)  # jobs whose records are written
    job_numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # for new job files
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one manifest write at a time

    def verdict(self, item: Input) -> Literal["send", "skip", "refuse"]:
        """What to do with a text read: refuse counts it (see refuse), and the run stops."""
        queued = self.queued.get(item.id)  # a live Batch API job embeds it
        if (digest := input_hash(queued) if queued else self.done.get(item.id)) is None:
            return "send"
        if digest == input_hash(item):
            return "skip"
        self.changed += 1
        self.first_changed = self.first_changed or item
        return "refuse"

    async def refuse(self, output: Any) -> NoReturn:
        """The input changed under ids already embedded: the output goes back to what it held at
        the start (the manifest too), and the run is refused with one line."""
        assert self.first_changed is not None
        if output is not None:  # (a dry run wrote nothing)
            await output.truncate(self.size)
        if self.manifest_created:
            manifest_path(self.output).unlink()
        new = self.first_changed
        old = (
            self.queued[new.id]
            if new.id in self.queued
            else await asyncio.to_thread(embedded_input, self.output, new.id)
        )
        what = "title" if old.text == new.text else "text"
        more = f", and {self.changed - 1} more" if self.changed > 1 else ""
        raise UsageError(
            f"the input of {new.id} changed since it was embedded: {shown(getattr(old, what))} -> "
            f"{shown(getattr(new, what))}{more}: use a new --output, or restore the input"
        )

    @property
    def folder(self) -> Path:
        return self.output.with_name(self.output.name + BATCH_SUFFIX)

    @property
    def label(self) -> str:
        return self.output.name  # in each job's display name, as AI Studio lists it

    def new_path(self) -> Path:
        self.folder.mkdir(exist_ok=True)
        return self.folder / f"job_{next(self.job_numbers):05d}.jsonl"

    def job(self, name: str, path: Path, attempt: int, display_name: str) -> Job:
        return Job(name, path.name, attempt, display_name)

    def path_of(self, job: Job) -> Path:
        """The file of a job's texts (recorded by name; by a path from the working folder before)."""
        return self.folder / Path(job.texts).name

    async def record(self, job: Job, *, replacing: Job | None = None) -> None:
        """Adds job (in place of `replacing`, in the same write: never both, never neither)."""
        self.live = [*(j for j in self.live if j is not replacing), job]
        await self._write()

    async def drop_collected(self) -> None:
        self.live = [job for job in self.live if job not in self.collected]
        await self._write()
        for job in self.collected:
            await asyncio.to_thread(self.path_of(job).unlink, missing_ok=True)
        self.collected = []
        if not self.live:  # nothing waits any more: no empty folder left behind
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.folder.rmdir)

    async def _write(self) -> None:
        async with self.lock:
            self.manifest["jobs"] = [vars(job) for job in self.live]
            await asyncio.to_thread(write_manifest, self.output, dict(self.manifest))


def lock_output(output: Any, path: Path) -> None:
    """An exclusive OS lock on the open output file for the whole run: a second run on the
    same file is refused. The OS releases it however the process ends (kill -9 too)."""
    try:
        fcntl.flock(output.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another run is using {path}") from None


def manifest_path(output: Path) -> Path:
    """Where the manifest of an output file lives: beside it."""
    return output.with_name(output.name + MANIFEST_SUFFIX)


def read_manifest(output: Path) -> dict[str, Any] | None:
    """The output's manifest, or None if it has none (new, or from before manifests)."""
    path = manifest_path(output)
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("written_by") == "batcher.py"):
        raise UsageError(f"{path} is not a manifest of batcher.py: use another --output, or move the file")
    return manifest


def write_manifest(output: Path, manifest: dict[str, Any]) -> None:
    """Writes the manifest atomically (a whole new file, renamed over the old), if it changed."""
    path, data = manifest_path(output), (json.dumps(manifest, indent=2) + "\n").encode()
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recorded_input(line: bytes, *, strict: bool) -> Input:
    """A record's id, text and title. Read without parsing the rest (metadata, embedding),
    unless strict (every field is checked). Raises ValueError for a line not one of our records."""
    title = None
    if line.startswith(ID_PREFIX) and not strict:
        data = line.decode()
        item_id, end = ID_DECODER.raw_decode(data, len(ID_PREFIX))
        if not data.startswith(TEXT_AFTER_ID, end):
            raise ValueError("no text after the id")
        text, end = ID_DECODER.raw_decode(data, end + len(TEXT_AFTER_ID))
        if data.startswith(TITLE_AFTER_TEXT, end):
            title = ID_DECODER.raw_decode(data, end + len(TITLE_AFTER_TEXT))[0]
    else:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("embedding"), list):
            raise ValueError("not a record")
        item_id, text, title = record.get("id"), record.get("text"), record.get("title")
    if not (isinstance(item_id, str) and isinstance(text, str) and isinstance(title, str | None)):
        raise ValueError("not a record")
    return Input(item_id, text, title)


def input_hash(item: Input) -> int:
    """What a resume compares: the text, and the title if any (both shape the vector)."""
    return hash(item.text) if item.title is None else hash((item.text, item.title))


async def scan_output(f: Any, path: Path, *, strict: bool) -> tuple[dict[str, int], int | None]:
    """The ids in the open output file, each with a hash of its text, and where to cut a torn
    last line (a kill mid-write: never a record), or None. An unreadable line is skipped with a
    warning; with strict (a file not known to be ours), a line that is not a record refuses the
    file (UsageError)."""
    done: dict[str, int] = {}
    size = await f.seek(0, os.SEEK_END)
    if size:
        await f.seek(size - 1)
    torn = size > 0 and await f.read(1) != b"\n"
    await f.seek(0)
    end, number = 0, 0  # where the line read last ends, its newline included
    async for line in read_lines(f.read):
        start, end, number = end, end + len(line) + 1, number + 1
        if torn and end > size and (line.startswith(ID_PREFIX) or not strict):
            return done, start
        try:
            item = recorded_input(line, strict=strict)
        except ValueError:
            if strict:
                raise UsageError(
                    f"{path} holds lines that batcher.py did not write (line {number}): use another --output, "
                    "or move the file"
                ) from None
            log.warning("%s: skipping an unreadable line: %.60r", path, line)
        else:
            done[item.id] = input_hash(item)
    return done, None


async def open_ledger(path: Path, config: Config, *, dry_run: bool = False) -> Ledger:
    """What the output file holds, once it is known to be ours and made with these settings (else
    UsageError, and nothing is changed); then, unless dry_run, cuts a torn last line, writes the
    manifest and removes job files that no recorded job names (a kill between writing and
    recording, say)."""
    manifest = await asyncio.to_thread(read_manifest, path)
    recorded, settings = (manifest or {}).get("settings", {}), config.recorded()
    if config.batch_cancel and manifest is not None:
        settings = recorded  # a cancel makes no record: the records' settings stay, whatever the flags
    written = (manifest or {"written_by": "batcher.py"}) | {"settings": settings}
    ledger = Ledger(path, written, manifest_created=manifest is None and not dry_run)
    ledger.live = [Job(**job) for job in written.get("jobs", [])]
    async with open_file(path, "rb" if dry_run else "rb+") as f:
        ledger.done, cut = await scan_output(f, path, strict=manifest is None)  # no manifest: every line ours
        if manifest is not None and (ledger.done or ledger.live):  # records or live jobs: their settings stay
            for name, value in settings.items():
                if (old := recorded.get(name)) != value:
                    setting = "normalization (--no-normalize)" if name == "normalize" else f"--{name.replace('_', '-')}"
                    raise UsageError(
                        f"{setting} was {shown(old)} for the records in {path}, now {shown(value)}: use a new "
                        "--output, or the same setting"
                    )
        if cut is not None and not dry_run:
            log.warning("%s: cutting off a torn last line (%d bytes)", path, await f.seek(0, os.SEEK_END) - cut)
            await f.truncate(cut)
        ledger.size = await f.seek(0, os.SEEK_END)
    await asyncio.to_thread(read_jobs, ledger, tidy=not dry_run)
    if not dry_run:
        await asyncio.to_thread(write_manifest, path, written)
    return ledger


def read_jobs(ledger: Ledger, *, tidy: bool) -> None:
    """Notes in the ledger the texts waiting in its live jobs, and numbers new job files after the
    folder's; with tidy, removes the files that no recorded job names."""
    for job in ledger.live:
        with ledger.path_of(job).open("rb") as f:
            for row in map(json.loads, f):
                ledger.queued[row["id"]] = Input(row["id"], row["text"], row["title"])
    named = {ledger.path_of(job).name.split(".")[0] for job in ledger.live}
    if tidy:
        for orphan in (p for p in ledger.folder.glob("job_*") if p.name.split(".")[0] not in named):
            orphan.unlink()
    numbers = [int(m.group(1)) for p in ledger.folder.glob("job_*") if (m := JOB_RE.match(p.name))]
    ledger.job_numbers = itertools.count(max(numbers, default=0) + 1)


def embedded_input(path: Path, item_id: str) -> Input:
    """The record of item_id in the output file (for a message: it reads the file)."""
    with path.open("rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                if (found := recorded_input(line, strict=False)).id == item_id:
                    return found
    raise AssertionError(f"no record of {item_id}")


STDIN = Path("-")
JSONL_SUFFIXES = (".jsonl", ".ndjson")  # an --input with one of these (any case) holds JSONL rows


def parse_line(
    raw: bytes, line_id: str, name: str, *, jsonl: bool, seen: set[str]
) -> tuple[Input, ItemFailed | None] | None:
    """The Input of one line read (None: a blank line), and the error that fails it, if any (not
    UTF-8, a bad row): then its id is line_id, "<file name>:<line number>"."""
    try:
        text = raw.decode().strip()
    except UnicodeDecodeError as exc:
        error = ItemFailed(f"undecodable UTF-8: {exc}")
        return Input(line_id, raw.decode(errors="backslashreplace").strip()), error
    if not text or (not text.isprintable() and is_blank(text)):
        return None
    if not jsonl:
        return Input(line_id, text), None
    try:
        return parse_row(text, line_id, name, seen), None
    except (ValueError, RecursionError) as exc:
        return Input(line_id, text), ItemFailed(f"bad JSONL row: {exc}")


def parse_row(line: str, line_id: str, name: str, seen: set[str]) -> Input:
    """A JSONL row, {"text": ..., "id"?: ..., "title"?: ..., ...}: every other field is its
    metadata. With no "id", the id is line_id. An id in `seen` (the run's ids so far) is a
    duplicate; a new one is added. An id "<name>:<number>" (this file's) belongs to that line, so
    no row may take it. Raises ValueError (RecursionError: nested too deep) naming what is wrong."""
    row = STRICT_DECODER.decode(line)
    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object: {shown(row)}")
    if nested_deeper(row, MAX_NESTING):  # it could not be written back (json.dumps recurses)
        raise ValueError(f"nested deeper than {MAX_NESTING} levels")
    if LONE_SURROGATE.search(line) and not encodable(row):  # "\ud800": valid JSON, but no character
        raise ValueError("a lone surrogate escape (\\ud800 to \\udfff alone is no character): not UTF-8")
    text, row_id, title = row.pop("text", None), row.pop("id", line_id), row.pop("title", None)
    if not isinstance(text, str) or is_blank(text):
        raise ValueError('"text" must be a non-empty string')
    if not isinstance(title, str | None):
        raise ValueError(f'"title" must be a string, got {shown(title)}')
    if not (isinstance(row_id, str) and row_id):
        raise ValueError(f'"id" must be a non-empty string, got {shown(row_id)}')
    if row_id in seen:
        raise ValueError(f"duplicate id {shown(row_id)}: this row is not embedded")
    row_name, _, row_number = row_id.rpartition(":")
    if row_id != line_id and row_name == name and row_number.isdigit():
        raise ValueError(f"id {shown(row_id)} is the id of line {row_number}: give this row another id")
    seen.add(row_id)
    return Input(row_id, text.strip(), title, row or None)


# ======================================================================================================================
# Runtime shared by both scripts. batcher.py and pipeline.py hold this section byte for byte (a test
# compares them), as the two clients of an HTTP library mirror each other: what differs stays outside.
# Each script names itself in PROG, above.
# ======================================================================================================================
TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})
VERTEX_AI_SWITCHES = ("GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE")  # the SDK's own
MAX_BACKOFF_S = 30.0  # the longest sleep between two attempts, before jitter
CLEAR_LINE = "\r\x1b[K"  # back to the line's start, and erase it: where the progress line was
PROGRESS_EVERY_S = 30.0  # off a terminal (nohup, CI logs), a plain progress line this often
GRACE_S = 5.0  # after Ctrl-C or SIGTERM, calls in flight get this long before they are abandoned
JOB_RE = re.compile(r"job_(\d+)")  # a --batch-api job's files: job_00001.jsonl, ...
# A job holds at most this many bytes of requests: far under Google's 2 GB per input file, and its
# items are read into memory when it is collected.
JOB_BYTES = 256 << 20
WRITE_EVERY = 1000  # items held before a job's files are appended to
Item = TypeVar("Item")  # what a script's stages carry: the batcher's Input, the pipeline's Prompt
ItemIn = TypeVar("ItemIn", contravariant=True)
JOB_ENDED = frozenset(
    {"JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
     "JOB_STATE_EXPIRED"}
)  # fmt: skip
JOB_DONE = ("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED")  # ended with results to collect
NOT_CREATED = "NOT_CREATED"  # a job recorded before its create, which the API does not list: never made
CHUNK_BYTES = 1 << 20  # files are read this much at a time, not a line at a time
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark that Windows editors put first
BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})  # spaces, controls, format characters
MAX_NESTING = 100  # a JSONL row nested deeper fails alone (json.dumps recurses: 990 levels fail on 3.11)


class UsageError(Exception):
    """Bad flags or bad input: reported in one line, exit status 2."""


class Said(Exception):
    """An error of ours whose message says it all: describe() shows it without its type."""


class MalformedReply(Said):
    """A reply we cannot use (not JSON, the wrong shape, the wrong count): retried like a 503."""


class ItemFailed(Said):
    """One item that no retry can help (a blocked answer, a bad input line): it fails alone."""


class Stopped(Said):
    """An attempt not made because the run is stopping: its items are left for the next run."""


def is_transient(exc: BaseException) -> bool:
    """429, 408 and 5xx API errors, timeouts, connection errors and malformed replies are
    worth another try."""
    if isinstance(exc, errors.APIError):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, (OSError, TimeoutError, MalformedReply)):
        return True
    # httpx / httpx2 / aiohttp connection errors, matched by name so no transport is imported.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "ClientConnectionError"})


async def bounded(call: Awaitable[T], timeout_s: float) -> T:
    """Awaits one API attempt for at most timeout_s, whatever stalls: the HTTP call, a proxy,
    a fake. A timeout of ours or of the HTTP client's raises TimeoutError("timed out after N s")."""
    try:
        async with asyncio.timeout(timeout_s):
            return await call
    except Exception as exc:
        if isinstance(exc, TimeoutError) or "TimeoutException" in {cls.__name__ for cls in type(exc).__mro__}:
            raise TimeoutError(f"timed out after {timeout_s:g} s") from exc
        raise


def error_details(exc: errors.APIError) -> list[dict[str, Any]]:
    """The google.rpc details of an API error (RetryInfo, ErrorInfo, ...)."""
    body = exc.details.get("error", exc.details) if isinstance(exc.details, dict) else None
    details = body.get("details") if isinstance(body, dict) else None
    return [detail for detail in details if isinstance(detail, dict)] if isinstance(details, list) else []


def is_request_wide(exc: BaseException) -> bool:
    """An error about the request as a whole (a bad key, no access, an unknown model), not
    about one item: every other call would fail alike, so the run stops."""
    if not isinstance(exc, errors.APIError):
        return False
    if exc.code in (401, 403, 404):
        return True
    reasons = {str(detail.get("reason")) for detail in error_details(exc) if "ErrorInfo" in str(detail.get("@type"))}
    return exc.code == 400 and bool(reasons & {"API_KEY_INVALID", "API_KEY_EXPIRED"})


def daily_quota(exc: BaseException) -> str | None:
    """The quota id of a 429 whose google.rpc.QuotaFailure names a per-day quota, or a quota of 0:
    retrying cannot help before it resets (the RetryInfo delay only says when to ask again)."""
    if not isinstance(exc, errors.APIError) or exc.code != 429:
        return None
    for detail in error_details(exc):
        violations = detail.get("violations") if "QuotaFailure" in str(detail.get("@type")) else None
        for violation in violations if isinstance(violations, list) else []:
            quota_id = str(violation.get("quotaId", "")) if isinstance(violation, dict) else ""
            if "PerDay" in quota_id or str(violation.get("quotaValue")) == "0":
                return quota_id or "a quota of 0"
    return None


def stop_reason(exc: BaseException, model: str) -> str | None:
    """Why exc stops the whole run (every other call would fail alike), or None."""
    if is_auth_error(exc):  # Vertex AI: credentials missing or refused
        return f"no usable credentials for Vertex AI ({type(exc).__name__}): {exc}"
    if (quota := daily_quota(exc)) is not None:
        return f"the daily quota for {model} is spent ({quota}): retrying cannot help before it resets"
    if is_request_wide(exc):
        return f"the API refused the request as a whole (key, access or model): {describe(exc)}"
    return None


def server_retry_delay_s(exc: BaseException) -> float | None:
    """The delay the server asked for: google.rpc.RetryInfo in the body, or Retry-After."""
    if not isinstance(exc, errors.APIError):
        return None
    for detail in error_details(exc):
        match = re.fullmatch(r"\s*([0-9.]+)s\s*", str(detail.get("retryDelay", "")))
        if str(detail.get("@type", "")).endswith("RetryInfo") and match:
            return float(match.group(1))
    headers = getattr(exc.response, "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: rare for this API; fall back to our own backoff
        return None


def is_unparsable_reply(exc: ValueError) -> bool:
    """Whether the SDK raised exc parsing a reply: a body that is not JSON, or JSON that does not
    fit the response type (pydantic's ValidationError, matched by name: no import needed)."""
    return bool({cls.__name__ for cls in type(exc).__mro__} & {"JSONDecodeError", "ValidationError"})


def describe(exc: BaseException) -> str:
    """One line naming an error: the API's code, status and message, or the type."""
    if isinstance(exc, errors.APIError):
        return f"{exc.code} {exc.status or ''}: {exc.message or ''}".strip()
    if isinstance(exc, (TimeoutError, Said)) and str(exc):
        return str(exc)  # "timed out after 60 s", "blocked: SAFETY", "response is not valid JSON"
    return f"{type(exc).__name__}: {exc}"


class Gate:
    """Where every call waits before it starts. A delay named by the server pauses all
    calls, not just the one told. With rpm, call starts are at least 60/rpm seconds apart
    across all calls; with tpm, a call starts only once the tokens of those before it are paid
    for at tpm, and then its own estimate is owed. No burst at the start, and no start is booked
    ahead: a waiting worker looks again whenever settle() corrects an estimate with the tokens the
    API reported, so a smaller answer than guessed lets the next call start at once.
    """

    def __init__(self, *, rpm: float | None, tpm: float | None) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be > 0, got {value}")
        self._call_gap_s = 60.0 / rpm if rpm else 0.0
        self._token_gap_s = 60.0 / tpm if tpm else 0.0
        self._next_call_at = 0.0  # loop time of the earliest next start, by rpm
        self._tokens_paid_at = 0.0  # loop time when the tokens owed are paid for, by tpm
        self._paused_until = 0.0
        self._moved = asyncio.Event()  # set (and replaced) when settle() moves _tokens_paid_at

    def pause(self, delay_s: float) -> None:
        self._paused_until = max(self._paused_until, asyncio.get_running_loop().time() + delay_s)

    async def wait_turn(self, tokens: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        # A loop, not one sleep: another worker may start first, pause everyone, or settle.
        while (start := max(self._paused_until, self._next_call_at, self._tokens_paid_at)) > loop.time():
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(start):
                    await moved.wait()
        now = loop.time()
        self._next_call_at = now + self._call_gap_s
        self._tokens_paid_at = now + tokens * self._token_gap_s

    def settle(self, estimated: float, used: float) -> None:
        """Corrects what is owed by the tokens a call used beyond its estimate (or fewer), and
        wakes the waiting workers to look again. What is owed never reaches into the past: no
        unused budget is saved up for a burst."""
        if self._token_gap_s and used != estimated:
            now = asyncio.get_running_loop().time()
            self._tokens_paid_at = max(now, self._tokens_paid_at) + (used - estimated) * self._token_gap_s
            self._tokens_paid_at = max(now, self._tokens_paid_at)
            self._moved.set()
            self._moved = asyncio.Event()


class Cost:
    """What a run's tokens cost in US dollars, and its budget. prices: dollars per 1M input and
    output tokens (--price; thinking tokens bill as output; embeddings bill input tokens only),
    None: not known. half_price names the tier that pays half of them ("Flex", "Batch API"), if
    any. Each call is admitted against max_usd (--max-cost) before it starts (see Retrier): only
    if what was spent, the estimates of the calls in flight and its own estimate stay within it."""

    def __init__(
        self, prices: tuple[float, ...] | None = None, *, half_price: str = "", max_usd: float | None = None
    ) -> None:
        self.prices, self.half_price, self.max_usd = prices, half_price, max_usd
        self.factor = 0.5 if half_price else 1.0
        self.spent_usd = self.held_usd = 0.0

    def of(self, input_tokens: float, output_tokens: float = 0.0) -> float:
        """The dollars of these tokens, at this run's prices and tier."""
        if self.prices is None:
            return 0.0
        output_price = self.prices[1] if len(self.prices) > 1 else 0.0  # embeddings: input only
        return (input_tokens * self.prices[0] + output_tokens * output_price) * self.factor / 1e6

    def admit(self, estimate_usd: float) -> str | None:
        """Holds a call's estimate while it runs (release it after), or says why it may not start.
        A call that costs nothing (a look at a Batch API job, a download) always may."""
        if estimate_usd and self.max_usd is not None and self.spent_usd + self.held_usd + estimate_usd > self.max_usd:
            held = f", {dollars(self.held_usd)} held by calls or jobs in flight" if self.held_usd else ""
            left = dollars(max(0.0, self.max_usd - self.spent_usd - self.held_usd))
            spent, next_usd = dollars(self.spent_usd), dollars(estimate_usd)
            return (
                f"the budget of {dollars(self.max_usd)} is reached: {spent} spent{held}, {left} left, and the next "
                f"call or job would cost about {next_usd}"
            )
        self.held_usd += estimate_usd
        return None

    def release(self, estimate_usd: float) -> None:
        self.held_usd = max(0.0, self.held_usd - estimate_usd)

    def pay(self, input_tokens: float, output_tokens: float = 0.0) -> None:
        """Counts the tokens of an answered call (or a Batch API result) as spent."""
        self.spent_usd += self.of(input_tokens, output_tokens)

    def progress(self) -> str:
        """What the progress line adds: the dollars spent so far, if known."""
        if self.prices is None:
            return ""
        return f", {dollars(self.spent_usd)} spent" + (f" ({self.half_price}: half price)" if self.half_price else "")

    def summary(self) -> str:
        """The summary's line on dollars: what was spent, or how to see it."""
        if self.prices is None:
            return "  cost: give --price (US dollars per 1M tokens, from Google's pricing page) to see it in dollars"
        tier = f" ({self.half_price}: half the given price)" if self.half_price else ""
        budget = f" of a budget of {dollars(self.max_usd)}" if self.max_usd is not None else ""
        return f"  cost: {dollars(self.spent_usd)}{budget} at --price {','.join(f'{p:g}' for p in self.prices)}{tier}"


class Tally(Generic[Item]):
    """--dry-run's stage in place of the calls: counts the items it takes, and their input tokens
    (estimated: tokens_of(item)), until the sentinel; then ends each queue in `ends` with one."""

    def __init__(self, tokens_of: Callable[[Item], float]) -> None:
        self.tokens_of, self.items, self.tokens = tokens_of, 0, 0.0

    async def run(self, queue: asyncio.Queue[Item | None], *ends: asyncio.Queue[Any]) -> None:
        while (item := await queue.get()) is not None:
            self.items, self.tokens = self.items + 1, self.tokens + self.tokens_of(item)
        for end in ends:
            await end.put(None)


def estimate(
    noun: str, *, sent: int, skipped: int, calls: int, input_tokens: float, output_tokens: float | None,
    config: Any, half_price: str,
) -> str:  # fmt: skip
    """What --dry-run prints: what the run would send, its tokens (input: characters / 4; output: a
    bound, when one is set), their dollars at each tier (with --price), and the time the quota
    (--rpm, --tpm) makes it take."""
    lines = [
        f"Dry run: {plural(sent, noun)} to send, {skipped} skipped (done, or waiting in a recorded Batch API job); "
        "nothing was called or written",
        f"  input tokens: about {input_tokens:,.0f} (characters / 4)"
        + ("" if output_tokens is None else f"; output tokens: at most {output_tokens:,.0f} (--max-output-tokens)"),
    ]
    if config.price is not None:
        full = Cost(config.price).of(input_tokens, output_tokens or 0)
        what = "" if output_tokens is not None or len(config.price) < 2 else ", the input only: no bound on output"
        lines.append(f"  cost: {dollars(full)} interactive, {dollars(full / 2)} {half_price} (half price){what}")
    if config.rpm or config.tpm:
        tokens = input_tokens + (output_tokens or 0)
        seconds = max(calls * 60 / (config.rpm or math.inf), tokens * 60 / (config.tpm or math.inf))
        lines.append(f"  the quota (--rpm, --tpm) makes it take at least {seconds:,.0f} s ({seconds / 3600:.1f} h)")
    return "\n".join(lines)


def dollars(usd: float) -> str:
    """$12.34; below a cent, two significant digits ($0.0042, $0.000051; 0.00999... is $0.01)."""
    if usd < 5e-7:  # (what is left of a budget may be a float's rounding error)
        return "$0.00"
    if (rounded := float(f"{usd:.2g}")) >= 0.01:
        return f"${usd:,.2f}"
    return f"${rounded:.{1 - math.floor(math.log10(rounded))}f}"


class Retrier:
    """Runs API calls with retries, and counts calls and retries.

    Each attempt is bounded by request_timeout_s, whatever stalls (the HTTP call, a proxy, a
    fake), and a timed-out attempt is transient. Transient errors are retried with exponential
    backoff and full jitter, up to max_attempts calls in all; others are raised at once. Every
    attempt first waits its turn at the Gate (rpm, tpm, and a delay named by the server), so a
    corpus job runs at its quota, not against it. Once `shutdown` is requested, no new attempt
    starts, and the one in flight (or waiting its turn) gets the shutdown's grace: call() raises
    Stopped (None: never, as in BatchedEmbedder, whose owner cancels it instead). before_retry,
    if given, runs before each retry; what it returns, if not None, is the call's outcome (a
    create whose outcome was unknown may have made the job: see create_job). An attempt whose
    estimate, cost_usd, would pass the budget (see Cost) is not made: the run stops.
    """

    def __init__(
        self, *, max_attempts: int = 5, request_timeout_s: float = REQUEST_TIMEOUT_S, rpm: float | None = None,
        tpm: float | None = None, base_delay_s: float = 0.5, shutdown: Shutdown | None = None, cost: Cost | None = None,
    ) -> None:  # fmt: skip
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if not (request_timeout_s > 0 and math.isfinite(request_timeout_s)):
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        self.max_attempts = max_attempts
        self.request_timeout_s = request_timeout_s
        self.base_delay_s = base_delay_s
        self.calls = self.retries = 0
        self.gate = Gate(rpm=rpm, tpm=tpm)
        self.cost = cost or Cost()
        self._shutdown = shutdown

    async def call(
        self, fn: Callable[[], Awaitable[T]], *, tokens: float = 0.0, cost_usd: float = 0.0,
        before_retry: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:  # fmt: skip
        shutdown = self._shutdown
        for attempt in range(1, self.max_attempts + 1):
            try:
                async with shutdown.abandonable() if shutdown else contextlib.nullcontext():
                    await self.gate.wait_turn(tokens)
                    if shutdown is not None and shutdown.requested:
                        raise Stopped("not sent: the run is stopping")
                    if (over := self.cost.admit(cost_usd)) is not None:
                        if shutdown is not None:
                            shutdown.fail(over)
                        raise Stopped(f"not sent: {over}")
                    self.calls += 1
                    try:
                        return await bounded(fn(), self.request_timeout_s)
                    finally:
                        self.cost.release(cost_usd)
            except Stopped:
                raise
            except Exception as exc:
                if shutdown is not None and shutdown.requested:  # abandoned, or failed meanwhile: left as is
                    raise Stopped("abandoned: the run is stopping") from exc
                if daily_quota(exc) is not None:
                    raise  # spent for today: neither a retry nor a pause can help
                if (delay_s := server_retry_delay_s(exc)) is not None:  # first: it holds every call, even
                    self.gate.pause(delay_s)  # after a last attempt
                if not is_transient(exc) or attempt == self.max_attempts:
                    raise
                backoff_s = min(MAX_BACKOFF_S, self.base_delay_s * 2 ** (attempt - 1))
                log.info("retrying after %s (attempt %d)", describe(exc), attempt)
                self.retries += 1
                if shutdown is not None and await shutdown.waited(random.uniform(0, backoff_s)):
                    raise Stopped("not retried: the run is stopping") from exc
                if shutdown is None:
                    await asyncio.sleep(random.uniform(0, backoff_s))
                if before_retry is not None and (outcome := await before_retry()) is not None:
                    return outcome
        raise AssertionError("unreachable")


class Shutdown:
    """The first Ctrl-C or SIGTERM: readers stop, workers take no new prompt, and calls still
    in flight get grace_s to finish before they are abandoned (the next run redoes them).
    Everything completed is still written; the exit status is 128 + the signal (130, 143).
    A second signal of either kind exits at once. fail() stops the run the same way for an
    error that concerns every call (a bad key): the exit status is then 2."""

    def __init__(self, *, grace_s: float = GRACE_S) -> None:
        self.signal: int | None = None
        self.failure: str | None = None
        self.requested = False  # either: an attribute, not a property, as the reader reads it per line
        self._grace_s = grace_s
        self._in_flight: set[asyncio.Timeout] = set()
        self._stopping = asyncio.Event()  # set with requested: a wait for a batch job ends at once

    def request(self, signum: int = signal.SIGINT) -> None:
        if self.signal is not None:
            sys.stdout.flush()
            os._exit(128 + signum)
        name = signal.Signals(signum).name
        log.warning("interrupted (%s): finishing calls in flight (Ctrl-C again to quit now)", name)
        self.signal, self.requested = signum, True
        self._stopping.set()
        self._end_in_flight()

    def fail(self, message: str) -> None:
        if self.failure is None:
            self.failure, self.requested = message, True
            self._stopping.set()
            self._end_in_flight()

    async def waited(self, timeout_s: float) -> bool:
        """Sleeps timeout_s, or less if the run stops meanwhile: returns whether it did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._stopping.wait()
        return self.requested

    def _end_in_flight(self) -> None:
        """What is in flight (a call, a backoff, a pause) gets grace_s, then is abandoned."""
        deadline = asyncio.get_running_loop().time() + self._grace_s
        for timeout in self._in_flight:
            timeout.reschedule(min(deadline, timeout.when() or math.inf))

    @contextlib.asynccontextmanager
    async def abandonable(self) -> AsyncIterator[None]:
        async with asyncio.timeout(None) as timeout:
            self._in_flight.add(timeout)
            if self.requested:  # begun after the signal: the same grace, from now
                timeout.reschedule(asyncio.get_running_loop().time() + self._grace_s)
            try:
                yield
            finally:
                self._in_flight.discard(timeout)


@contextlib.contextmanager
def signals_handled(shutdown: Shutdown) -> Iterator[None]:
    """SIGINT and SIGTERM call shutdown.request while the block runs (main thread only)."""
    signums = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    loop = asyncio.get_running_loop()
    for signum in signums:
        loop.add_signal_handler(signum, shutdown.request, signum)
    try:
        yield
    finally:
        for signum in signums:
            loop.remove_signal_handler(signum)


def end_of_run(
    summary: str, *, shutdown: Shutdown, file_errors: list[BaseException], live_jobs: int, failed: bool
) -> int:
    """The one place a run ends: prints its summary, then a line for each reason it stopped (on
    stderr), and returns the exit status: 1 a disk or file error (what was written stays valid),
    2 an error about every request, 128 + the signal when interrupted, else 1 if an item failed."""
    print(summary)
    for fault in file_errors:  # one line each, naming the file
        print(f"{PROG}.py: error: {fault}", file=sys.stderr)
    if file_errors:
        return 1
    if shutdown.failure is not None:
        print(f"{PROG}.py: error: {shutdown.failure}; what is not done is left for the next run", file=sys.stderr)
        return 2
    if live_jobs:
        print(f"{PROG}.py: {plural(live_jobs, 'Batch API job')} still running at Google: run the same command again "
              "to collect them (or --batch-cancel to stop them)", file=sys.stderr)  # fmt: skip
    if shutdown.signal is not None:
        return 128 + shutdown.signal
    return 1 if failed else 0


def plural(count: int, noun: str, nouns: str = "") -> str:
    """ "1 item", "2 items"; "1 retry", "0 retries"."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def shown(value: Any, width: int = 60) -> str:
    """A setting or a text in a message: JSON, cut to width characters."""
    text = "(none)" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


@contextlib.asynccontextmanager
async def open_file(path: Path, mode: Literal["rb", "rb+", "ab", "xb", "wb"]) -> AsyncIterator[Any]:
    """aiofiles.open, safe to cancel. aiofiles opens and closes the file in a worker thread, and
    a task cancelled while it waits loses the file: it never receives it, or its close, still
    queued for a thread, is dropped (a leaked descriptor, a ResourceWarning). So the open and
    the close always run to the end, and a cancellation that came meanwhile is raised after."""
    opening = asyncio.ensure_future(aiofiles.open(path, mode))
    if await waited_out(opening):  # cancelled: close what was opened, then stop
        if opening.exception() is None:
            await waited_out(asyncio.ensure_future(opening.result().close()))
        raise asyncio.CancelledError
    f = opening.result()
    try:
        yield f
    finally:
        closing = asyncio.ensure_future(f.close())
        if await waited_out(closing):
            raise asyncio.CancelledError from closing.exception()
        if isinstance(error := closing.exception(), OSError):  # a flush on a full disk, say: name the file
            raise OSError(error.errno, error.strerror, str(path)) from error
        closing.result()


async def waited_out(task: asyncio.Future[Any]) -> bool:
    """Waits for task to end even through cancellations (a worker thread cannot be stopped);
    returns whether we were cancelled meanwhile."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


async def append(f: Any, lines: list[str]) -> None:
    """Writes whole lines and flushes them: they reach the file before they count as done. A
    disk error names the file (the OS's error for a write does not)."""
    try:
        await f.write("".join(lines).encode())
        await f.flush()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, getattr(f, "name", None)) from exc


async def read_lines(read: Callable[[int], Awaitable[bytes]]) -> AsyncIterator[bytes]:
    """The lines of what read(n) returns, read CHUNK_BYTES at a time: one thread hop per chunk,
    not per line. A line ends with "\n", "\r\n" or a lone "\r" (old Mac files), which is not part
    of it. A leading UTF-8 BOM (Windows editors, Excel exports) is dropped."""
    tail, first = b"", True
    while chunk := await read(CHUNK_BYTES):
        data, first = tail + (chunk.removeprefix(BOM) if first else chunk), False
        held = data[-1:] if data.endswith(b"\r") else b""  # it may be half of "\r\n": keep it for later
        *lines, tail = newlines(data[: len(data) - len(held)]).split(b"\n")  # the last piece: a line's start
        tail += held
        for line in lines:
            yield line
    if tail:
        yield tail.removesuffix(b"\r")


def newlines(data: bytes) -> bytes:
    """data with "\r\n" and lone "\r" line ends made "\n" (a scan and no copy when it has none)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data


def is_blank(text: str) -> bool:
    """Whether text holds only spaces, line breaks, controls and format characters (U+200B, NUL,
    ...), which str.strip keeps: nothing to send."""
    return all(unicodedata.category(char) in BLANK_CATEGORIES for char in text)


def nested_deeper(value: Any, limit: int) -> bool:
    """Whether a JSON value nests deeper than limit levels (found without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        if children and level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # the escape that may be one half of a pair, or alone


def encodable(row: dict[str, Any]) -> bool:
    """Whether the row can be written as UTF-8 (json.loads takes escaped lone surrogates)."""
    try:
        json.dumps(row, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


STRICT_DECODER = json.JSONDecoder(parse_constant=refuse_constant)  # NaN, Infinity: not JSON


def make_client(
    *, offline: bool, fake_latency_s: float, fake_failure_rate: float = 0.0,
    request_timeout_s: float = REQUEST_TIMEOUT_S, connections: int = 20, batch_api: bool = False,
) -> Client:  # fmt: skip
    """genai.Client() when a key is set (it honours GOOGLE_GEMINI_BASE_URL) or Vertex AI is
    (GOOGLE_GENAI_USE_VERTEXAI=true: the SDK reads the project, location and credentials from the
    environment), else a simulation. The SDK's own retries are off (they ignore the server's retry
    delay; ours don't), and its timeout (none by default) is set, so a hung connection is closed,
    not just abandoned, and its keep-alive pool holds `connections` (the calls in flight; see
    keep_alive). Raises UsageError when the SDK cannot make a client (no credentials), or for
    batch_api (--batch-api, --batch-cancel) on Vertex AI, which has no Files API to take a job's file."""
    has_key = bool(os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY"))
    vertex = any(os.environ.get(name, "").lower() in ("true", "1") for name in VERTEX_AI_SWITCHES)
    if offline or not (has_key or vertex):
        return SimulatedClient(latency_s=fake_latency_s, failure_rate=fake_failure_rate)
    if vertex and batch_api:
        raise UsageError(
            "--batch-api and --batch-cancel use the Gemini Developer API's Batch API; Vertex AI batch jobs read "
            "Cloud Storage or BigQuery instead: set GEMINI_API_KEY without GOOGLE_GENAI_USE_VERTEXAI, or leave "
            "out --batch-api"
        )
    timeout_ms = math.ceil(request_timeout_s * 1000)
    options = types.HttpOptions(
        retry_options=types.HttpRetryOptions(attempts=1),
        timeout=timeout_ms,
        async_client_args=keep_alive(connections),
        api_version=None if vertex else api_version(),
    )
    try:
        return genai.Client(http_options=options)
    except Exception as exc:
        if not (isinstance(exc, ValueError) or is_auth_error(exc)):
            raise
        raise UsageError(f"cannot make the Gemini client: {exc}") from None


class ItemFiles(Protocol[ItemIn]):
    """A job being filled (each script's JobFiles): its items' file (path, kept until its
    outcomes are written) and its Batch API requests (requests_path, to upload)."""

    path: Path
    requests_path: Path
    count: int  # items
    size: int  # bytes of requests, about
    input_tokens: float  # estimated (characters / 4), for the budget
    output_tokens: float

    async def add(self, item: ItemIn) -> None: ...
    async def flush(self) -> None: ...


class JobKind(Protocol[Item]):
    """What BatchJobs needs to know of a script's items: a job's files, its create call, how an
    item is read back from its file, and where outcomes go (the stage's output queues)."""

    noun: str  # "text", "prompt": in messages

    def files(self, path: Path) -> ItemFiles[Item]: ...
    def create(self, file_name: str, display_name: str) -> Awaitable[types.BatchJob]: ...
    def item_of(self, row: dict[str, Any]) -> tuple[str, Item]: ...
    async def deliver(self, item: Item, row: dict[str, Any], job: Job) -> None: ...
    async def fail(self, item: Item, reason: str, job: Job) -> None: ...
    async def end(self) -> None: ...


class BatchJobs(Generic[Item]):
    """The --batch-api stage of either script: Google's Batch API at half price, behind the
    interactive stage's queue contract. It reads input_queue to its sentinel; outcomes go where
    kind.deliver and kind.fail put them, and kind.end ends those queues.

    Submit: items go out in jobs of up to config.batch_job_size (or JOB_BYTES of requests): a
    job's files are written, uploaded, the job created (create_job) and recorded in the ledger
    at once: it is billed. Wait: one look at every waiting job each config.poll_interval_s
    (look_at_job). Collect: its results are downloaded (download_results) and matched to the items
    by key, never by position; an item with no result fails. A job that ends FAILED, CANCELLED or
    EXPIRED, or whose results are gone, is resubmitted, up to config.max_attempts jobs for its
    items, which then fail with its state. Jobs an earlier run recorded are waited on too, and an
    item already in the output (ledger.done: a run killed after writing a job's outcomes, before
    the job left the ledger) is not delivered again. After a shutdown request nothing is submitted
    and waiting stops at once: the jobs go on at Google, and the next run collects them. A resubmit
    that does not happen (the run stops) leaves its items undone, for the next run to read again.
    A job whose estimate (its items' characters / 4, and the output expected) would pass the
    budget is not submitted: the run stops (see Cost)."""

    def __init__(self, run: Run, kind: JobKind[Item]) -> None:
        self.client, self.retrier, self.shutdown = run.client, run.retrier, run.shutdown
        self.ledger, self.kind = run.ledger, kind
        self.stats, self.job_size, self.max_attempts = run.stats, run.config.batch_job_size, run.config.max_attempts
        self.poll_interval_s, self.done = run.config.poll_interval_s, run.ledger.done
        self.waiting = list(run.ledger.live)  # jobs not ended yet, as far as we know: an earlier run's first
        self.estimates: dict[str, float] = {}  # the cost held for each job this run submitted, by its file
        self.submitted = asyncio.Event()  # set once no new item can come

    async def run(self, input_queue: asyncio.Queue[Item | None]) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.wait_and_collect())
            filling: ItemFiles[Item] | None = None
            while (item := await input_queue.get()) is not None:
                if self.shutdown.requested:
                    continue  # drain, so the readers and the sentinel get through
                filling = filling or self.kind.files(self.ledger.new_path())
                await filling.add(item)
                if filling.count == self.job_size or filling.size >= JOB_BYTES:
                    await self.submit(filling, 1)
                    filling = None
            if filling is not None:
                await self.submit(filling, 1)
            self.submitted.set()
        await self.kind.end()

    async def submit(self, files: ItemFiles[Item], attempt: int, replacing: Job | None = None) -> None:
        """Uploads and creates the job of `files`, records it and waits on it. If the run stops
        before the create, or the upload is refused, its files go (nothing names them). From the
        create on, the job is recorded by its display name alone until the API names it: a kill, a
        stop or an error meanwhile leaves a job that may exist, which the next run looks for
        (settle) instead of paying for its items twice."""
        await files.flush()
        display_name = f"{PROG}.py {self.ledger.label} {files.path.stem} {time.time_ns()}"  # unique: see create_job
        pending: Job | None = None
        estimate = self.retrier.cost.of(files.input_tokens, files.output_tokens)
        try:  # retried as any call is: transient errors, a server's delay; Stopped: the run stops
            if self.shutdown.requested:
                raise Stopped("not sent: the run is stopping")
            if (over := self.retrier.cost.admit(estimate)) is not None:  # held until the job ends
                self.shutdown.fail(over)
                raise Stopped(f"not sent: {over}")
            self.estimates[files.path.name] = estimate
            upload_config = types.UploadFileConfig(mime_type="jsonl", display_name=files.path.name)
            uploaded = await self.retrier.call(
                lambda: self.client.aio.files.upload(file=files.requests_path, config=upload_config)
            )
            pending = self.ledger.job("", files.path, attempt, display_name)
            await self.ledger.record(pending, replacing=replacing)
            create = functools.partial(self.kind.create, str(uploaded.name), display_name)
            created = await create_job(self.retrier, self.client, create, display_name)
        except Exception as exc:
            if pending is None:
                await asyncio.to_thread(files.path.unlink, missing_ok=True)
            if isinstance(exc, Stopped):
                return
            if not (is_transient(exc) or isinstance(exc, errors.APIError) or is_auth_error(exc)):
                raise
            self.shutdown.fail(f"the Batch API refused a job: {describe(exc)}")
            return
        finally:
            await asyncio.to_thread(files.requests_path.unlink, missing_ok=True)  # what stays: the items' file
        job = self.ledger.job(str(created.name), files.path, attempt, display_name)
        await self.ledger.record(job, replacing=pending)  # before anything else: it is billed
        self.stats.batch_jobs += 1
        log.info("batch job %s created: %s (attempt %d)", job.name, plural(files.count, self.kind.noun), attempt)
        self.waiting.append(job)

    async def wait_and_collect(self) -> None:
        """One look at every job waiting, each poll interval: an ended job is collected, or its
        items resubmitted (or failed), one job at a time. Ends when nothing is waiting and no job
        can come any more (submitting is over), or at once on a shutdown request."""
        while self.waiting or not self.submitted.is_set():
            for job in list(self.waiting):
                if (ended := await self.look_at(job)) is None:
                    continue
                items = await self.read_items(job)
                state = ended if isinstance(ended, str) else ended.state.value if ended.state else ""
                if isinstance(ended, types.BatchJob) and state in JOB_DONE:
                    if (collected := await self.collect(job, ended, items)) is False:
                        continue  # looked at again next time, or the run stops
                    if collected is not True:  # its results are gone: as a job that ended undone
                        log.warning("batch job %s: %s; its %ss are sent again", job.name, collected, self.kind.noun)
                        state = collected
                self.waiting.remove(job)
                self.retrier.cost.release(self.estimates.pop(self.ledger.path_of(job).name, 0.0))
                if state in JOB_DONE:
                    pass
                elif items and (state == NOT_CREATED or job.attempt < self.max_attempts):
                    files = self.kind.files(self.ledger.new_path())
                    for item in items.values():
                        await files.add(item)
                    again = job.attempt if state == NOT_CREATED else job.attempt + 1  # a job never made: no attempt
                    await self.submit(files, again, replacing=job)
                else:
                    reason = f"batch job {job.name} ended {state.removeprefix('JOB_STATE_')} (attempt {job.attempt})"
                    for item in items.values():
                        await self.kind.fail(item, reason, job)
                self.ledger.collected.append(job)  # its file goes at the end of the run
                if self.shutdown.requested:
                    return
            if await self.shutdown.waited(self.poll_interval_s if self.waiting else 0.05):
                return  # the jobs go on at Google: the next run collects them

    async def look_at(self, job: Job) -> types.BatchJob | str | None:
        """The job once it has ended (or why the API does not know it); else None."""
        if not job.name:
            return await self.settle(job)
        batch_job = await look_at_job(self.retrier, self.client, job.name, self.shutdown)
        if not isinstance(batch_job, types.BatchJob):
            return batch_job
        self.ledger.states[job.name] = state = batch_job.state.value if batch_job.state else "JOB_STATE_UNSPECIFIED"
        return batch_job if state in JOB_ENDED else None

    async def settle(self, job: Job) -> str | None:
        """A job recorded before its create returned: the job of its display name, if the create
        made it, is recorded and waited on (None); if not, NOT_CREATED, and its items are sent."""
        try:
            found = await find_job(self.retrier, self.client, job.display_name)
        except Exception as exc:
            if not (isinstance(exc, Stopped) or is_transient(exc)):
                if not (isinstance(exc, errors.APIError) or is_auth_error(exc)):
                    raise
                self.shutdown.fail(f"cannot list the batch jobs ({describe(exc)}); {job.display_name} stays recorded")
            return None  # looked for again next time, or the run stops
        if found is None:
            return NOT_CREATED
        named = self.ledger.job(str(found.name), self.ledger.path_of(job), job.attempt, job.display_name)
        await self.ledger.record(named, replacing=job)
        self.waiting[self.waiting.index(job)] = named
        return None

    async def read_items(self, job: Job) -> dict[str, Item]:
        """A job's items by id, but those already done."""
        items: dict[str, Item] = {}
        async with open_file(self.ledger.path_of(job), "rb") as f:
            async for line in read_lines(f.read):
                item_id, item = self.kind.item_of(STRICT_DECODER.decode(line.decode()))
                if item_id not in self.done:
                    items[item_id] = item
        return items

    async def collect(self, job: Job, batch_job: types.BatchJob, items: dict[str, Item]) -> bool | str:
        """The job's outcomes delivered: True; or why not (see download_results)."""
        job_path = self.ledger.path_of(job)
        path = job_path.with_suffix(".results.jsonl")
        downloaded = await download_results(self.retrier, self.client, batch_job, path, self.shutdown)
        if downloaded is not True:
            return downloaded
        cost, job_file = self.retrier.cost, job_path.name  # its estimate: self.estimates[job_file]
        async with open_file(path, "rb") as f:
            async for line in read_lines(f.read):
                row = STRICT_DECODER.decode(line.decode())
                if (item := items.pop(row.get("key"), None)) is not None:  # else not ours, or seen already
                    spent_usd = cost.spent_usd
                    await self.kind.deliver(item, row, job)
                    # What its result cost is spent now, so the job's hold shrinks by as much: a budget
                    # never counts the job's dollars twice.
                    if (paid := min(self.estimates.get(job_file, 0.0), cost.spent_usd - spent_usd)) > 0:
                        self.estimates[job_file] -= paid
                        cost.release(paid)
        for item in items.values():
            await self.kind.fail(item, f"no result for this {self.kind.noun} in batch job {job.name}", job)
        await asyncio.to_thread(path.unlink)
        return True


async def create_job(
    retrier: Retrier, client: Client, create: Callable[[], Awaitable[types.BatchJob]], display_name: str
) -> types.BatchJob:
    """A Batch API job made by `create` (which names it display_name, unique to this job), through
    the retrier. A create is not idempotent and every job is billed: after an attempt whose outcome
    is unknown (a timeout, a 5xx, a dropped connection) the job may exist, so before trying again
    the jobs are listed and one of that name is adopted. The Developer API refuses a list filter
    (the SDK raises ValueError): the names are matched here (find_job)."""
    return await retrier.call(create, before_retry=functools.partial(find_job, retrier, client, display_name))


async def find_job(retrier: Retrier, client: Client, display_name: str) -> types.BatchJob | None:
    """The batch job of this display name, if the API lists one (a create whose answer was lost)."""
    pager = await retrier.call(lambda: client.aio.batches.list(config={"page_size": 100}))
    job: types.BatchJob
    async for job in pager:
        if job.display_name == display_name:
            log.warning("batch job %s was created after all (its answer was lost): adopted", job.name)
            return job
    return None


async def look_at_job(retrier: Retrier, client: Client, name: str, shutdown: Shutdown) -> types.BatchJob | str | None:
    """The job `name` as the API has it now, or a reason if the API no longer knows it (404); None
    when it cannot be looked at now (transient errors: the next poll looks again; the
    run stopping). An error about the key, access or quota stops the run (shutdown.fail): the job
    is not gone, it stays recorded, and a re-run collects it."""
    try:
        job: types.BatchJob = await retrier.call(lambda: client.aio.batches.get(name=name))
    except Stopped:
        return None
    except Exception as exc:
        if isinstance(exc, errors.APIError) and exc.code == 404:
            return f"UNKNOWN to the API ({describe(exc)})"
        if is_transient(exc):
            log.info("batch job %s: looking again after %s", name, describe(exc))
            return None
        if not (isinstance(exc, errors.APIError) or is_auth_error(exc)):
            raise
        shutdown.fail(f"cannot look at batch job {name} ({describe(exc)}); it stays recorded for the next run")
        return None
    return job


async def download_results(
    retrier: Retrier, client: Client, job: types.BatchJob, path: Path, shutdown: Shutdown
) -> bool | str:
    """Downloads the results of an ended job into path (through aiofiles; each attempt from the
    start), retried as any call: True once there. A results file gone for good (404) gives the
    reason, for the caller to treat the job as ended undone; other failures leave no file behind,
    and False (the job stays waiting; an error about the key stops the run, as in ended_job)."""
    file_name = job.dest.file_name if job.dest and job.dest.file_name else ""

    async def download() -> None:
        async with open_file(path, "wb") as f:  # the SDK writes each downloaded chunk through f.write
            await client.aio.files.download(file=file_name, destination=f)

    try:
        await retrier.call(download)
        return True
    except Exception as exc:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        if isinstance(exc, errors.APIError) and exc.code == 404:
            return f"its results file is gone ({describe(exc)})"
        if isinstance(exc, Stopped) or is_transient(exc):
            return False
        if not (isinstance(exc, errors.APIError) or is_auth_error(exc)):
            raise
        shutdown.fail(f"cannot download the results of batch job {job.name} ({describe(exc)}); it stays recorded")
        return False


async def cancel_jobs(run: Run) -> int:
    """--batch-cancel: cancels every job the ledger records (through the retrier, as every call) and
    forgets it; its items go in the next run. A job that cannot be reached now stays recorded: exit 1."""
    client, retrier, ledger = run.client, run.retrier, run.ledger
    for job in list(ledger.live):
        try:
            found = None if job.name else await find_job(retrier, client, job.display_name)  # recorded before create
            if not (name := job.name or (str(found.name) if found else "")):
                print(f"{job.display_name}: never created; forgotten")
            else:
                await retrier.call(functools.partial(client.aio.batches.cancel, name=name))
                print(f"cancelled {name}")
        except Stopped:
            break
        except Exception as exc:
            shown_name = job.name or job.display_name
            # A fault, or the key refused: the job may run on, so it stays recorded (forgotten, its items
            # would go in the next run while it still runs, and be paid for twice).
            if is_transient(exc) or is_auth_error(exc) or (isinstance(exc, errors.APIError) and exc.code in (401, 403)):
                print(f"{shown_name}: {describe(exc)}; still recorded: run with --batch-cancel again")
                continue
            if not isinstance(exc, errors.APIError):
                raise
            print(f"{shown_name}: {describe(exc)}; forgotten")  # gone, or ended already: forgotten all the same
        ledger.collected.append(job)
    ended = len(ledger.collected)
    await ledger.drop_collected()
    summary = f"Summary: {plural(ended, 'Batch API job')} cancelled or forgotten, {len(ledger.live)} still recorded"
    return end_of_run(summary, shutdown=run.shutdown, file_errors=[], live_jobs=0, failed=bool(ledger.live))


def api_version() -> str:
    """The Developer API's version: v1beta, unless GOOGLE_GENAI_API_VERSION says otherwise ("beta"
    is the SDK's name for v1beta). google-genai 3 sends v1 by default, where the -latest aliases,
    the Files API and the Batch API do not exist (its release notes; a 404 on the first call)."""
    chosen = os.environ.get("GOOGLE_GENAI_API_VERSION", "").strip()
    return "v1beta" if chosen in ("", "beta") else chosen


def keep_alive(connections: int) -> dict[str, Any]:
    """HttpOptions.async_client_args that keep `connections` idle connections open. The SDK's
    httpx and httpx2 clients keep 20: with more calls in flight, every pause (a 429's delay)
    closes the rest, and they reopen together, a TLS handshake each. The Limits come from the
    client the SDK will pick (GOOGLE_GENAI_HTTP_CLIENT, else httpx2, else httpx: both are its
    dependencies). aiohttp, which the SDK prefers when installed, keeps every one anyway."""
    chosen = os.environ.get("GOOGLE_GENAI_HTTP_CLIENT", "").strip().lower()
    for module_name in [chosen] if chosen in ("httpx", "httpx2") else ["httpx2", "httpx"]:
        with contextlib.suppress(ImportError):
            limits = importlib.import_module(module_name).Limits
            return {"limits": limits(max_connections=None, max_keepalive_connections=connections)}
    return {}


def is_auth_error(exc: BaseException) -> bool:
    """google.auth's errors (no credentials found, a refresh refused), matched by name."""
    return "GoogleAuthError" in {cls.__name__ for cls in type(exc).__mro__}


def model_name(text: str) -> str:
    """An argparse type: a model name, not empty (an unset $MODEL gives '')."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a model name is required, got ''")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default after its help ("none": not set)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is argparse.SUPPRESS or "(default: " in (action.help or ""):
            return action.help or ""
        return f"{action.help} (default: {'none' if action.default is None else '%(default)s'})"


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on stderr. On a terminal, each first clears the progress line (redrawn within
    0.25 s), so a log line and the progress line never share a line."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream.isatty():
            self.stream.write(CLEAR_LINE)
        super().emit(record)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the problem, exit status 2 (argparse's default adds the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


class Number:
    """A setting's bounds, checked once: as an argparse type on a flag's text, and by Config
    (check_settings) on a value given to it directly. A finite int or float in low..high (> low
    with above=True)."""

    def __init__(self, kind: type[int] | type[float], low: float, high: float = math.inf, *, above: bool = False):
        self.kind, self.low, self.high, self.above = kind, low, high, above

    def __call__(self, text: str) -> Any:
        try:
            value = self.kind(text)
        except ValueError:
            expected = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (problem := self.problem(value, text)) is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    def problem(self, value: float, shown: str = "") -> str | None:
        low, high = self.low, self.high
        if not ((value > low if self.above else value >= low) and value <= high and math.isfinite(value)):
            bound = f"> {low:g}" if self.above else f"{low:g}..{high:g}" if high < math.inf else f">= {low:g}"
            return f"must be {bound}, got {shown or value}"
        return None


POSITIVE, COUNT = Number(float, 0, above=True), Number(int, 1)  # the bounds most settings have


def price(text: str) -> tuple[float, ...]:
    """An argparse type: --price IN[,OUT], US dollars per 1M tokens, each a number >= 0."""
    if len(parts := text.split(",")) > 2:
        raise argparse.ArgumentTypeError(f"expected IN[,OUT], dollars per 1M tokens, got {text!r}")
    return tuple(Number(float, 0)(part.strip()) for part in parts)


def flag(
    default: Any, help: str, *, parse: Callable[[str], Any] | None = None, metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:  # fmt: skip
    """A Config field that is also a command-line flag (see add_flags). parse turns the flag's
    text into the value, or refuses it (argparse.ArgumentTypeError); a Number is checked on a
    value given to Config too, as choices are."""
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar, "choices": choices})


def add_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """A flag for each field of `config` made with flag(): --NAME, the field's name with dashes and
    no unit suffix (request_timeout_s: --request-timeout, max_cost_usd: --max-cost); a field true by
    default is --no-NAME."""
    for setting in fields(config):
        if "help" not in (meta := setting.metadata):
            continue
        name = "--" + setting.name.removesuffix("_s").removesuffix("_usd").replace("_", "-")
        if isinstance(setting.default, bool):
            on = not setting.default
            parser.add_argument(name if on else name.replace("--", "--no-", 1), dest=setting.name,
                                action="store_true" if on else "store_false", help=meta["help"])  # fmt: skip
        else:
            parser.add_argument(name, dest=setting.name, type=meta["parse"], default=setting.default,
                                metavar=meta["metavar"], choices=meta["choices"], help=meta["help"])  # fmt: skip


def check_settings(config: Any) -> None:
    """Raises ValueError naming the first setting whose value its flag would refuse."""
    for setting in fields(config):
        if (value := getattr(config, setting.name)) is None:
            continue
        check, choices = setting.metadata.get("parse"), setting.metadata.get("choices")
        if isinstance(check, Number) and (problem := check.problem(value)) is not None:
            raise ValueError(f"{setting.name} {problem}")
        if choices and value not in choices:
            raise ValueError(f"{setting.name} must be one of {', '.join(choices)}, got {value!r}")


def config_from(config: Any, args: argparse.Namespace) -> Any:
    """The `config` (a Config) the flags describe; a setting that contradicts another is one line
    (UsageError)."""
    try:
        return config(
            **{setting.name: getattr(args, setting.name) for setting in fields(config) if setting.name in args}
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def exit_status(run: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """asyncio.run(run()), with bad input or flags (UsageError) as one line and exit status 2, and
    a disk or file error that stopped a stage as one line naming the file, exit status 1."""
    try:
        return asyncio.run(run())
    except UsageError as exc:
        print(f"{PROG}.py: error: {exc}", file=sys.stderr)
        return 2
    except ExceptionGroup as group:  # a stage failed; the TaskGroup stopped the others
        faults = leaf_exceptions(group)
        if not all(isinstance(fault, OSError) for fault in faults):
            raise  # a bug: the traceback is what helps
        for fault in faults:  # a disk or file error: say which, in one line
            print(f"{PROG}.py: error: {fault}", file=sys.stderr)
        return 1


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions in a (nested) exception group, or [exc]."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaf_exceptions(e)]
    return [exc]


# === End of the shared runtime ===

# === The offline simulation ===
SIMULATED_POLL_INTERVAL_S = 0.5
SIMULATED_JOB_S = 2.0


class SimulatedClient:
    """Stands in for genai.Client offline: client.aio.models.embed_content returns a
    real types.EmbedContentResponse with deterministic vectors after latency_s. With
    failure_rate, that share of calls fails with a transient 503."""

    def __init__(self, *, latency_s: float = 0.0, failure_rate: float = 0.0) -> None:
        self.latency_s, self.failure_rate = latency_s, failure_rate
        self.aio = self.models = self  # so client.aio.models.embed_content works as on genai.Client
        self.files = self.batches = SimulatedBatchAPI()  # client.aio.files.upload, .batches.create_embeddings, ...

    async def embed_content(
        self, *, model: str, contents: list[str | dict[str, Any]], config: types.EmbedContentConfig | None = None
    ) -> types.EmbedContentResponse:
        if len(contents) > MAX_BATCH_SIZE:
            message = f"* BatchEmbedContentsRequest.requests: at most {MAX_BATCH_SIZE} requests can be in one batch"
            raise errors.ClientError(400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})
        await asyncio.sleep(self.latency_s)
        if self.failure_rate and random.random() < self.failure_rate:
            raise errors.ServerError(503, {"error": {"code": 503, "message": "simulated", "status": "UNAVAILABLE"}})
        dimensions = (config.output_dimensionality if config else None) or FULL_SIZE
        vectors = [fake_vector(text_of(content), dimensions) for content in contents]
        return types.EmbedContentResponse(embeddings=[types.ContentEmbedding(values=vector) for vector in vectors])


class SimulatedBatchAPI:
    """The Batch API offline, as client.aio.files and client.aio.batches: upload keeps a copy of
    the requests in a folder of the system's temp dir, and a job, named after its creation time and
    that copy, succeeds SIMULATED_JOB_S later, so a re-run in another process finds it."""

    def __init__(self) -> None:
        self._store = Path(tempfile.gettempdir()) / "batcher-simulated-batch-api"

    async def upload(self, *, file: Path, config: Any = None) -> types.File:
        return await asyncio.to_thread(self._keep, Path(file))

    def _keep(self, path: Path) -> types.File:
        self._store.mkdir(exist_ok=True)
        for old in self._store.iterdir():  # those older than 48 hours go, as Google's do
            with contextlib.suppress(FileNotFoundError):
                if time.time() - old.stat().st_mtime > 48 * 3600:
                    old.unlink()
        with path.open("rb") as f:
            name = hashlib.file_digest(f, "sha256").hexdigest()[:32]
        shutil.copyfile(path, self._store / name)
        return types.File(name=f"files/{name}", mime_type="jsonl", size_bytes=path.stat().st_size)

    async def create_embeddings(self, *, model: str, src: dict[str, str], config: Any = None) -> types.BatchJob:
        name = f"batches/{time.time_ns()}-{src['file_name'].removeprefix('files/')}"
        return await asyncio.to_thread(self._create, name, config)

    def _create(self, name: str, config: dict[str, str] | None) -> types.BatchJob:
        """A job, kept as a file that holds its display name, for list."""
        display_name = (config or {}).get("display_name", "")
        (self._store / f"{name.removeprefix('batches/')}.job").write_text(display_name)
        return types.BatchJob(name=name, display_name=display_name, state=types.JobState.JOB_STATE_PENDING)

    async def list(self, *, config: Any = None) -> AsyncIterator[types.BatchJob]:
        """The jobs kept, as the SDK's pager gives them: `async for job in await batches.list()`."""
        kept = await asyncio.to_thread(lambda: [(p.stem, p.read_text()) for p in self._store.glob("*.job")])

        async def pager() -> AsyncIterator[types.BatchJob]:
            for name, display_name in kept:
                yield types.BatchJob(name=f"batches/{name}", display_name=display_name)

        return pager()

    async def get(self, *, name: str) -> types.BatchJob:
        created_ns, _, file_name = name.removeprefix("batches/").partition("-")
        if time.time_ns() - int(created_ns) < SIMULATED_JOB_S * 1e9:
            return types.BatchJob(name=name, state=types.JobState.JOB_STATE_RUNNING)
        dest = types.BatchJobDestination(file_name=f"files/{file_name}.results")
        return types.BatchJob(name=name, state=types.JobState.JOB_STATE_SUCCEEDED, dest=dest)

    async def cancel(self, *, name: str) -> None:
        pass  # the job is forgotten by the run that cancels it: no one looks at it again

    async def download(self, *, file: str, destination: Any) -> None:
        """Writes the results a chunk at a time, as the SDK does: the simulated vector of each text."""
        lines = []
        for line in (self._store / file.removeprefix("files/").removesuffix(".results")).open():
            row = json.loads(line)
            request = row["request"]
            vector = fake_vector(
                request["content"]["parts"][0]["text"], request.get("outputDimensionality") or FULL_SIZE
            )
            lines.append(json.dumps({"key": row["key"], "response": {"embedding": {"values": vector}}}) + "\n")
            if len(lines) == WRITE_EVERY:
                await destination.write("".join(lines).encode())
                lines = []
        await destination.write("".join(lines).encode())


_FAKE_RNG = random.Random(0)  # its own, so --seed and the vectors do not interact
_FAKE_VALUES = [round(_FAKE_RNG.uniform(-1, 1), 6) for _ in range(8192)]


def text_of(content: str | dict[str, Any]) -> str:
    """The text of one input as embed_call sends it: a string, or {"parts": [{"text"}]}."""
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content["parts"])


def fake_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic vector in [-1, 1] for a text: the same text, the same vector, every run.
    A slice of one fixed random sequence at an offset hashed from the text: cheap at any
    dimension, so benchmarks measure the batcher, not the fake."""
    start = zlib.crc32(text.encode()) % 4096
    values = _FAKE_VALUES[start : start + dimensions]
    while len(values) < dimensions:  # beyond 4096 dimensions: wrap around
        values += _FAKE_VALUES[: dimensions - len(values)]
    return values


# === The command line ===


def task_type(text: str) -> str:
    """An argparse type: one of TASK_NAMES, in any case."""
    if (name := text.strip().upper()) not in TASK_NAMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(TASK_NAMES)}, got {text!r}")
    return name


@dataclass(frozen=True, kw_only=True)
class Config:
    """The batcher's settings, one per command-line flag (make_parser builds them from these
    fields), each checked once, when made, naming the bad value."""

    input: Path | None = flag(None, "embed this file, one text per non-blank line ('-': stdin)", parse=Path,
                              metavar="PATH")  # fmt: skip
    input_format: Literal["auto", "text", "jsonl"] = flag(
        "auto", 'text, jsonl (rows {"text", "id"?, "title"?, ...}) or auto: jsonl for .jsonl and .ndjson',
        metavar="FORMAT", choices=("auto", "text", "jsonl"),
    )  # fmt: skip
    output: Path | None = flag(None, "append {id, text, embedding} JSONL here; a re-run resumes", parse=Path,
                               metavar="PATH")  # fmt: skip
    num_inputs: int = flag(100, "demo: inputs to enqueue", parse=Number(int, 0), metavar="N")
    batch_size: int = flag(8, "texts per call, 1..100", parse=Number(int, 1, MAX_BATCH_SIZE), metavar="N")
    timeout_s: float = flag(1.0, "from a batch's first item", parse=POSITIVE, metavar="SECONDS")
    input_delay_s: float = flag(0.3, "demo: the longest gap between inputs", parse=Number(float, 0), metavar="SECONDS")
    concurrency: int = flag(4, "API calls in flight", parse=COUNT, metavar="N")
    max_attempts: int = flag(5, "calls per batch, retries included", parse=COUNT, metavar="N")
    request_timeout_s: float = flag(REQUEST_TIMEOUT_S, "per attempt", parse=POSITIVE,
                                    metavar="SECONDS")  # fmt: skip
    rpm: float | None = flag(None, "cap on call starts per minute, evenly spaced", parse=POSITIVE,
                             metavar="N")  # fmt: skip
    tpm: float | None = flag(None, "cap on tokens per minute (characters / 4), call starts spaced",
                             parse=POSITIVE, metavar="N")  # fmt: skip
    dimensions: int | None = flag(None, f"output_dimensionality; none: the model's full size ({FULL_SIZE} for "
                                  f"gemini-embedding-001), or {DEMO_DIMENSIONS} in the demo", parse=COUNT,
                                  metavar="N")  # fmt: skip
    task_type: str | None = flag(None, f"what the vectors are for: {', '.join(TASK_NAMES)}", parse=task_type,
                                 metavar="TASK")  # fmt: skip
    normalize: bool = flag(True, "keep the API's vectors, not unit length")  # --no-normalize; see unit_vector
    model: str = flag("gemini-embedding-001", "embedding model", parse=model_name, metavar="NAME")
    batch_api: bool = flag(False, "with --input/--output: through Google's Batch API, half price, within 24 h; "
                           "a re-run resumes")  # fmt: skip
    batch_cancel: bool = flag(False, "cancel the Batch API jobs recorded for --output, and forget them")
    batch_job_size: int = flag(JOB_TEXTS, f"texts per Batch API job (and at most {JOB_BYTES >> 20} MiB of requests; "
                               "Google takes 2 GB)", parse=COUNT, metavar="N")  # fmt: skip
    poll_interval_s: float = flag(POLL_INTERVAL_S, f"between looks at Batch API jobs (offline, the default is "
                                  f"{SIMULATED_POLL_INTERVAL_S:g})", parse=POSITIVE,
                                  metavar="SECONDS")  # fmt: skip
    adaptive: bool = flag(
        False, "fit batches to arrivals: flush early when slow, grow up to 100 when calls fall behind"
    )
    offline: bool = flag(False, "use the simulated client even with a key")
    fake_latency_s: float = flag(0.2, "simulated API latency", parse=Number(float, 0), metavar="SECONDS")
    seed: int | None = flag(None, "random seed, for repeatable runs", parse=int, metavar="N")
    dry_run: bool = flag(False, "call nothing, write nothing: print what the run would send, its tokens and cost")
    price: tuple[float, ...] | None = flag(
        None, "US dollars per 1M input tokens, from Google's pricing page: the summary and progress line show "
        "the cost (embeddings bill input only; --batch-api pays half)", parse=price, metavar="USD",
    )  # fmt: skip
    max_cost_usd: float | None = flag(None, "stop before this run's cost would pass this many US dollars (needs "
                                      "--price)", parse=POSITIVE, metavar="USD")  # fmt: skip
    quiet: bool = flag(False, "only the summary and run-level problems")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.price is not None and len(self.price) != 1:
            raise ValueError("--price takes one number for embeddings: dollars per 1M input tokens (no output)")
        if self.dry_run and self.input is None:
            raise ValueError("--dry-run estimates a corpus: give --input (the demo is free)")
        if self.max_cost_usd is not None and self.price is None:
            raise ValueError("--max-cost needs --price: the cost is counted at that price")
        if self.batch_cancel and self.dry_run:
            raise ValueError("--dry-run and --batch-cancel cannot be used together: a dry run cancels nothing")
        self.embedding  # noqa: B018 (checks the model name and task type)

    @property
    def embedding(self) -> EmbedSettings:
        """What shapes the vectors. The demo prints them, so it asks for DEMO_DIMENSIONS unless told."""
        demo = DEMO_DIMENSIONS if self.input is None else None
        return EmbedSettings(self.model, self.dimensions or demo, self.normalize, self.task_type)

    @property
    def jsonl(self) -> bool:
        by_name = self.input is not None and self.input.suffix.lower() in JSONL_SUFFIXES
        return self.input_format == "jsonl" or (self.input_format == "auto" and by_name)

    def recorded(self) -> dict[str, Any]:
        """The settings that shape the records, kept in the manifest: a resumed run must use the
        same ones. Settings that only shape the run (batch size, concurrency, rpm, ...) are not here."""
        return {name: getattr(self.embedding, name) for name in ("model", "dimensions", "normalize", "task_type")}


def make_parser() -> argparse.ArgumentParser:
    """A flag for each Config field, its dest the field's name."""
    parser = _Parser(prog="batcher.py", description=__doc__, formatter_class=HelpFormatter)
    add_flags(parser, Config)
    return parser


def run_cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Other libraries stay at WARNING: an HTTP client's INFO lines could show request details. force:
    # each call logs to the stderr of its moment (a test may run several in one process).
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", handlers=[LineHandler()], force=True)
    log.setLevel(logging.WARNING if args.quiet or args.input is not None else logging.INFO)
    if args.seed is not None:
        random.seed(args.seed)

    async def run() -> int:
        shutdown = Shutdown()
        with signals_handled(shutdown):
            config = config_from(Config, args)
            client = make_client(
                offline=config.offline, fake_latency_s=config.fake_latency_s,
                request_timeout_s=config.request_timeout_s, connections=config.concurrency,
                batch_api=config.batch_api or config.batch_cancel,
            )  # fmt: skip
            if config.poll_interval_s == POLL_INTERVAL_S and isinstance(client, SimulatedClient):
                config = replace(config, poll_interval_s=SIMULATED_POLL_INTERVAL_S)
            try:
                return await main(config, client, shutdown=shutdown)
            finally:
                if isinstance(client, genai.Client):
                    await client.aio.aclose()  # the kept-alive connections

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(run_cli())
