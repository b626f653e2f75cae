"""A concurrent LLM data pipeline: prompts from sharded files, through Gemini, to sharded JSONL.

    ./make_inputs.sh && python pipeline.py        # offline: a simulated model, no key needed
    python pipeline.py --batch-api                # through the Batch API: half price, within 24 h
    GEMINI_API_KEY=... python pipeline.py         # the real API through genai.Client()
    python pipeline.py --price 0.5,3 --dry-run    # what it would send and cost; --max-cost caps a run
    python pipeline.py --help                     # every flag

The stages, in order, joined by bounded asyncio queues. Each stage ends its own output
queue with None sentinels, one per consumer:

    read_inputs (x readers) --> generate_content (x workers) --> write_outputs (x writers)
         | unreadable lines          | failed prompts
         +---------------------------+------------------------> write_errors

With --batch-api, stage 2 is BatchJobs instead: submit (jobs of prompts, to Google's Batch
API at half price), wait, collect; its jobs are recorded in outputs/manifest.json, so a re-run
waits on them instead of paying twice.

Inputs are *.txt files (one prompt per line) and *.jsonl files (one {"prompt": ...} object per
line, with an optional "id" and metadata). Every prompt ends exactly once in
outputs/shard_NNNNN.jsonl or outputs/errors.jsonl, even across crashes: a re-run skips the ids
already written and carries on where it stopped. outputs/manifest.json records the settings that
shaped the records; a re-run with other settings, or other prompts under done ids, is refused.

The file, in order: the document's stages and main(), which wires them; the modes (the Batch
API's GenerateJobs, --dry-run, the word-count pool); safe re-runs (the folder's Ledger: its
manifest, records and jobs; the input formats); the runtime shared byte for byte with batcher.py
(errors, Retrier, Gate and Cost, Shutdown, files, the client, the Batch API stage BatchJobs and
--batch-cancel, the flags); the offline simulation; the command line (Config: a field a flag).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Generic, Literal, NoReturn, Protocol, TypeAlias, TypeVar

import aiofiles
from google import genai
from google.genai import errors, types

PROG = "pipeline"  # in messages; the shared runtime (below) names the script by it
log = logging.getLogger(PROG)
MAX_WRITE_BATCH = 1000  # records a writer takes from its queue for one write + flush
# Records per shard by default. The document's demo uses 5; a real job of 100k prompts would then
# make 20,000 files (and fill a small disk's inodes), so thousands it is: --shard-size 5 shows it.
SHARD_SIZE = 2000
# The SDK sends requests with no timeout at all, so one unanswered call would hang a run. A long
# answer with thinking can take a few minutes: 300 s leaves room for that and still ends a hang.
REQUEST_TIMEOUT_S = 300.0
# Flex is half price, with best-effort latency: Google's guide warns that answers can take
# minutes, so its default is longer (a 503 when Google sheds the load is retried as ever).
FLEX_REQUEST_TIMEOUT_S = 900.0
SERVICE_TIERS = ("flex", "standard", "priority")  # types.ServiceTier, as the SDK has them
# --tpm's guess of an answer's tokens before any is seen: small, so no worker is held back for an
# answer nobody has seen yet (a 500-token guess spread 16 workers' first starts over 200 s at tpm
# 2400); the reported usage corrects it at once, and then the mean of the answers seen is used.
OUTPUT_TOKENS_GUESS = 20

T = TypeVar("T")
Client: TypeAlias = Any  # genai.Client or SimulatedClient: both have .aio.models.generate_content


# (id, text, metadata). The id is the JSONL line's "id", else "<file name>:<line number>",
# stable across runs. A plain tuple: the reader makes a million a second.
Prompt: TypeAlias = tuple[str, str, dict[str, Any] | None]


@dataclass(slots=True)
class Result:
    """One prompt's outcome. response is set on success (a parsed JSON value with
    --json-schema, else text), error on failure."""

    id: str
    prompt: str
    metadata: dict[str, Any] | None = None
    response: Any = None
    error: str | None = None
    attempts: int = 0
    usage: dict[str, int] | None = None
    finish_reason: str | None = None  # set when the answer stopped for another reason than STOP
    word_count: int | None = None
    model_version: str | None = None  # the model that answered: an alias (gemini-flash-latest) moves
    refused: bool = False  # failed with a permanent API error (not written: see FailingAlike)

    def json_line(self) -> str:
        record: dict[str, Any] = {"id": self.id, "prompt": self.prompt}
        if self.error is not None:
            record |= {"error": self.error, "attempts": self.attempts}
        else:
            record["response"] = self.response
            for name in ("usage", "finish_reason", "word_count", "model_version"):
                if (value := getattr(self, name)) is not None:
                    record[name] = value
        if self.metadata:
            record["metadata"] = self.metadata
        return json_line(record)


# === The document: the three stages, in its order, and main() ===

# --- Stage 1: the input readers ---


async def read_inputs(
    run: Run, files: list[Path], input_queue: asyncio.Queue[Prompt | None], error_queue: asyncio.Queue[Result | None],
    *, consumers: int,
) -> None:  # fmt: skip
    """Puts one Prompt per non-blank line of the files, config.readers tasks splitting the files.

    Prompts that the ledger says are done (or failed, for the same prompt) are passed over. A line
    that cannot be read (not UTF-8, a bad JSONL row, an id seen before) goes to error_queue as
    failed under its "<file>:<line>", so one id never gets two records. Stops early on a
    shutdown request. Ends input_queue with one sentinel per consumer (error_queue is ended by
    generate_content).
    """
    readers, ledger, stats, shutdown = run.config.readers, run.ledger, run.stats, run.shutdown
    seen: set[str] = set()  # the JSONL ids of this run, shared by the readers
    reserved = {path.name for path in files}  # "<name>:<line>" ids belong to these files' lines

    async def read_file(path: Path) -> None:
        async with contextlib.aclosing(read_prompts(path, seen=seen, reserved=reserved)) as blocks:  # type: ignore[type-var]
            async for prompts in blocks:
                for prompt_id, text, metadata, error in prompts:
                    stats.read += 1
                    if ledger.skips(prompt_id, text):
                        stats.skipped += 1
                        continue
                    if error is not None:
                        log.info("%s: %s", prompt_id, error)
                        await error_queue.put(Result(prompt_id, text, metadata, error=error))
                    else:
                        await input_queue.put((prompt_id, text, metadata))  # backpressure: wait for the workers
                    if shutdown.requested:  # it came while we waited: stop at this line, not at the block's end
                        return

    async def reader(paths: list[Path]) -> None:  # one reader: its files, one after another
        for path in paths:
            await read_file(path)

    async with asyncio.TaskGroup() as tg:
        for i in range(readers):
            tg.create_task(reader(files[i::readers]))
    for _ in range(consumers):
        await input_queue.put(None)


async def read_prompts(path: Path, *, seen: set[str], reserved: Collection[str]) -> AsyncIterator[Iterator[PromptLine]]:
    """The file's prompts (see parse_lines), one iterator per block of lines: the reader and the
    resume check read the inputs alike. Take each iterator to its end before the next. A JSONL
    file that is a JSON array is one bad line, not a bad line per element."""
    name, number, jsonl = path.name, 0, is_jsonl(path)
    async with contextlib.aclosing(read_blocks(path)) as blocks:  # type: ignore[type-var]
        async for block in blocks:
            # The whole block is decoded at once; a line at a time reads 18% slower (bench.py, reader).
            lines, bad = decode_lines(block, number + 1)
            if jsonl and not number and (first := next((line for line in lines if line.strip()), "")).startswith("["):
                error = "the file is a JSON array; JSONL needs one JSON object per line (the file is not run)"
                yield iter([(f"{name}:{lines.index(first) + 1}", first.strip(), None, error)])
                return
            # One pass a block, not a check a line (a regex search here took 2 ms per MiB; this 0.5).
            invisible = not block.isascii() or len(block.translate(None, INVISIBLE)) < len(block)
            yield parse_lines(
                name, lines, number + 1, bad, jsonl=jsonl, seen=seen, reserved=reserved, invisible=invisible
            )
            number += len(lines)


def input_files(input_dir: Path) -> list[Path]:
    """The .txt, .jsonl and .ndjson files of the input folder (any case), in name order. Hidden
    files (".#notes.txt" from Emacs, "._notes.txt" from macOS) are left out, and counted in a line."""
    paths = sorted(path for path in input_dir.iterdir() if path.suffix.lower() in INPUT_SUFFIXES and path.is_file())
    if hidden := sum(path.name.startswith(".") for path in paths):
        log.warning("skipping %d hidden file%s (names starting with '.')", hidden, "" if hidden == 1 else "s")
    return [path for path in paths if not path.name.startswith(".")]


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


# --- Stage 2: the content generators ---


async def generate_content(
    run: Run, input_queue: asyncio.Queue[Prompt | None], output_queue: asyncio.Queue[Result | None],
    error_queue: asyncio.Queue[Result | None], *, word_count_pool: Executor | None = None,
) -> None:  # fmt: skip
    """config.workers workers take prompts until their sentinel and put each Result on
    output_queue (successes) or error_queue (failures). After a shutdown request they take
    no new prompt: the rest is left for the next run. When the first 2 x workers answered calls
    all fail with one same API error, the run stops (see FailingAlike). Ends output_queue with
    one sentinel per writer, and error_queue with one, once every worker is done."""
    config, stats, shutdown = run.config, run.stats, run.shutdown
    generation = config.generation()  # built once, shared by every call
    alike = FailingAlike(2 * config.workers, shutdown=shutdown)

    async def worker() -> None:
        while (prompt := await input_queue.get()) is not None:
            if shutdown.requested:
                continue  # drain without calling, so the readers and the sentinel get through
            stats.in_flight += 1
            try:
                async with shutdown.abandonable():
                    result = await generate_one(run, prompt, generation)
            except (TimeoutError, Stopped):
                log.info("%s: abandoned as the run stops; the next run redoes it", prompt[0])
                continue
            finally:
                stats.in_flight -= 1
            if result is None:
                continue  # a request-wide error: left for the next run
            for failed in alike.take(result):
                await error_queue.put(failed)
            if result.error is not None:
                continue
            if word_count_pool is not None and isinstance(result.response, str):
                result.word_count = await count_words_in(word_count_pool, result.response)
            await output_queue.put(result)

    async with asyncio.TaskGroup() as tg:
        for _ in range(config.workers):
            tg.create_task(worker())
    for failed in alike.release():  # fewer failures than it takes to stop the run: recorded
        await error_queue.put(failed)
    for _ in range(config.writers):
        await output_queue.put(None)
    await error_queue.put(None)


async def generate_one(run: Run, prompt: Prompt, generation: types.GenerateContentConfig | None) -> Result | None:
    """Calls the model for one prompt through the run's Retrier (its attempts bounded, transient
    errors retried, the quota's gate waited on); failures come back as data. An error about the
    request as a whole (a bad key or model, a spent daily quota) calls shutdown.fail and returns
    None: the prompt is left for the next run, as on Stopped (the run stopping), which propagates."""
    client, config, retrier, stats, shutdown = run.client, run.config, run.retrier, run.stats, run.shutdown
    prompt_id, text, metadata = prompt
    # For --tpm and --max-cost: characters / 4 for the prompt, and the answer we expect (the mean seen
    # so far; before any, --max-output-tokens or a guess).
    expected = (stats.output_tokens + stats.thinking_tokens) / stats.answers if stats.answers else None
    expected = config.max_output_tokens or OUTPUT_TOKENS_GUESS if expected is None else expected
    input_tokens = config.input_tokens(text)
    estimate, cost_usd = input_tokens + expected, stats.cost.of(input_tokens, expected)
    attempts = 0

    async def attempt() -> Result:
        nonlocal attempts
        attempts, used = attempts + 1, 0
        stats.calls += 1
        try:
            try:
                response = await client.aio.models.generate_content(
                    model=config.model, contents=text, config=generation
                )
            except ValueError as exc:
                if not is_unparsable_reply(exc):
                    raise  # raised before sending ("model is required."): a fault of the call, not the reply
                raise MalformedReply(f"unreadable reply: {exc}") from exc
            usage = count_usage(response, stats)
            used = sum(usage.values()) if usage else 0
            answer, reason = read_answer(response, json_output=config.json_schema is not None)
            return Result(prompt_id, text, metadata, answer, attempts=attempts, usage=usage, finish_reason=reason,
                          model_version=response.model_version)  # fmt: skip
        finally:
            retrier.gate.settle(estimate, used)  # the tokens it used, not the guess: the next call may start

    try:
        return await retrier.call(attempt, tokens=estimate, cost_usd=cost_usd)
    except Stopped:
        raise
    except Exception as exc:
        if not (is_transient(exc) or isinstance(exc, (errors.APIError, ItemFailed)) or is_auth_error(exc)):
            raise  # a bug, not a fault of this prompt: let it surface
        if (reason := stop_reason(exc, config.model)) is not None:
            shutdown.fail(reason)
            return None
        refused = isinstance(exc, errors.APIError) and not is_transient(exc)
        return Result(prompt_id, text, metadata, error=describe(exc), attempts=attempts, refused=refused)
    finally:
        stats.retries += max(0, attempts - 1)


# --- Stage 3: the output writers ---


async def write_outputs(run: Run, output_queue: asyncio.Queue[Result | None], *, shard_numbers: Iterator[int]) -> None:
    """One writer: appends records to shards of at most config.shard_size lines until its sentinel.
    An id that failed in an earlier run (in ledger.failed) is noted in ledger.redone once written,
    so its error leaves errors.jsonl without reading the shards again.

    Each writer owns the shards it starts, numbered from the shared shard_numbers, and starts
    one only for a record (no shard is empty) with "xb" (it never overwrites a file). A shard
    stays open across batches: a batch costs one write and one flush, not an open and a close.
    """
    output_dir, shard_size, quiet = run.config.outputs, run.config.shard_size, run.config.quiet
    stats, ledger = run.stats, run.ledger
    async with contextlib.AsyncExitStack() as shard:
        f: Any = None
        path, lines_in_shard = output_dir, shard_size
        while True:
            results, ended = await take_available(output_queue)
            data: list[str] = []
            for result in results:
                if lines_in_shard == shard_size:  # the shard is full, or none is started: start one
                    if f is not None:
                        await append(f, data)
                        data = []
                        await shard.aclose()
                    path = output_dir / SHARD_NAME.format(next(shard_numbers))
                    f, lines_in_shard = await shard.enter_async_context(open_file(path, "xb")), 0
                data.append(result.json_line())
                lines_in_shard += 1
                if not quiet:
                    log.info("wrote %s to %s", result.id, path.name)
            if data:
                try:
                    await append(f, data)
                except OSError:  # a full disk: a shard that got nothing is not left behind
                    await asyncio.to_thread(remove_if_empty, path)
                    raise
            stats.succeeded += len(results)
            if ledger.failed:
                ledger.redone.update(result.id for result in results if result.id in ledger.failed)
            if ended:
                return


async def write_errors(run: Run, error_queue: asyncio.Queue[Result | None]) -> None:
    """The only task that writes errors.jsonl: appends one line per failed prompt."""
    stats = run.stats
    async with open_file(run.config.outputs / ERRORS_NAME, "ab") as f:
        while True:
            results, ended = await take_available(error_queue)
            if results:
                await append(f, [result.json_line() for result in results])
                stats.failed += len(results)
                for result in results:
                    log.info("failed: %s -> %s", result.id, result.error)
            if ended:
                return


async def take_available(queue: asyncio.Queue[Result | None]) -> tuple[list[Result], bool]:
    """Waits for one item, then takes what is already waiting (up to MAX_WRITE_BATCH).
    Returns the items and whether the sentinel came."""
    item = await queue.get()
    items: list[Result] = []
    while item is not None:
        items.append(item)
        if queue.empty() or len(items) == MAX_WRITE_BATCH:
            return items, False
        item = queue.get_nowait()
    return items, True


def remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


# --- main: wires the stages ---


async def main(config: Config, client: Client, *, shutdown: Shutdown) -> int:
    """Runs the pipeline; returns the exit status: 0 all done, 1 some prompts failed, 2 an
    error about every request (a bad key or model), 130 or 143 interrupted. Raises
    UsageError on bad input, or when another run holds the output folder."""
    stats = Stats(batch_api=config.batch_api)  # its clock starts here: the resume scan is part of the run
    files = check_paths(config)
    if isinstance(client, SimulatedClient):
        notice = f"no GEMINI_API_KEY, or --offline: using the simulated model (latency {client.latency_s}s)"
        log.warning(notice)
    with locked(config.outputs, dry_run=config.dry_run):
        # Every check comes before any change: a refused run leaves the folder as it was.
        ledger = await asyncio.to_thread(open_ledger, config)
        run = Run(config, client, stats=stats, shutdown=shutdown, ledger=ledger)
        if config.batch_cancel:
            await asyncio.to_thread(ledger.commit)
            return await cancel_jobs(run)
        if ledger.live and not config.batch_api:
            raise UsageError(
                f"{plural(len(ledger.live), 'Batch API job')} of an earlier --batch-api run may still answer prompts "
                f"in {config.outputs}: run with --batch-api to collect them, or --batch-cancel"
            )
        total = await ledger.check(files)  # the prompts, if it read the inputs
        if config.dry_run:
            return await dry_run(run, files)
        await asyncio.to_thread(ledger.commit)
        if config.batch_api:
            (config.outputs / BATCH_DIR).mkdir(exist_ok=True)
        if ledger.done or ledger.failed:
            log.info("resuming: %d done and %d failed in earlier runs", len(ledger.done), len(ledger.failed))
        input_queue: asyncio.Queue[Prompt | None] = asyncio.Queue(maxsize=config.queue_size)
        output_queue: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=config.queue_size)
        error_queue: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=config.queue_size)
        shard_numbers = itertools.count(ledger.next_shard)
        spawn = get_context("spawn")  # not fork: a forked child would inherit the event loop and threads
        pool = ProcessPoolExecutor(mp_context=spawn, initializer=ignore_interrupts) if config.word_count else None
        tty = sys.stderr.isatty()
        progress = None
        if not config.quiet:
            progress = asyncio.create_task(
                show_progress(stats, files, total, tty=tty, jobs=ledger if config.batch_api else None)
            )
        if config.batch_api:  # the one stage that changes: submit, wait, collect
            generator = BatchJobs(run, GenerateJobs(run, output_queue, error_queue)).run(input_queue)
        else:
            generator = generate_content(run, input_queue, output_queue, error_queue, word_count_pool=pool)
        stages = [
            read_inputs(run, files, input_queue, error_queue, consumers=1 if config.batch_api else config.workers),
            generator,
            *(write_outputs(run, output_queue, shard_numbers=shard_numbers) for _ in range(config.writers)),
            write_errors(run, error_queue),
        ]
        file_errors: list[BaseException] = []
        try:
            async with asyncio.TaskGroup() as tg:
                for stage in stages:
                    tg.create_task(stage)
        except* OSError as group:  # a disk or file error stopped the run; what was written stays valid
            file_errors = leaf_exceptions(group)
        finally:
            if progress is not None:
                progress.cancel()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if not file_errors:  # the results of collected jobs are written: the jobs leave the manifest
            await ledger.drop_collected()
        all_read = not (shutdown.requested or file_errors)  # then errors of ids no longer in the inputs go
        errors_held = await asyncio.to_thread(ledger.compact_errors, all_read=all_read, rewrite=not file_errors)
    return end_of_run(
        stats.summary(errors_held, stopped=shutdown.requested or bool(file_errors)), shutdown=shutdown,
        file_errors=file_errors, live_jobs=len(ledger.live), failed=bool(errors_held),
    )  # fmt: skip


@dataclass
class Run:
    """What the stages of one run share, made once by main(): the settings, the client, the
    counts, the shutdown, the Retrier that every call goes through (rpm, tpm and retries as the
    settings say), and what the output folder holds (the ledger; none given: an empty one)."""

    config: Config
    client: Client = None
    stats: Stats = field(default_factory=lambda: Stats())
    shutdown: Shutdown = field(default_factory=lambda: Shutdown())
    ledger: Ledger = field(default_factory=lambda: Ledger(Path()))
    retrier: Retrier = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        half_price = "Batch API" if c.batch_api else "Flex" if c.service_tier == "flex" else ""
        self.stats.cost = Cost(c.price, half_price=half_price, max_usd=c.max_cost_usd)
        self.retrier = Retrier(
            max_attempts=c.max_attempts, request_timeout_s=c.attempt_timeout_s,
            rpm=None if c.batch_api else c.rpm, tpm=None if c.batch_api else c.tpm,  # the Batch API has its own quota
            base_delay_s=c.base_delay_s, shutdown=self.shutdown, cost=self.stats.cost,
        )  # fmt: skip


@dataclass
class Stats:
    """Counts shared by every stage; the summary and the progress line read them."""

    read: int = 0  # prompts the readers read (non-blank lines), skipped ones included
    skipped: int = 0  # already done in an earlier run
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    in_flight: int = 0  # prompts in a worker's hands
    calls: int = 0  # calls made, answered or not
    input_tokens: int = 0  # of every answered call, retries included: what is billed
    output_tokens: int = 0
    thinking_tokens: int = 0
    answers: int = 0  # answered calls
    batch_jobs: int = 0  # Batch API jobs created (--batch-api): their tokens are billed at half price
    batch_api: bool = False
    cost: Cost = field(default_factory=lambda: Cost())  # the dollars of the tokens above, and the budget
    started: float = field(default_factory=time.perf_counter)  # the run's start: made before the resume scan

    def summary(self, errors_held: int, *, stopped: bool) -> str:
        wall_s = time.perf_counter() - self.started
        done = self.succeeded + self.failed
        thinking = f", {self.thinking_tokens} thinking" if self.thinking_tokens else ""
        lines = [
            f"Summary: {plural(self.read, 'prompt')} read, {self.skipped} skipped "
            f"({'already done, or in a recorded batch job' if self.batch_api else 'already done'}), "
            f"{self.succeeded} succeeded, {self.failed} failed, {plural(self.retries, 'retry', 'retries')}",
            f"  tokens: {self.input_tokens} input, {self.output_tokens} output{thinking}; "
            + (
                f"{plural(self.batch_jobs, 'Batch API job')} created, {self.answers} answers, billed at the batch "
                "price (half the interactive one)"
                if self.batch_api
                else f"{plural(self.calls, 'call')}, {self.answers} answered"
            ),
            self.cost.summary(),
            f"  wall time {wall_s:.2f}s, {done / wall_s if wall_s else 0:.0f} prompts/s; "
            f"{plural(errors_held, 'failed prompt')} in {ERRORS_NAME}",
        ]
        if stopped:  # a bad key, a spent quota, Ctrl-C
            left = self.read - self.skipped - done
            lines.append(f"  left for the next run: {plural(left, 'prompt')} read but not done, and those not read")
        return "\n".join(lines)


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line of strict JSON: no NaN or Infinity (other parsers reject them), and the
    characters that line-splitting readers (JavaScript, str.splitlines) take for line ends escaped."""
    text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085") + "\n"


async def show_progress(
    stats: Stats, files: list[Path], total: int | None = None, *, tty: bool, jobs: Ledger | None = None
) -> None:
    """Until cancelled: on a terminal, one line redrawn 4 times a second (done, failed, in
    flight, rate, ETA); elsewhere (nohup, containers, CI logs) a plain line every
    PROGRESS_EVERY_S, so a stall shows as counts that stop moving, not as silence. The ETA's
    total: the prompts, when a resume counted them (Ledger.check), else the files' lines."""
    total = await asyncio.to_thread(count_lines, files) if total is None else total
    try:
        while True:
            await asyncio.sleep(0.25 if tty else PROGRESS_EVERY_S)
            done, elapsed = stats.succeeded + stats.failed, time.perf_counter() - stats.started
            eta = f"{max(0, total - stats.skipped - done) * elapsed / done:.0f}s" if done else "?"
            line = f"{done} done, {stats.failed} failed, {stats.in_flight} in flight, {done / elapsed:.0f}/s, ETA {eta}"
            line += stats.cost.progress()
            if jobs is not None:  # --batch-api: the jobs' states instead
                states = Counter(state.removeprefix("JOB_STATE_").lower() for state in jobs.states.values())
                shown_states = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none yet"
                line = f"batch jobs: {shown_states}; {elapsed:.0f}s elapsed; {done} done, {stats.failed} failed"
                line += stats.cost.progress()
            print(f"\r{line}   " if tty else f"progress: {line}", end="" if tty else "\n", file=sys.stderr, flush=True)
    finally:
        if tty:
            print(file=sys.stderr)


def count_lines(files: list[Path]) -> int:
    """Lines in all the files (for the ETA), read a chunk at a time."""
    total = 0
    for path in files:
        with path.open("rb") as f:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(CHUNK_BYTES), b""))
    return total


def check_paths(config: Config) -> list[Path]:
    """The input files, after checking the input and output folders. Raises UsageError."""
    if not config.inputs.is_dir():
        problem = "is a file" if config.inputs.exists() else "not found"
        raise UsageError(f"input folder {problem}: {config.inputs}")
    if config.outputs.resolve().is_relative_to(config.inputs.resolve()):
        raise UsageError(f"the output folder is inside the input folder: {config.outputs} (a re-run would read it)")
    files = input_files(config.inputs)
    if not files:
        raise UsageError(f"no .txt, .jsonl or .ndjson files in the input folder: {config.inputs}")
    if config.dry_run and not config.outputs.exists():
        return files  # nothing there yet, and a dry run makes nothing
    try:
        config.outputs.mkdir(parents=True, exist_ok=True)
        probe = config.outputs / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output folder is not a writable folder: {config.outputs} ({exc.strerror})") from None
    return files


@contextlib.contextmanager
def locked(output_dir: Path, *, dry_run: bool = False) -> Iterator[None]:
    """An exclusive OS lock on the output folder for the whole run: a second run on it is
    refused at once. The OS releases the lock however the process ends (kill -9 too). A dry run
    takes it only if a run made the lock file: it makes no file."""
    if dry_run and not (output_dir / LOCK_NAME).exists():
        yield
        return
    with (output_dir / LOCK_NAME).open("rb" if dry_run else "ab") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another run is using the output folder {output_dir}") from None
        yield


def count_usage(response: types.GenerateContentResponse, stats: Stats) -> dict[str, int] | None:
    """The tokens one answered call used, added to the run's totals (retries are billed too)."""
    meta = response.usage_metadata
    if meta is None:
        return None
    return add_usage(meta.prompt_token_count, meta.candidates_token_count, meta.thoughts_token_count, stats)


def add_usage(
    input_tokens: int | None, output_tokens: int | None, thinking: int | None, stats: Stats
) -> dict[str, int]:
    usage = {"input_tokens": input_tokens or 0, "output_tokens": output_tokens or 0}
    if thinking:
        usage["thinking_tokens"] = thinking
    stats.input_tokens += usage["input_tokens"]
    stats.output_tokens += usage["output_tokens"]
    stats.thinking_tokens += usage.get("thinking_tokens", 0)
    stats.answers += 1
    stats.cost.pay(usage["input_tokens"], usage["output_tokens"] + usage.get("thinking_tokens", 0))
    return usage


# Finish reasons of an answer that was withheld, not merely cut short.
BLOCKED_REASONS = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})


def read_answer(response: types.GenerateContentResponse, *, json_output: bool) -> tuple[Any, str | None]:
    """The answer (parsed JSON with json_output, else text) and its finish reason when that is
    not STOP (MAX_TOKENS, say: the text is kept, cut short). Raises ItemFailed for a blocked
    prompt or answer, MalformedReply for a reply with no usable answer."""
    feedback = response.prompt_feedback
    block = feedback.block_reason.name if feedback is not None and feedback.block_reason is not None else None
    candidate = response.candidates[0] if response.candidates else None
    reason = candidate.finish_reason.name if candidate is not None and candidate.finish_reason else None
    return answer_of(block, reason, response.text if candidate is not None else None, json_output=json_output)


def answer_of(
    block: str | None, reason: str | None, answer: str | None, *, json_output: bool
) -> tuple[Any, str | None]:
    """read_answer's verdict on a reply's block reason, finish reason and text (see read_answer)."""
    if block is not None:
        raise ItemFailed(f"blocked: {block}")
    if reason in BLOCKED_REASONS:
        raise ItemFailed(f"blocked: {reason}")
    if answer is None:
        if reason not in (None, "STOP", "FINISH_REASON_UNSPECIFIED"):
            raise ItemFailed(f"no answer: finish reason {reason}")  # e.g. MAX_TOKENS spent on thinking
        raise MalformedReply("no answer in the reply")
    if json_output:
        try:
            answer = strict_json(answer)
        except (ValueError, RecursionError):
            raise MalformedReply("response is not valid JSON") from None  # a new sample may parse
    return answer, reason if reason not in (None, "STOP") else None


class FailingAlike:
    """Stops a run whose calls all fail alike: a setting the model rejects (a thinking budget on a
    model without one, say) fails every prompt with one same 400, so recording each as failed
    would only have to be undone. Until a call succeeds, failures are held back; when the first
    `limit` answered calls all failed with one same API error, the run stops (shutdown.fail,
    quoting it) and they are left for the next run. Any other outcome releases them as usual."""

    def __init__(self, limit: int, *, shutdown: Shutdown) -> None:
        self._limit = limit
        self._shutdown = shutdown
        self._held: list[Result] = []
        self._deciding = True

    def take(self, result: Result) -> list[Result]:
        """The failures to record now, given one more outcome."""
        if self._deciding and result.refused and all(held.error == result.error for held in self._held):
            self._held.append(result)
            if len(self._held) == self._limit:
                self._shutdown.fail(f"the first {self._limit} calls all failed alike: {result.error}")
            return []
        failed = [result] if result.error is not None else []
        return failed if not self._deciding else self.release() + failed

    def release(self) -> list[Result]:
        """What is held, unless the run stopped for it; from here on, failures are not held."""
        self._deciding, held, self._held = False, self._held, []
        return held if len(held) < self._limit else []


# === Modes: the Batch API stage, and the word-count pool ===
# --batch-api: each live job's prompts wait in outputs/batch/ until its results are written.
BATCH_DIR = "batch"
JOB_PROMPTS = 20_000  # prompts per job at most (--batch-job-size; and JOB_BYTES of requests)
POLL_INTERVAL_S = 30.0  # between two looks at a job, as Google's guide polls (offline: 0.5 s)


def batch_request(config: Config) -> dict[str, Any]:
    """The part of every Batch API request that the run's settings make, in the API's JSON names
    (the file holds REST requests, not SDK objects): the same settings as an interactive call."""
    thinking = {
        "thinkingLevel": (config.thinking_level or "").upper() or None,
        "thinkingBudget": config.thinking_budget,
    }
    generation = {
        "temperature": config.temperature, "maxOutputTokens": config.max_output_tokens,
        "responseMimeType": None if config.json_schema is None else "application/json",
        "responseJsonSchema": config.json_schema,
        "thinkingConfig": {name: value for name, value in thinking.items() if value is not None} or None,
    }  # fmt: skip
    request: dict[str, Any] = {}
    if config.system_instruction is not None:
        request["systemInstruction"] = {"parts": [{"text": config.system_instruction}]}
    if generation := {name: value for name, value in generation.items() if value is not None}:
        request["generationConfig"] = generation
    return request


class JobFiles:
    """A job being filled: its prompts (path: kept until its results are written) and its Batch API
    input ({"key": id, "request": ...} per line: requests_path, to upload). Both are appended to
    through aiofiles every WRITE_EVERY prompts, so a job of any size holds that many in memory."""

    def __init__(self, path: Path, settings: dict[str, Any], config: Config) -> None:
        self.path, self.requests_path = path, path.with_suffix(".requests.jsonl")
        self.count = self.size = 0  # prompts, and bytes of requests (about)
        self.input_tokens = self.output_tokens = 0.0  # estimated: see Config.input_tokens
        self._settings, self._config = settings, config
        self._held: list[Prompt] = []

    async def add(self, prompt: Prompt) -> None:
        self._held.append(prompt)
        self.count += 1
        self.size += len(prompt[1]) + 200  # the request's JSON around the prompt: about 200 bytes
        self.input_tokens += self._config.input_tokens(prompt[1])
        self.output_tokens += self._config.max_output_tokens or OUTPUT_TOKENS_GUESS
        if len(self._held) == WRITE_EVERY:
            await self.flush()

    async def flush(self) -> None:
        held, self._held = self._held, []
        if not held:
            return
        lines = [json_line({"id": i, "prompt": text, "metadata": metadata}) for i, text, metadata in held]
        requests = [
            json_line(
                {"key": i, "request": {"contents": [{"role": "user", "parts": [{"text": text}]}], **self._settings}}
            )
            for i, text, _ in held
        ]
        for target, data in ((self.path, lines), (self.requests_path, requests)):
            async with open_file(target, "ab") as f:
                await append(f, data)


def batch_result(row: dict[str, Any], prompt: Prompt, attempt: int, stats: Stats, *, json_output: bool) -> Result:
    """The Result of one line of a job's results file: {"key", "response"} or {"key", "error"}."""
    prompt_id, text, metadata = prompt
    if isinstance(error := row.get("error"), dict):
        message = f"{error.get('code', '?')} {error.get('status', '')}: {error.get('message', '')}"
        return Result(prompt_id, text, metadata, error=f"batch: {message}", attempts=attempt)
    # The REST JSON, read as it is: a types.GenerateContentResponse per row would cost more than all
    # the rest of the mode (30 us each in pydantic), and the SDK makes none for a results file.
    response: dict[str, Any] = row["response"] if isinstance(row.get("response"), dict) else {}
    meta, candidates = response.get("usageMetadata") or {}, response.get("candidates") or [{}]
    candidate = candidates[0] if isinstance(candidates[0], dict) else {}
    parts = (candidate.get("content") or {}).get("parts") or []
    texts = [part["text"] for part in parts if isinstance(part.get("text"), str) and not part.get("thought")]
    usage = None
    if meta:
        usage = add_usage(meta.get("promptTokenCount"), meta.get("candidatesTokenCount"),
                          meta.get("thoughtsTokenCount"), stats)  # fmt: skip
    try:
        block = (response.get("promptFeedback") or {}).get("blockReason")
        answer, reason = answer_of(block, candidate.get("finishReason"), "".join(texts) if texts else None,
                                   json_output=json_output)  # fmt: skip
    except (ItemFailed, MalformedReply) as exc:
        return Result(prompt_id, text, metadata, error=describe(exc), attempts=attempt, usage=usage)
    return Result(prompt_id, text, metadata, answer, attempts=attempt, usage=usage, finish_reason=reason,
                  model_version=response.get("modelVersion"))  # fmt: skip


class GenerateJobs:
    """Generation for BatchJobs (stage 2 with --batch-api): a job's prompts and its
    GenerateContentRequests (JobFiles, with the run's settings in each), created by batches.create;
    each result becomes the Result an interactive call would give, for the writers or
    error_queue, as a failure does."""

    noun = "prompt"

    def __init__(
        self, run: Run, output_queue: asyncio.Queue[Result | None], error_queue: asyncio.Queue[Result | None]
    ) -> None:
        self.client, self.config, self.stats = run.client, run.config, run.stats
        self.output_queue, self.error_queue = output_queue, error_queue
        self.settings = batch_request(run.config)

    def files(self, path: Path) -> JobFiles:
        return JobFiles(path, self.settings, self.config)

    async def create(self, file_name: str, display_name: str) -> types.BatchJob:
        created: types.BatchJob = await self.client.aio.batches.create(
            model=self.config.model, src=file_name, config={"display_name": display_name}
        )
        return created

    def item_of(self, row: dict[str, Any]) -> tuple[str, Prompt]:
        return row["id"], (row["id"], row["prompt"], row["metadata"])

    async def deliver(self, item: Prompt, row: dict[str, Any], job: Job) -> None:
        result = batch_result(row, item, job.attempt, self.stats, json_output=self.config.json_schema is not None)
        await (self.error_queue if result.error is not None else self.output_queue).put(result)

    async def fail(self, item: Prompt, reason: str, job: Job) -> None:
        prompt_id, text, metadata = item
        await self.error_queue.put(Result(prompt_id, text, metadata, error=reason, attempts=job.attempt))

    async def end(self) -> None:
        for _ in range(self.config.writers):
            await self.output_queue.put(None)
        await self.error_queue.put(None)


async def dry_run(run: Run, files: list[Path]) -> int:
    """--dry-run: the readers, exactly as a run has them (what is done, failed or waiting in a
    recorded job is skipped), into a Tally in place of the model and the writers; then prints
    what the run would send and cost (see estimate). Nothing is called or written."""
    config = run.config
    input_queue: asyncio.Queue[Prompt | None] = asyncio.Queue(maxsize=config.queue_size)
    error_queue: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=config.queue_size)
    tally: Tally[Prompt] = Tally(lambda prompt: config.input_tokens(prompt[1]))

    async def bad_lines() -> None:  # a line that cannot be a prompt fails without a call: not counted
        while await error_queue.get() is not None:
            pass

    async with asyncio.TaskGroup() as tg:
        tg.create_task(read_inputs(run, files, input_queue, error_queue, consumers=1))
        tg.create_task(tally.run(input_queue, error_queue))
        tg.create_task(bad_lines())
    bound = None if config.max_output_tokens is None else config.max_output_tokens * tally.items
    print(estimate("prompt", sent=tally.items, skipped=run.stats.skipped, calls=tally.items,
                   input_tokens=tally.tokens, output_tokens=bound, config=config,
                   half_price="with Flex or the Batch API"))  # fmt: skip
    return 0


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}  # what the parent handles, and its pool processes ignore


def count_words(text: str) -> int:
    """CPU work for the process pool (the document's Going Further)."""
    return len(text.split())


def ignore_interrupts() -> None:
    """In each pool process: a terminal's Ctrl-C reaches the whole process group, but the
    parent handles it (drain, summary); a worker killed by it would break the pool. The
    process starts with them blocked (see count_words_in): any that came meanwhile are dropped."""
    for signum in INTERRUPTS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)


async def count_words_in(pool: Executor, text: str) -> int:
    """count_words(text) in the pool. A submit may start a pool process, which imports this
    script (a second) before ignore_interrupts runs: SIGINT and SIGTERM are blocked while it is
    started, so it inherits them blocked, and a Ctrl-C meanwhile cannot kill it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        future = asyncio.get_running_loop().run_in_executor(pool, count_words, text)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # one that came meanwhile is handled now
    return await future


# === Safe re-runs: the ledger of the output folder, and the input formats ===
SHARD_NAME = "shard_{:05d}.jsonl"
SHARD_RE = re.compile(r"shard_(\d+)\.jsonl")
ERRORS_NAME = "errors.jsonl"
MANIFEST_NAME = "manifest.json"  # the settings that shaped the records, and the live jobs (see Ledger)
LOCK_NAME = ".lock"
# The settings that shape a record: a resumed run must have the same ones (see Config.recorded).
RECORDED_SETTINGS = (
    "model", "system_instruction", "json_schema", "temperature", "max_output_tokens", "thinking_level",
    "thinking_budget", "service_tier",
)  # fmt: skip


@dataclass
class Job:
    """A Batch API job, as the manifest records it: the API's name ("" until the create returns),
    the file in the output folder that holds its prompts (id, prompt, metadata), which attempt it
    is for them, and its display name, unique to it (see BatchJobs.submit)."""

    name: str
    prompts: str  # relative to the output folder: batch/job_00001.jsonl
    attempt: int = 1
    display_name: str = ""


@dataclass
class Ledger:
    """The output folder's state, in one place, read once at the start (open_ledger): the manifest
    (the settings that shaped the records, and the live Batch API jobs), and the ids done (with a
    record in a shard), failed (in errors.jsonl) and queued (in a live job), each with a hash of its
    prompt: an id is done only for the prompt its record answers. check() refuses inputs changed
    under done or queued ids; then skips() says, for each prompt read, whether it is passed over.
    Nothing in the folder changes before commit().

    Creating a Batch API job is not idempotent and every job is billed, so a job is recorded (one
    atomic manifest write) before its create is called (record); a re-run waits on the recorded
    jobs and never submits their prompts again. A job leaves the ledger, and its prompts file goes,
    once its results are written: drop_collected, at the end of the run."""

    output_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)  # as this run writes it
    done: dict[str, int] = field(default_factory=dict)  # ids with a record in a shard
    failed: dict[str, int] = field(default_factory=dict)  # ids in errors.jsonl, and not done
    queued: dict[str, int] = field(default_factory=dict)  # ids in a live Batch API job
    live: list[Job] = field(default_factory=list)  # the recorded jobs
    next_shard: int = 0
    torn: list[tuple[Path, int]] = field(default_factory=list)  # torn last lines: (file, where to cut)
    retry_failed: bool = False  # --retry-errors, or failures made with other settings: run them again
    met: set[str] = field(default_factory=set)  # the failed ids that the readers met in the inputs
    redone: set[str] = field(default_factory=set)  # failed ids written by this run (see write_outputs)
    states: dict[str, str] = field(default_factory=dict)  # each job's last state seen, for the progress line
    collected: list[Job] = field(default_factory=list)  # jobs whose results are written
    job_numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # for new job files
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one manifest write at a time

    def skips(self, prompt_id: str, text: str) -> bool:
        """Whether the readers pass over this prompt: done, or queued in a live job. A failed
        prompt runs again if its text changed (the error was about another prompt)."""
        if (digest := self.failed.get(prompt_id)) is not None:
            self.met.add(prompt_id)  # first: a failed id queued in a live job is still in the inputs
        if prompt_id in self.done or prompt_id in self.queued:
            return True
        if digest is None:
            return False
        return not self.retry_failed and digest == hash(text)

    async def check(self, files: list[Path]) -> int | None:
        """Refuses (UsageError) inputs changed under ids answered, or waiting in a live job: a
        record answers one prompt. Reads the inputs once more, only when something is done or
        queued, and then returns how many prompts they hold (the progress line's total)."""
        if not (self.done or self.queued):
            return None
        first: tuple[str, str] | None = None  # the first changed id, and its prompt now
        changed, total, seen, reserved = 0, 0, set[str](), {path.name for path in files}
        for path in files:
            async with contextlib.aclosing(read_prompts(path, seen=seen, reserved=reserved)) as blocks:  # type: ignore[type-var]
                async for prompts in blocks:
                    for prompt_id, text, _, _ in prompts:
                        total += 1
                        digest = self.done.get(prompt_id, self.queued.get(prompt_id))
                        if digest is not None and digest != hash(text):
                            changed += 1
                            first = first or (prompt_id, text)
        if first is not None:
            first_id, text = first
            if first_id not in self.done:
                raise UsageError(
                    f"the input of {first_id} changed since it was sent in a Batch API job: {shown(text)}: restore "
                    "the inputs, or end the job with --batch-cancel"
                )
            old = await asyncio.to_thread(answered_prompt, self.output_dir, first_id)
            more = f", and {changed - 1} more" if changed > 1 else ""
            raise UsageError(
                f"the input of {first_id} changed since it was answered: {shown(old)} -> {shown(text)}{more}: "
                "use a new --outputs, or restore the inputs"
            )
        return total

    def commit(self) -> None:
        """The run goes ahead: job files that no recorded job names go (a kill between writing a
        job's files and recording it), torn last lines are cut, and the manifest is written."""
        named = {Path(job.prompts).name.split(".")[0] for job in self.live}
        for orphan in (self.output_dir / BATCH_DIR).glob("job_*"):
            if orphan.name.split(".")[0] not in named:
                orphan.unlink()
        for path, offset in self.torn:
            log.warning("%s: cutting off a torn last line (%d bytes)", path.name, path.stat().st_size - offset)
            os.truncate(path, offset)
        write_manifest(self.output_dir, self.manifest)

    @property
    def label(self) -> str:
        return self.output_dir.name  # in each job's display name, as AI Studio lists it

    def new_path(self) -> Path:
        return self.output_dir / BATCH_DIR / f"job_{next(self.job_numbers):05d}.jsonl"

    def job(self, name: str, path: Path, attempt: int, display_name: str) -> Job:
        return Job(name, str(path.relative_to(self.output_dir)), attempt, display_name)

    def path_of(self, job: Job) -> Path:
        return self.output_dir / job.prompts

    async def record(self, job: Job, *, replacing: Job | None = None) -> None:
        """Adds job (in place of `replacing`, in the same write: never both, never neither)."""
        self.live = [*(j for j in self.live if j is not replacing), job]
        await self._write()

    async def drop_collected(self) -> None:
        self.live = [job for job in self.live if job not in self.collected]
        await self._write()
        for job in self.collected:
            self.path_of(job).unlink(missing_ok=True)
        self.collected = []
        if not self.live:  # nothing waits any more: no empty folder left behind
            with contextlib.suppress(OSError):
                (self.output_dir / BATCH_DIR).rmdir()

    async def _write(self) -> None:
        async with self.lock:
            self.manifest["jobs"] = [vars(job) for job in self.live]
            await asyncio.to_thread(write_manifest, self.output_dir, dict(self.manifest))

    def compact_errors(self, *, all_read: bool, rewrite: bool = True) -> int:
        """Rewrites errors.jsonl (atomically) with one record per failed id, the latest, and none
        for ids that have since succeeded, or (all_read: the readers met every input) that are no
        longer in the inputs. Returns how many it holds (and only counts them when not to rewrite:
        after a disk error)."""
        path = self.output_dir / ERRORS_NAME
        if not path.exists():
            return 0
        done, gone = self.done.keys() | self.redone, self.failed.keys() - self.met if all_read else set()
        latest = {
            record["id"]: record for record in read_records(path, "error", strict=False, torn=[])
            if record["id"] not in done and record["id"] not in gone
        }  # fmt: skip
        data = "".join(map(json_line, latest.values())).encode()
        if rewrite and path.read_bytes() != data:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return len(latest)


def open_ledger(config: Config) -> Ledger:
    """What the output folder holds. Refuses (UsageError) files that are not ours, and settings
    that differ from those of the records or live jobs already there. Changes nothing: see
    Ledger.commit."""
    manifest = read_manifest(config.outputs)
    recorded, settings = (manifest or {}).get("settings", {}), config.recorded()
    if config.batch_cancel and manifest is not None:
        settings = recorded  # a cancel makes no record: the records' settings stay, whatever the flags
    ledger = Ledger(config.outputs, (manifest or {"written_by": "pipeline.py"}) | {"settings": settings})
    ledger.live = [Job(**job) for job in ledger.manifest.get("jobs", [])]
    scan_outputs(ledger, strict=manifest is None)  # no manifest: every line must be ours
    if manifest is not None and (ledger.done or ledger.live):  # records or live jobs: their settings stay
        for name, value in settings.items():
            if (old := recorded.get(name)) != value:
                raise UsageError(
                    f"--{name.replace('_', '-')} was {shown(old)} for the records in {config.outputs}, now "
                    f"{shown(value)}: use a new --outputs, or the same setting"
                )
    # Failures made under other settings (no answer kept them) run again with the new ones.
    ledger.retry_failed = config.retry_errors or (manifest is not None and recorded != settings)
    for job in ledger.live:  # the ids waiting in live jobs, with their prompts' hashes (see check)
        with ledger.path_of(job).open("rb") as f:
            for line in f:
                row = strict_json(line)
                ledger.queued[row["id"]] = hash(row["prompt"])
    numbers = [int(m.group(1)) for p in (config.outputs / BATCH_DIR).glob("job_*") if (m := JOB_RE.match(p.name))]
    ledger.job_numbers = itertools.count(max(numbers, default=0) + 1)
    return ledger


def read_records(path: Path, kind: str, *, strict: bool, torn: list[tuple[Path, int]]) -> Iterator[dict[str, Any]]:
    """The complete records of one of our JSONL files: objects with a string "id" and "prompt",
    and a `kind` field ("response" or "error"). A torn last line (no newline: the run was
    killed mid-write) is added to `torn`, to be cut once the run goes ahead. Another line is
    skipped with a warning; with strict (a file not known to be ours), it refuses the file."""
    if not path.is_file():
        raise UsageError(f"not a file, where the run keeps its records: {path}")
    offset = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n") and (not strict or line.startswith(b'{"id": ')):
                torn.append((path, offset))
                return
            offset += len(line)
            try:
                record = strict_json(line)
            except (ValueError, RecursionError):  # not JSON, or not UTF-8
                record = None
            if (
                isinstance(record, dict)
                and {type(record.get("id")), type(record.get("prompt"))} == {str}
                and (kind in record)
            ):
                yield record
            elif strict:
                raise UsageError(
                    f"{path} holds lines that pipeline.py did not write (line {number}): use another --outputs, "
                    "or move the file"
                )
            else:
                log.warning("%s: skipping an unreadable line at byte %d", path.name, offset - len(line))


def scan_outputs(ledger: Ledger, *, strict: bool) -> None:
    """Notes in the ledger the ids already answered (in shards) or failed (in errors.jsonl), and
    the next shard number. strict: see read_records."""
    for path in ledger.output_dir.glob("shard_*.jsonl"):
        if match := SHARD_RE.fullmatch(path.name):
            ledger.next_shard = max(ledger.next_shard, int(match.group(1)) + 1)
            records = read_records(path, "response", strict=strict, torn=ledger.torn)
            ledger.done.update((record["id"], hash(record["prompt"])) for record in records)
    if (path := ledger.output_dir / ERRORS_NAME).exists():
        for record in read_records(path, "error", strict=strict, torn=ledger.torn):
            if record["id"] not in ledger.done:
                ledger.failed[record["id"]] = hash(record["prompt"])  # the latest one counts


def read_manifest(output_dir: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None if it has none (new, or from before manifests)."""
    path = output_dir / MANIFEST_NAME
    try:
        manifest = strict_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("written_by") == "pipeline.py"):
        raise UsageError(f"{path} is not a manifest of pipeline.py: use another --outputs, or move the file")
    return manifest


def write_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    """Writes the manifest atomically (a whole new file, renamed over the old), if it changed."""
    path, data = output_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def answered_prompt(output_dir: Path, prompt_id: str) -> str:
    """The prompt that the record of prompt_id answers (for a message: it reads every shard)."""
    for path in output_dir.glob("shard_*.jsonl"):
        for record in read_records(path, "response", strict=False, torn=[]):
            if record["id"] == prompt_id:
                return str(record["prompt"])
    raise AssertionError(f"no record of {prompt_id}")


def strict_json(text: str | bytes) -> Any:
    """json.loads, refusing NaN, Infinity and -Infinity, which are not JSON. (One decoder made
    once: json.loads with any option makes a new one per call, 10% of the --json-schema run.)"""
    return STRICT_DECODER.decode(text if isinstance(text, str) else text.decode())


INPUT_SUFFIXES = (".txt", ".jsonl", ".ndjson")  # in any case: UPPER.TXT too
# The ASCII characters that str.strip keeps but no one can see: a block without them (and all
# ASCII) needs no per-line check for lines of only invisible characters.
INVISIBLE = bytes([*range(0x00, 0x09), *range(0x0E, 0x1C), 0x7F])


async def read_blocks(path: Path) -> AsyncIterator[bytes]:
    """The file in blocks of whole lines, about CHUNK_BYTES each, without the last line end,
    through aiofiles: one thread hop per chunk, not per line. A line ends with "\n", "\r\n" or a
    lone "\r" (old Mac files); each becomes "\n". A leading UTF-8 BOM (Windows editors, Excel
    exports) is dropped."""
    async with open_file(path, "rb") as f:
        tail, first = b"", True
        while chunk := await f.read(CHUNK_BYTES):
            data, first = tail + (chunk.removeprefix(BOM) if first else chunk), False
            end = len(data) - data.endswith(b"\r")  # a last "\r" may be half of "\r\n": keep it for later
            cut = max(data.rfind(b"\n", 0, end), data.rfind(b"\r", 0, end)) + 1  # 0: a line longer than a chunk
            if cut:
                yield newlines(data[:cut])[:-1]  # without the last line end, "\n" now
            tail = data[cut:]
        if tail:
            yield newlines(tail).removesuffix(b"\n")


def decode_lines(block: bytes, first_number: int) -> tuple[list[str], dict[int, str]]:
    """The block's lines, and by line number the errors of those that are not UTF-8."""
    try:
        return block.decode().split("\n"), {}  # the fast path: the whole block is UTF-8
    except UnicodeDecodeError:
        lines, bad = [], {}
        for number, raw in enumerate(block.split(b"\n"), first_number):
            try:
                lines.append(raw.decode())
            except UnicodeDecodeError as exc:
                lines.append(raw.decode(errors="backslashreplace"))
                bad[number] = f"undecodable UTF-8: {exc}"
        return lines, bad


def parse_jsonl(line: str, seen: set[str], reserved: Collection[str]) -> tuple[str | None, str, dict[str, Any] | None]:
    """A JSONL input line: its "id" (or None), its "prompt", and every other field as
    metadata. An id in `seen` (the run's ids so far) is a duplicate; a new one is added. An id
    "<name>:<number>" with a name in `reserved` (the input files) is the id of that file's line,
    so no row may take it. Raises ValueError (RecursionError: nested too deep) naming what is wrong."""
    row = strict_json(line)
    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object: {line[:60]!r}")
    if nested_deeper(row, MAX_NESTING):  # it could not be written back (json.dumps recurses)
        raise ValueError(f"nested deeper than {MAX_NESTING} levels")
    if LONE_SURROGATE.search(line) and not encodable(row):  # "\ud800": valid JSON, but no character
        raise ValueError("a lone surrogate escape (\\ud800 to \\udfff alone is no character): not UTF-8")
    prompt, row_id = row.pop("prompt", None), row.pop("id", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError('"prompt" must be a non-empty string')
    if row_id is not None:
        if not (isinstance(row_id, str) and row_id):
            raise ValueError(f'"id" must be a non-empty string, got {row_id!r}')
        if row_id in seen:
            raise ValueError(f"duplicate id {row_id!r}: this line is not run")
        name, _, number = row_id.rpartition(":")
        if name in reserved and number.isdigit():
            raise ValueError(f"id {row_id!r} is the id of line {number} of {name}: give this row another id")
        seen.add(row_id)
    return row_id, prompt, row or None


PromptLine: TypeAlias = tuple[str, str, dict[str, Any] | None, str | None]  # id, text, metadata, error


def parse_lines(
    name: str, lines: list[str], first_number: int, bad: dict[int, str], *, jsonl: bool, seen: set[str],
    reserved: Collection[str], invisible: bool = True,
) -> Iterator[PromptLine]:  # fmt: skip
    """The non-blank lines of a block as (id, text, metadata, error). The id is the JSONL row's
    "id", else "<file name>:<line number>". A line that cannot be run (not UTF-8, a bad JSONL
    row) keeps its "<file>:<line>" id and its text as read, and says why in error. A line of
    only invisible characters is blank; invisible=False says the block has none (see INVISIBLE)."""
    for number, text in enumerate(map(str.strip, lines), first_number):
        if not text or (invisible and not text.isprintable() and is_blank(text)):
            continue
        prompt_id, metadata, error = f"{name}:{number}", None, bad.get(number) if bad else None
        if jsonl and error is None:
            try:
                row_id, text, metadata = parse_jsonl(text, seen, reserved)
                prompt_id = row_id or prompt_id
            except (ValueError, RecursionError) as exc:
                error = f"bad JSONL line: {exc}"
        yield prompt_id, text, metadata, error


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
SIMULATED_JOB_S = 2.0  # how long a simulated job takes
SIMULATED_MODEL = "simulated"  # the model_version of its answers: a record says it came from the simulation


class SimulatedClient:
    """Stands in for genai.Client offline: client.aio.models.generate_content returns a real
    types.GenerateContentResponse after latency_s, with usage (characters / 4 as tokens).
    "What is two times N?" is answered 2N; with a JSON schema, a small instance of it.
    With failure_rate, that share of calls fails with a transient 503."""

    def __init__(self, *, latency_s: float = 0.0, failure_rate: float = 0.0) -> None:
        self.latency_s = latency_s
        self.failure_rate = failure_rate
        self.aio = self.models = self  # so client.aio.models.generate_content works as on genai.Client
        self.files = self.batches = SimulatedBatchAPI(self)  # client.aio.files.upload, .batches.create, ...
        self._template: tuple[Any, str] | None = None  # (schema, its JSON answer with a placeholder)

    async def generate_content(
        self, *, model: str, contents: str, config: types.GenerateContentConfig | None = None
    ) -> types.GenerateContentResponse:
        await asyncio.sleep(self.latency_s)
        if self.failure_rate and random.random() < self.failure_rate:
            raise errors.ServerError(503, {"error": {"code": 503, "message": "simulated", "status": "UNAVAILABLE"}})
        json_output = config is not None and config.response_mime_type == "application/json"
        text = self.answer(contents, config.response_json_schema if json_output and config else None, json_output)
        system = str(config.system_instruction or "") if config is not None else ""
        usage = {"prompt_token_count": -(-len(contents + system) // 4), "candidates_token_count": -(-len(text) // 4)}
        # Validated from a dict, as the SDK does with the API's JSON (twice as fast as nested constructors).
        candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "finish_reason": "STOP"}
        return types.GenerateContentResponse.model_validate(
            {"candidates": [candidate], "usage_metadata": usage, "model_version": SIMULATED_MODEL}
        )

    def answer(self, contents: str, schema: Any, json_output: bool) -> str:
        match = re.fullmatch(r"What is two times (-?\d+)\?", contents)
        text = str(2 * int(match.group(1))) if match else f"A simulated answer to: {contents}"
        return self.json_answer(schema, text) if json_output else text

    def json_answer(self, schema: Any, text: str) -> str:
        """fake_instance(schema, text) as JSON, from a template made once per schema, so the
        simulation's own cost stays out of the benchmarks."""
        if self._template is None or self._template[0] is not schema:
            self._template = (schema, json.dumps(fake_instance(schema, "\0")))
        return self._template[1].replace('"\\u0000"', json.dumps(text))


class SimulatedBatchAPI:
    """The Batch API offline, as client.aio.files and client.aio.batches: upload keeps a copy of
    the requests in a folder of the system's temp dir, and a job, named after its creation time
    and that copy, succeeds SIMULATED_JOB_S later. Nothing lives in memory, so a re-run in
    another process finds the jobs of the first one. download answers each request as
    generate_content would."""

    def __init__(self, client: SimulatedClient) -> None:
        self._client = client
        self._store = Path(tempfile.gettempdir()) / "pipeline-simulated-batch-api"

    async def upload(self, *, file: Path, config: Any = None) -> types.File:
        name, size = await asyncio.to_thread(self._keep, Path(file))
        return types.File(name=f"files/{name}", mime_type="jsonl", size_bytes=size)

    def _keep(self, path: Path) -> tuple[str, int]:
        """Stores a copy of an upload under its hash; those older than 48 hours go, as Google's do."""
        self._store.mkdir(exist_ok=True)
        for old in self._store.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another run may remove it first
                if time.time() - old.stat().st_mtime > 48 * 3600:
                    old.unlink()
        with path.open("rb") as f:
            name = hashlib.file_digest(f, "sha256").hexdigest()[:32]
        shutil.copyfile(path, self._store / name)
        return name, path.stat().st_size

    async def create(self, *, model: str, src: str, config: Any = None) -> types.BatchJob:
        return await asyncio.to_thread(self._create, f"batches/{time.time_ns()}-{src.removeprefix('files/')}", config)

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
        pass

    async def download(self, *, file: str, destination: Any) -> None:
        """Writes the results a chunk at a time, as the SDK does."""
        lines = []
        for line in (self._store / file.removeprefix("files/").removesuffix(".results")).open():
            row = json.loads(line)
            request, schema = row["request"], row["request"].get("generationConfig", {}).get("responseJsonSchema")
            contents = request["contents"][0]["parts"][0]["text"]
            json_output = request.get("generationConfig", {}).get("responseMimeType") == "application/json"
            text = self._client.answer(contents, schema, json_output)
            system = request.get("systemInstruction", {}).get("parts", [{}])[0].get("text", "")
            usage = {"promptTokenCount": -(-len(contents + system) // 4), "candidatesTokenCount": -(-len(text) // 4)}
            candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}
            response = {"candidates": [candidate], "usageMetadata": usage, "modelVersion": SIMULATED_MODEL}
            lines.append(json.dumps({"key": row["key"], "response": response}) + "\n")
            if len(lines) == WRITE_EVERY:
                await destination.write("".join(lines).encode())
                lines = []
        await destination.write("".join(lines).encode())


def fake_instance(schema: Any, text: str) -> Any:
    """A small value that matches a JSON schema: the answer text for strings, the first enum."""
    schema = schema if isinstance(schema, dict) else {}
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if kind == "object":
        return {name: fake_instance(sub, text) for name, sub in schema.get("properties", {"answer": {}}).items()}
    if kind == "array":
        return [fake_instance(schema.get("items"), text)]
    return {"integer": 0, "number": 0.0, "boolean": False, "null": None}.get(kind, text)


# === The command line ===
THINKING_LEVELS = ("minimal", "low", "medium", "high")  # Gemini 3's ThinkingConfig(thinking_level=...)


def setting_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is not part of the setting
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def instruction(text: str) -> str:
    """An argparse type: the system instruction, or the file it names with @PATH."""
    return setting_file(Path(text[1:])) if text.startswith("@") else text


def json_schema(text: str) -> dict[str, Any]:
    """An argparse type: the JSON Schema object in the file at text."""
    try:
        schema = json.loads(setting_file(Path(text)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{text} is not a JSON Schema object")
    return schema


@dataclass(frozen=True, kw_only=True)
class Config:
    """The pipeline's settings, one per command-line flag (make_parser builds them from these
    fields), each checked once, when made, naming the bad value."""

    inputs: Path = flag(Path("inputs"), "folder of *.txt and *.jsonl inputs", parse=Path, metavar="PATH")
    outputs: Path = flag(Path("outputs"), "folder for shards, errors.jsonl, manifest", parse=Path, metavar="PATH")
    workers: int = flag(5, "concurrent model calls", parse=COUNT, metavar="N")
    readers: int = flag(1, "reader tasks; they split the files", parse=COUNT, metavar="N")
    writers: int = flag(1, "writer tasks; each owns its shards", parse=COUNT, metavar="N")
    queue_size: int = flag(5, "bound of each queue", parse=COUNT, metavar="N")
    shard_size: int = flag(SHARD_SIZE, "records per output shard at most", parse=COUNT, metavar="N")
    max_attempts: int = flag(5, "calls per prompt, retries included", parse=COUNT, metavar="N")
    request_timeout_s: float | None = flag(
        None, f"per attempt; an answer with thinking can take minutes (default: {REQUEST_TIMEOUT_S:g}, or "
        f"{FLEX_REQUEST_TIMEOUT_S:g} with --service-tier flex)", parse=POSITIVE, metavar="SECONDS",
    )  # fmt: skip
    base_delay_s: float = 0.5  # the first retry's backoff, doubled each time (not a flag: tests shorten it)
    rpm: float | None = flag(None, "cap on call starts per minute, all workers together", parse=POSITIVE, metavar="N")
    tpm: float | None = flag(None, "cap on tokens per minute, all workers together", parse=POSITIVE, metavar="N")
    model: str = flag("gemini-flash-latest", "model", parse=model_name, metavar="NAME")
    system_instruction: str | None = flag(None, "system instruction, or @PATH to read it from a file",
                                          parse=instruction, metavar="TEXT")  # fmt: skip
    temperature: float | None = flag(None, "sampling temperature, 0..2", parse=Number(float, 0, 2), metavar="T")
    max_output_tokens: int | None = flag(None, "cap on each answer's tokens", parse=COUNT, metavar="N")
    thinking_level: str | None = flag(None, "Gemini 3 and later: how much the model thinks", choices=THINKING_LEVELS)
    thinking_budget: int | None = flag(None, "Gemini 2.5: thinking tokens per answer (0: off where allowed; -1: auto)",
                                       parse=Number(int, -1), metavar="N")  # fmt: skip
    json_schema: dict[str, Any] | None = flag(None, "ask for JSON matching this JSON Schema file; parse it",
                                              parse=json_schema, metavar="PATH")  # fmt: skip
    service_tier: str | None = flag(None, "flex: half price, slower, may be shed (503s are retried)",
                                    choices=SERVICE_TIERS)  # fmt: skip
    price: tuple[float, ...] | None = flag(
        None, "US dollars per 1M input and output tokens (thinking bills as output), from Google's pricing page: "
        "the summary and progress line show the cost; Flex and --batch-api pay half", parse=price, metavar="IN,OUT",
    )  # fmt: skip
    max_cost_usd: float | None = flag(None, "stop before this run's cost would pass this many US dollars (needs "
                                      "--price)", parse=POSITIVE, metavar="USD")  # fmt: skip
    retry_errors: bool = flag(False, f"retry the prompts in {ERRORS_NAME}")
    batch_api: bool = flag(False, "through Google's Batch API: half price, its own quota, results within 24 h; a "
                           "re-run resumes waiting")  # fmt: skip
    batch_job_size: int = flag(JOB_PROMPTS, f"prompts per Batch API job (and at most {JOB_BYTES >> 20} MiB of "
                               "requests; Google takes 2 GB)", parse=COUNT, metavar="N")  # fmt: skip
    poll_interval_s: float = flag(POLL_INTERVAL_S, f"between looks at a Batch API job (offline, the default is "
                                  f"{SIMULATED_POLL_INTERVAL_S:g})", parse=POSITIVE, metavar="SECONDS")  # fmt: skip
    batch_cancel: bool = flag(False, "cancel the Batch API jobs recorded in --outputs, and forget them")
    dry_run: bool = flag(False, "call nothing, write nothing: print what the run would send, its tokens and cost")
    word_count: bool = flag(False, "add word_count, computed in a process pool")
    offline: bool = flag(False, "use the simulated model even with a key")
    fake_latency_s: float = flag(0.1, "simulated latency", parse=Number(float, 0), metavar="SECONDS")
    fake_failure_rate: float = flag(0.0, "simulated 503s, 0..1", parse=Number(float, 0, 1), metavar="SHARE")
    seed: int | None = flag(None, "random seed, for repeatable runs", parse=int, metavar="N")
    quiet: bool = flag(False, "only the summary and run-level problems on stderr")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.thinking_level is not None and self.thinking_budget is not None:
            raise ValueError("--thinking-level and --thinking-budget cannot be used together (the API rejects both)")
        if self.price is not None and len(self.price) != 2:
            raise ValueError("--price takes IN,OUT for the pipeline: dollars per 1M input and per 1M output tokens")
        if self.dry_run and self.batch_cancel:
            raise ValueError("--dry-run and --batch-cancel cannot be used together: a dry run cancels nothing")
        if self.max_cost_usd is not None and self.price is None:
            raise ValueError("--max-cost needs --price: the cost is counted at that price")
        if self.batch_api and (self.service_tier is not None or self.word_count):
            raise ValueError("--batch-api takes neither --service-tier (the batch price is its own) nor --word-count")

    @property
    def attempt_timeout_s(self) -> float:
        """--request-timeout, or by default what the tier needs: Flex answers may wait in a queue."""
        flex = FLEX_REQUEST_TIMEOUT_S if self.service_tier == "flex" else REQUEST_TIMEOUT_S
        return self.request_timeout_s or flex

    def generation(self) -> types.GenerateContentConfig | None:
        """The one GenerateContentConfig every call shares, or None for the model's defaults."""
        thinking = None
        if self.thinking_level is not None or self.thinking_budget is not None:
            level = None if self.thinking_level is None else types.ThinkingLevel(self.thinking_level.upper())
            thinking = types.ThinkingConfig(thinking_level=level, thinking_budget=self.thinking_budget)
        settings: dict[str, Any] = {
            "system_instruction": self.system_instruction, "temperature": self.temperature,
            "max_output_tokens": self.max_output_tokens, "thinking_config": thinking,
            "response_mime_type": None if self.json_schema is None else "application/json",
            "response_json_schema": self.json_schema, "service_tier": self.service_tier,
        }  # fmt: skip
        settings = {name: value for name, value in settings.items() if value is not None}
        return types.GenerateContentConfig(**settings) if settings else None

    def input_tokens(self, prompt: str) -> float:
        """A call's input tokens, estimated before it is made (for --tpm, --max-cost, --dry-run and
        a Batch API job's budget): the characters of the prompt and the system instruction / 4."""
        return (len(prompt) + len(self.system_instruction or "")) / 4

    def recorded(self) -> dict[str, Any]:
        """The settings that shape the records, kept in the manifest: a resumed run must use the
        same ones. Settings that only shape the run (workers, rpm, shard size, ...) are not here."""
        return {name: getattr(self, name) for name in RECORDED_SETTINGS}


def make_parser() -> argparse.ArgumentParser:
    """A flag for each Config field, its dest the field's name."""
    parser = _Parser(prog="pipeline.py", description=__doc__, formatter_class=HelpFormatter)
    add_flags(parser, Config)
    return parser


def run_cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Other libraries stay at WARNING: an HTTP client's INFO lines could show request details. force:
    # each call logs to the stderr of its moment (a test may run several in one process).
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", handlers=[LineHandler()], force=True)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.seed is not None:
        random.seed(args.seed)

    async def run() -> int:
        shutdown = Shutdown()
        with signals_handled(shutdown):
            config = config_from(Config, args)
            client = make_client(
                offline=config.offline, fake_latency_s=config.fake_latency_s,
                fake_failure_rate=config.fake_failure_rate, request_timeout_s=config.attempt_timeout_s,
                connections=config.workers, batch_api=config.batch_api or config.batch_cancel,
            )  # fmt: skip
            if config.poll_interval_s == POLL_INTERVAL_S and isinstance(client, SimulatedClient):
                config = dataclasses.replace(config, poll_interval_s=SIMULATED_POLL_INTERVAL_S)
            try:
                return await main(config, client, shutdown=shutdown)
            finally:
                if isinstance(client, genai.Client):
                    await client.aio.aclose()  # the kept-alive connections

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(run_cli())
