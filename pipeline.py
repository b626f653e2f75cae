"""A concurrent LLM data pipeline: prompts from sharded files, through Gemini, to sharded JSONL.

    ./make_inputs.sh && python pipeline.py        # offline: a simulated model, no key needed
    GEMINI_API_KEY=... python pipeline.py         # the real API through genai.Client()
    python pipeline.py --help                     # every flag

The stages, in order, joined by bounded asyncio queues and ended by None sentinels:

    read_inputs (x readers) -> generate_content (x workers) -> write_outputs (x writers)
                      \\_________________________________________-> write_errors

Every prompt ends exactly once in outputs/shard_NNNNN.jsonl or outputs/errors.jsonl, even
across crashes: a re-run skips the ids already written and carries on where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeAlias, TypeVar

import aiofiles
from google import genai
from google.genai import errors, types

log = logging.getLogger("pipeline")

CHUNK_BYTES = 1 << 20  # the reader reads this much at a time, not a line at a time
MAX_WRITE_BATCH = 1000  # records a writer takes from its queue for one write + flush
GRACE_S = 5.0  # after Ctrl-C, calls in flight get this long before they are abandoned
# The SDK sends requests with no timeout at all, so one unanswered call would hang a run. A long
# answer with thinking can take a few minutes: 300 s leaves room for that and still ends a hang.
REQUEST_TIMEOUT_S = 300.0
PROGRESS_EVERY_S = 30.0  # off a terminal (nohup, CI logs), a plain progress line this often
LOCK_NAME = ".lock"
SHARD_NAME = "shard_{:05d}.jsonl"
SHARD_RE = re.compile(r"shard_(\d+)\.jsonl")
ERRORS_NAME = "errors.jsonl"
TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")
Client: TypeAlias = Any  # genai.Client or SimulatedClient: both have .aio.models.generate_content


class UsageError(Exception):
    """Bad flags or bad input: reported in one line, exit status 2."""


class MalformedReply(Exception):
    """A reply we cannot use (not JSON, the wrong shape, no answer): retried like a 503."""


class Blocked(Exception):
    """The model declined the prompt (a safety block and the like): permanent for this prompt."""


# --- Records ----------------------------------------------------------------------------


# (id, text). The id is "<file name>:<line number>", stable across runs. A plain tuple, not a
# dataclass: the reader makes a million a second, and a tuple costs a fifth as much to make.
Prompt: TypeAlias = tuple[str, str]


@dataclass(slots=True)
class Result:
    """One prompt's outcome. response is set on success, error on failure."""

    id: str
    prompt: str
    response: str | None = None
    error: str | None = None
    attempts: int = 0
    word_count: int | None = None
    finish_reason: str | None = None  # set when the answer stopped for another reason than STOP

    def json_line(self) -> str:
        if self.error is not None:
            record: dict[str, Any] = {
                "id": self.id,
                "prompt": self.prompt,
                "error": self.error,
                "attempts": self.attempts,
            }
        else:
            record = {"id": self.id, "prompt": self.prompt, "response": self.response}
            if self.finish_reason is not None:
                record["finish_reason"] = self.finish_reason
            if self.word_count is not None:
                record["word_count"] = self.word_count
        return json.dumps(record, ensure_ascii=False) + "\n"


@dataclass
class Stats:
    read: int = 0  # non-blank lines found, skipped ones included
    skipped: int = 0  # already done in an earlier run
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    in_flight: int = 0  # prompts in a worker's hands
    started: float = field(default_factory=time.perf_counter)

    def progress(self) -> str:
        done, elapsed = self.succeeded + self.failed, time.perf_counter() - self.started
        rate = done / elapsed if elapsed else 0.0
        return f"{done} done, {self.failed} failed, {self.in_flight} in flight, {rate:.0f}/s"

    def summary(self, errors_held: int) -> str:
        wall_s = time.perf_counter() - self.started
        done = self.succeeded + self.failed
        return (
            f"Summary: {self.read} prompts read, {self.skipped} skipped (already done), "
            f"{self.succeeded} succeeded, {self.failed} failed, {self.retries} retries\n"
            f"  wall time {wall_s:.2f}s, {done / wall_s if wall_s else 0:.0f} prompts/s; "
            f"{errors_held} failed prompts in {ERRORS_NAME}"
        )


# --- Faults, pacing and shutdown ----------------------------------------------------------


def is_transient(exc: BaseException) -> bool:
    """429, 408 and 5xx API errors, timeouts, connection errors and malformed replies are
    worth another try."""
    if isinstance(exc, errors.APIError):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, (OSError, TimeoutError, MalformedReply)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}  # httpx, httpx2, aiohttp, unimported
    return bool(names & {"TransportError", "TimeoutException", "ClientConnectionError"})


def server_retry_delay_s(exc: BaseException) -> float | None:
    """The delay the server asked for: google.rpc.RetryInfo in the body, or Retry-After."""
    if not isinstance(exc, errors.APIError):
        return None
    body = exc.details.get("error", exc.details) if isinstance(exc.details, dict) else None
    details = body.get("details") if isinstance(body, dict) else None
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            match = re.fullmatch(r"\s*([0-9.]+)s\s*", str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    headers = getattr(exc.response, "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: rare for this API; fall back to our own backoff
        return None


def describe(exc: BaseException) -> str:
    """One line naming an error: the API's code, status and message, or the type."""
    if isinstance(exc, errors.APIError):
        return f"{exc.code} {exc.status or ''}: {exc.message or ''}".strip()
    if isinstance(exc, (TimeoutError, Blocked)) and str(exc):
        return str(exc)  # "timed out after 300 s", "blocked: SAFETY"
    return f"{type(exc).__name__}: {exc}"


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


class Gate:
    """Where every worker waits before each call.

    A delay named by the server pauses all workers, not just the one that was told.
    With rpm, call starts are spaced 60/rpm seconds apart across all workers: smooth,
    with no burst at start.
    """

    def __init__(self, *, rpm: float | None = None) -> None:
        self._interval_s = 60.0 / rpm if rpm else 0.0
        self._next_start = 0.0
        self._paused_until = 0.0

    def pause(self, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + delay_s)

    async def wait_turn(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A loop, not one sleep: another worker may extend the pause while we wait.
            while (pause_s := self._paused_until - loop.time()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(pause_s)
            if not self._interval_s:
                return
            start = max(loop.time(), self._next_start)
            self._next_start = start + self._interval_s
            await asyncio.sleep(start - loop.time())
            if self._paused_until <= loop.time():
                return


class Shutdown:
    """The first Ctrl-C or SIGTERM: readers stop, workers take no new prompt, and calls still
    in flight get grace_s to finish before they are abandoned (the next run redoes them).
    Everything completed is still written; the exit status is 128 + the signal (130, 143).
    A second signal of either kind exits at once."""

    def __init__(self, *, grace_s: float = GRACE_S) -> None:
        self.signal: int | None = None
        self._grace_s = grace_s
        self._in_flight: set[asyncio.Timeout] = set()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        if self.signal is not None:
            sys.stdout.flush()
            os._exit(128 + signum)
        name = signal.Signals(signum).name
        print(f"pipeline: interrupted ({name}): finishing calls in flight (Ctrl-C again to quit now)", file=sys.stderr)
        self.signal = signum
        deadline = asyncio.get_running_loop().time() + self._grace_s
        for timeout in self._in_flight:
            timeout.reschedule(deadline)

    @contextlib.asynccontextmanager
    async def abandonable(self) -> AsyncIterator[asyncio.Timeout]:
        async with asyncio.timeout(None) as timeout:
            self._in_flight.add(timeout)
            try:
                yield timeout
            finally:
                self._in_flight.discard(timeout)


@contextlib.contextmanager
def signals_handled(shutdown: Shutdown) -> Iterator[None]:
    """SIGINT and SIGTERM call shutdown.request while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, shutdown.request, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


# --- The simulated client -----------------------------------------------------------------


class SimulatedClient:
    """Stands in for genai.Client offline: client.aio.models.generate_content returns a real
    types.GenerateContentResponse after latency_s. "What is two times N?" is answered 2N.
    With failure_rate, that share of calls fails with a transient 503."""

    def __init__(self, *, latency_s: float = 0.0, failure_rate: float = 0.0) -> None:
        self.latency_s = latency_s
        self.failure_rate = failure_rate
        self.aio = self  # so client.aio.models.generate_content works as on genai.Client
        self.models = self

    async def generate_content(self, *, model: str, contents: str, config: Any = None) -> types.GenerateContentResponse:
        await asyncio.sleep(self.latency_s)
        if self.failure_rate and random.random() < self.failure_rate:
            raise errors.ServerError(503, {"error": {"code": 503, "message": "simulated", "status": "UNAVAILABLE"}})
        match = re.fullmatch(r"What is two times (-?\d+)\?", contents)
        text = str(2 * int(match.group(1))) if match else f"A simulated answer to: {contents}"
        # Validated from a dict, as the SDK does with the API's JSON (twice as fast as nested constructors).
        candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "finish_reason": "STOP"}
        return types.GenerateContentResponse.model_validate({"candidates": [candidate]})


def make_client(
    *, offline: bool, fake_latency_s: float, fake_failure_rate: float, request_timeout_s: float = REQUEST_TIMEOUT_S
) -> Client:
    """genai.Client() when a key is set (it honours GOOGLE_GEMINI_BASE_URL), else a simulation.

    The SDK's own retries are turned off: they ignore the server's retry delay, and ours don't.
    Its timeout (none by default) is set too, so a hung connection is closed, not just abandoned.
    """
    has_key = bool(os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY"))
    if offline or not has_key:
        reason = "--offline" if offline else "no GEMINI_API_KEY"
        print(f"pipeline: {reason}: using the simulated model (latency {fake_latency_s}s)", file=sys.stderr)
        return SimulatedClient(latency_s=fake_latency_s, failure_rate=fake_failure_rate)
    options = types.HttpOptions(
        retry_options=types.HttpRetryOptions(attempts=1), timeout=math.ceil(request_timeout_s * 1000)
    )
    return genai.Client(http_options=options)


# --- Stage 1: the input readers -------------------------------------------------------------


def input_files(input_dir: Path) -> list[Path]:
    """The *.txt files of the input folder, in name order."""
    return sorted(path for path in input_dir.glob("*.txt") if path.is_file())


@contextlib.asynccontextmanager
async def open_file(path: Path, mode: Literal["rb", "ab", "xb"]) -> AsyncIterator[Any]:
    """aiofiles.open, safe to cancel. aiofiles opens the file in a worker thread; a task
    cancelled meanwhile would never receive it, and the descriptor would leak (a
    ResourceWarning at best). So the open is shielded, and when the caller is cancelled
    the file is closed as soon as the thread hands it over, before the cancellation goes on."""
    opening = asyncio.ensure_future(aiofiles.open(path, mode))
    try:
        f = await asyncio.shield(opening)
    except asyncio.CancelledError:
        while not opening.done():  # the thread cannot be stopped: wait for it (an open is quick)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(opening)
        if not opening.cancelled() and opening.exception() is None:
            await opening.result().close()
        raise
    try:
        yield f
    finally:
        await f.close()  # a thread hop: even if we are cancelled here, the thread closes it


async def read_blocks(path: Path) -> AsyncIterator[bytes]:
    """The file in blocks of whole lines, about CHUNK_BYTES each, without the last newline,
    through aiofiles: one thread hop per chunk, not per line."""
    async with open_file(path, "rb") as f:
        tail = b""
        while chunk := await f.read(CHUNK_BYTES):
            data = tail + chunk
            cut = data.rfind(b"\n")
            if cut < 0:  # a line longer than a chunk: read on
                tail = data
                continue
            yield data[:cut]
            tail = data[cut + 1 :]
        if tail:
            yield tail


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


async def read_inputs(
    input_dir: Path,
    input_queue: asyncio.Queue[Prompt | None],
    *,
    files: list[Path] | None = None,
    skip: Collection[str] = frozenset(),
    error_queue: asyncio.Queue[Result | None] | None = None,
    stats: Stats | None = None,
    shutdown: Shutdown | None = None,
) -> None:
    """Puts one Prompt per non-blank line of each *.txt file (or of `files`), in name order.

    Ids in `skip` (done in an earlier run) are passed over. An undecodable line goes to
    error_queue as a failure, and reading goes on. Stops early on a shutdown request.
    Puts no sentinel: the caller does, once every reader is done.
    """
    stats, shutdown = stats or Stats(), shutdown or Shutdown()
    if files is None:
        files = input_files(input_dir)  # a directory listing, once
    for path in files:
        name, number = path.name, 0
        async with contextlib.aclosing(read_blocks(path)) as blocks:  # type: ignore[type-var]
            async for block in blocks:
                if shutdown.requested:
                    return
                lines, bad = decode_lines(block, number + 1)
                blank = skipped = 0  # counted here, added to stats once per block
                for number, text in enumerate(map(str.strip, lines), number + 1):  # noqa: B020 (number carries on)
                    if not text:
                        blank += 1
                        continue
                    prompt_id = f"{name}:{number}"
                    if skip and prompt_id in skip:
                        skipped += 1
                    elif bad and number in bad:
                        log.warning("%s: %s", prompt_id, bad[number])
                        if error_queue is not None:
                            await error_queue.put(Result(prompt_id, text, error=bad[number]))
                    else:
                        try:
                            input_queue.put_nowait((prompt_id, text))
                        except asyncio.QueueFull:
                            await input_queue.put((prompt_id, text))  # backpressure: wait for the workers
                stats.read += len(lines) - blank
                stats.skipped += skipped


# --- Stage 2: the content generators ----------------------------------------------------------


# Finish reasons of an answer that was withheld, not merely cut short.
BLOCKED_REASONS = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})


async def request_answer(client: Client, text: str, *, model: str) -> tuple[str, str | None]:
    """One generate_content call: the answer's text, and its finish reason when that is not
    STOP (MAX_TOKENS, say: the text is kept, cut short). Raises Blocked for a blocked prompt
    or answer, MalformedReply for a reply with no usable answer."""
    try:
        response = await client.aio.models.generate_content(model=model, contents=text)
    except ValueError as exc:  # the SDK could not parse the body (not JSON, or a field of the wrong type)
        raise MalformedReply(f"unreadable reply: {exc}") from exc
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        raise Blocked(f"blocked: {feedback.block_reason.name}")
    candidate = response.candidates[0] if response.candidates else None
    reason = candidate.finish_reason.name if candidate is not None and candidate.finish_reason else None
    answer = response.text if candidate is not None else None
    if reason in BLOCKED_REASONS:
        raise Blocked(f"blocked: {reason}")
    if answer is None:
        if reason not in (None, "STOP", "FINISH_REASON_UNSPECIFIED"):
            raise Blocked(f"no answer: finish reason {reason}")  # e.g. MAX_TOKENS spent on thinking
        raise MalformedReply("no answer in the reply")
    return answer, reason if reason not in (None, "STOP") else None


async def generate_one(
    client: Client,
    prompt_id: str,
    text: str,
    *,
    model: str,
    gate: Gate,
    max_attempts: int,
    request_timeout_s: float,
    base_delay_s: float,
    stats: Stats,
) -> Result:
    """Calls the model for one prompt, each attempt bounded by request_timeout_s, retrying
    transient errors; failures come back as data."""
    for attempt in range(1, max_attempts + 1):
        await gate.wait_turn()
        try:
            answer, reason = await bounded(request_answer(client, text, model=model), request_timeout_s)
            return Result(prompt_id, text, response=answer, attempts=attempt, finish_reason=reason)
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, (errors.APIError, Blocked))):
                raise  # a bug, not a fault of this prompt: let it surface
            if not is_transient(exc) or attempt == max_attempts:
                return Result(prompt_id, text, error=describe(exc), attempts=attempt)
            if (delay_s := server_retry_delay_s(exc)) is not None:
                gate.pause(delay_s)
            stats.retries += 1
            log.info("%s: retrying after %s", prompt_id, describe(exc))
            await asyncio.sleep(random.uniform(0, min(30.0, base_delay_s * 2 ** (attempt - 1))))
    raise AssertionError("unreachable")


def count_words(text: str) -> int:
    """CPU work for the process pool (the document's Going Further)."""
    return len(text.split())


async def generate_content(
    client: Client,
    input_queue: asyncio.Queue[Prompt | None],
    output_queue: asyncio.Queue[Result | None],
    *,
    error_queue: asyncio.Queue[Result | None] | None = None,
    model: str = "gemini-flash-latest",
    gate: Gate | None = None,
    max_attempts: int = 5,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    base_delay_s: float = 0.5,
    word_count_pool: Executor | None = None,
    stats: Stats | None = None,
    shutdown: Shutdown | None = None,
) -> None:
    """One worker: takes prompts until the sentinel and puts each Result on output_queue
    (successes) or error_queue (failures; output_queue when there is none).

    After a shutdown request it takes no new prompt: the rest is left for the next run.
    """
    loop = asyncio.get_running_loop()
    gate, stats, shutdown = gate or Gate(), stats or Stats(), shutdown or Shutdown()
    while (prompt := await input_queue.get()) is not None:
        prompt_id, text = prompt
        if shutdown.requested:
            continue  # drain without calling, so the readers and the sentinel get through
        stats.in_flight += 1
        try:
            async with shutdown.abandonable():
                result = await generate_one(
                    client,
                    prompt_id,
                    text,
                    model=model,
                    gate=gate,
                    max_attempts=max_attempts,
                    request_timeout_s=request_timeout_s,
                    base_delay_s=base_delay_s,
                    stats=stats,
                )
        except TimeoutError:
            log.warning("%s: abandoned after the interrupt; the next run redoes it", prompt_id)
            continue
        finally:
            stats.in_flight -= 1
        if result.error is not None:
            await (error_queue or output_queue).put(result)
            continue
        if word_count_pool is not None:
            result.word_count = await loop.run_in_executor(word_count_pool, count_words, result.response or "")
        await output_queue.put(result)


# --- Stage 3: the output writers --------------------------------------------------------------


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


async def write_outputs(
    output_dir: Path,
    output_queue: asyncio.Queue[Result | None],
    *,
    shard_size: int = 5,
    shard_numbers: Iterator[int],
    stats: Stats,
    quiet: bool = False,
) -> None:
    """Appends records to shards of at most shard_size lines until the sentinel.

    Each writer owns the shards it starts (numbers come from the shared shard_numbers), and
    starts one only for a record, so no shard is empty. A shard stays open across batches:
    a batch costs one write and one flush (thread hops through aiofiles), not an open and a
    close. A new shard is opened with "xb", so it never overwrites a file.
    """
    async with contextlib.AsyncExitStack() as shard:
        f: Any = None
        path = output_dir
        lines_in_shard = shard_size
        while True:
            results, ended = await take_available(output_queue)
            data: list[str] = []
            for result in results:
                if lines_in_shard == shard_size:  # the shard is full, or none is started: start one
                    if f is not None:
                        await f.write("".join(data).encode())
                        data = []
                        await shard.aclose()
                    path = output_dir / SHARD_NAME.format(next(shard_numbers))
                    f, lines_in_shard = await shard.enter_async_context(open_file(path, "xb")), 0
                data.append(result.json_line())
                lines_in_shard += 1
                if not quiet:
                    log.info("wrote %s to %s", result.id, path.name)
            if data:
                await f.write("".join(data).encode())
                await f.flush()  # whole lines reach the file before we count them done
            stats.succeeded += len(results)
            if ended:
                return


async def write_errors(output_dir: Path, error_queue: asyncio.Queue[Result | None], *, stats: Stats) -> None:
    """The only task that writes errors.jsonl: appends one line per failed prompt."""
    async with open_file(output_dir / ERRORS_NAME, "ab") as f:
        while True:
            results, ended = await take_available(error_queue)
            if results:
                await f.write("".join(result.json_line() for result in results).encode())
                await f.flush()
                stats.failed += len(results)
                for result in results:
                    log.info("failed: %s -> %s", result.id, result.error)
            if ended:
                return


# --- Resume ------------------------------------------------------------------------------------


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete records of a JSONL file. A torn last line (no newline: the run was
    killed mid-write) is cut off the file; an unparsable line is skipped with a warning."""
    offset = 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                log.warning("%s: cutting off a torn last line (%d bytes)", path.name, len(line))
                os.truncate(path, offset)
                return
            offset += len(line)
            try:
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    yield record
                    continue
            except ValueError:
                pass
            log.warning("%s: skipping an unreadable line at byte %d", path.name, offset - len(line))


def scan_outputs(output_dir: Path) -> tuple[set[str], int]:
    """The ids already written to shards, and the next shard number."""
    done: set[str] = set()
    next_shard = 0
    for path in output_dir.glob("shard_*.jsonl"):
        if match := SHARD_RE.fullmatch(path.name):
            next_shard = max(next_shard, int(match.group(1)) + 1)
            done.update(record["id"] for record in read_records(path))
    return done, next_shard


def compact_errors(output_dir: Path, done: Collection[str]) -> set[str]:
    """Rewrites errors.jsonl (atomically) with one record per failed id, the latest, and
    none for ids that have since succeeded. Returns the failed ids."""
    path = output_dir / ERRORS_NAME
    if not path.exists():
        return set()
    latest = {record["id"]: record for record in read_records(path) if record["id"] not in done}
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in latest.values()]
    if path.read_text(encoding="utf-8") != "".join(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, path)
    return set(latest)


# --- main ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The pipeline's settings: one per command-line flag, checked when made."""

    inputs: Path = Path("inputs")
    outputs: Path = Path("outputs")
    workers: int = 5
    readers: int = 1
    writers: int = 1
    queue_size: int = 5
    shard_size: int = 5
    max_attempts: int = 5
    request_timeout_s: float = REQUEST_TIMEOUT_S
    base_delay_s: float = 0.5
    rpm: float | None = None
    retry_errors: bool = False
    word_count: bool = False
    model: str = "gemini-flash-latest"
    quiet: bool = False
    progress: bool = False  # a progress line on stderr: redrawn on a terminal, else every 30 s

    def __post_init__(self) -> None:
        for name in ("workers", "readers", "writers", "queue_size", "shard_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "rpm"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be > 0, got {value}")


def check_paths(config: Config) -> list[Path]:
    """The input files, after checking the input and output folders. Raises UsageError."""
    if not config.inputs.is_dir():
        raise UsageError(f"input folder not found: {config.inputs}")
    files = input_files(config.inputs)
    if not files:
        raise UsageError(f"no *.txt files in the input folder: {config.inputs}")
    try:
        config.outputs.mkdir(parents=True, exist_ok=True)
        probe = config.outputs / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output folder is not a writable folder: {config.outputs} ({exc.strerror})") from None
    return files


@contextlib.contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """An exclusive OS lock on the output folder for the whole run: a second run on it is
    refused at once. The OS releases the lock however the process ends (kill -9 too)."""
    fd = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another run is using the output folder {output_dir}") from None
        yield
    finally:
        os.close(fd)


async def close_after(stage: Awaitable[Any], queue: asyncio.Queue[Any], consumers: int) -> None:
    """Runs a stage, then puts one sentinel per consumer of its output queue."""
    await stage
    for _ in range(consumers):
        await queue.put(None)


async def all_of(coros: list[Coroutine[Any, Any, None]]) -> None:
    async with asyncio.TaskGroup() as tg:
        for coro in coros:
            tg.create_task(coro)


def count_lines(files: list[Path]) -> int:
    """Lines in all the files (for the ETA), read a chunk at a time."""
    total = 0
    for path in files:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                total += chunk.count(b"\n")
    return total


async def show_progress(stats: Stats, files: list[Path], *, tty: bool) -> None:
    """Until cancelled: on a terminal, one line redrawn 4 times a second (done, failed, in
    flight, rate, ETA); elsewhere (nohup, containers, CI logs) a plain line every
    PROGRESS_EVERY_S, so a stall shows as counts that stop moving, not as silence."""
    total = await asyncio.to_thread(count_lines, files)
    try:
        while True:
            await asyncio.sleep(0.25 if tty else PROGRESS_EVERY_S)
            done, elapsed = stats.succeeded + stats.failed, time.perf_counter() - stats.started
            left = max(0, total - stats.skipped - done)
            eta = f"{left * elapsed / done:.0f}s" if done else "?"
            if tty:
                print(f"\r{stats.progress()}, ETA {eta}   ", end="", file=sys.stderr, flush=True)
            else:
                print(f"progress: {stats.progress()}, ETA {eta}", file=sys.stderr, flush=True)
    finally:
        if tty:
            print(file=sys.stderr)


async def main(config: Config, client: Client, *, shutdown: Shutdown | None = None) -> int:
    """Runs the pipeline; returns the exit status: 0 all done, 1 some prompts failed,
    130 or 143 interrupted. Raises UsageError on bad input, or when another run holds the
    output folder."""
    files = check_paths(config)
    with locked(config.outputs):
        return await run_locked(config, client, files, shutdown=shutdown or Shutdown())


async def run_locked(config: Config, client: Client, files: list[Path], *, shutdown: Shutdown) -> int:
    done, next_shard = await asyncio.to_thread(scan_outputs, config.outputs)
    failed = await asyncio.to_thread(compact_errors, config.outputs, done)
    skip = done if config.retry_errors else done | failed
    if skip:
        log.info("resuming: %d done and %d failed in earlier runs", len(done), len(failed))

    stats, gate = Stats(), Gate(rpm=config.rpm)
    input_queue: asyncio.Queue[Prompt | None] = asyncio.Queue(maxsize=config.queue_size)
    output_queue: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=config.queue_size)
    error_queue: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=config.queue_size)
    shard_numbers = itertools.count(next_shard)
    pool = ProcessPoolExecutor(mp_context=get_context("spawn")) if config.word_count else None
    readers = [
        read_inputs(
            config.inputs,
            input_queue,
            files=files[i :: config.readers],
            skip=skip,
            error_queue=error_queue,
            stats=stats,
            shutdown=shutdown,
        )
        for i in range(config.readers)
    ]
    workers = [
        generate_content(
            client, input_queue, output_queue, error_queue=error_queue, model=config.model, gate=gate,
            max_attempts=config.max_attempts, request_timeout_s=config.request_timeout_s,
            base_delay_s=config.base_delay_s, word_count_pool=pool,
            stats=stats, shutdown=shutdown,
        )
        for _ in range(config.workers)
    ]  # fmt: skip
    writers = [
        write_outputs(
            config.outputs,
            output_queue,
            shard_size=config.shard_size,
            shard_numbers=shard_numbers,
            stats=stats,
            quiet=config.quiet,
        )
        for _ in range(config.writers)
    ]
    tty = sys.stderr.isatty()
    progress = asyncio.create_task(show_progress(stats, files, tty=tty)) if config.progress else None
    try:
        async with asyncio.TaskGroup() as tg:
            reading = tg.create_task(close_after(all_of(readers), input_queue, config.workers))
            generating = tg.create_task(close_after(all_of(workers), output_queue, config.writers))
            tg.create_task(all_of(writers))
            tg.create_task(write_errors(config.outputs, error_queue, stats=stats))
            # asyncio.wait, not gather: cancelling a gather would cancel these tasks a second
            # time, mid-cleanup (a reader closing its file), when the group shuts down on an error.
            tg.create_task(close_after(asyncio.wait([reading, generating]), error_queue, 1))
    finally:
        if progress is not None:
            progress.cancel()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if config.retry_errors:  # retried ids that succeeded leave errors.jsonl
        done, _ = await asyncio.to_thread(scan_outputs, config.outputs)
    errors_held = len(await asyncio.to_thread(compact_errors, config.outputs, done))
    print(stats.summary(errors_held))
    if shutdown.signal is not None:
        return 128 + shutdown.signal
    return 1 if errors_held else 0


# --- CLI -------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the problem, exit status 2 (argparse's default adds the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(
    kind: Callable[[str], Any], low: float, *, strict: bool = False, high: float = math.inf
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if (value <= low if strict else value < low) or value > high or not math.isfinite(value):
            bound = f"> {low}" if strict else f"{low}..{high}" if high < math.inf else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=Path, default=Path("inputs"), help="folder of *.txt prompt files (default inputs/)")
    p.add_argument(
        "--outputs", type=Path, default=Path("outputs"), help="folder for shards and errors.jsonl (default outputs/)"
    )
    p.add_argument("--workers", type=_number(int, 1), default=5, help="concurrent model calls (default 5)")
    p.add_argument("--readers", type=_number(int, 1), default=1, help="reader tasks; they split the files (default 1)")
    p.add_argument("--writers", type=_number(int, 1), default=1, help="writer tasks; each owns its shards (default 1)")
    p.add_argument("--queue-size", type=_number(int, 1), default=5, help="bound of each queue (default 5)")
    p.add_argument("--shard-size", type=_number(int, 1), default=5, help="records per output shard at most (default 5)")
    p.add_argument(
        "--max-attempts", type=_number(int, 1), default=5, help="calls per prompt, retries included (default 5)"
    )
    p.add_argument(
        "--request-timeout",
        type=_number(float, 0, strict=True),
        default=REQUEST_TIMEOUT_S,
        help=f"seconds one API attempt may take (default {REQUEST_TIMEOUT_S:g}: room for a long answer with"
        " thinking; a call never answered is cut off and retried)",
    )
    p.add_argument(
        "--rpm", type=_number(float, 0, strict=True), help="cap on call starts per minute, all workers together"
    )
    p.add_argument("--retry-errors", action="store_true", help=f"retry the prompts in {ERRORS_NAME}")
    p.add_argument("--word-count", action="store_true", help="add word_count, computed in a process pool")
    p.add_argument("--model", default="gemini-flash-latest", help="model (default gemini-flash-latest)")
    p.add_argument("--offline", action="store_true", help="use the simulated model even with a key")
    p.add_argument(
        "--fake-latency", type=_number(float, 0), default=0.1, help="simulated latency, seconds (default 0.1)"
    )
    p.add_argument("--fake-failure-rate", type=_number(float, 0, high=1), default=0.0, help="simulated 503 share, 0..1")
    p.add_argument("--seed", type=int, help="random seed, for repeatable runs")
    p.add_argument("--quiet", action="store_true", help="no progress line or per-record lines; the summary stays")
    return p.parse_args(argv)


def run_cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Other libraries stay at WARNING: an HTTP client's INFO lines could show request details.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.seed is not None:
        random.seed(args.seed)
    config = Config(
        inputs=args.inputs, outputs=args.outputs, workers=args.workers, readers=args.readers, writers=args.writers,
        queue_size=args.queue_size, shard_size=args.shard_size, max_attempts=args.max_attempts, rpm=args.rpm,
        retry_errors=args.retry_errors, word_count=args.word_count, model=args.model, quiet=args.quiet,
        progress=not args.quiet, request_timeout_s=args.request_timeout,
    )  # fmt: skip

    async def run() -> int:
        shutdown = Shutdown()
        with signals_handled(shutdown):
            check_paths(config)  # before anything else is said: bad input gets one line
            client = make_client(
                offline=args.offline,
                fake_latency_s=args.fake_latency,
                fake_failure_rate=args.fake_failure_rate,
                request_timeout_s=args.request_timeout,
            )
            return await main(config, client, shutdown=shutdown)

    try:
        return asyncio.run(run())
    except UsageError as exc:
        print(f"pipeline.py: error: {exc}", file=sys.stderr)
        return 2
    except ExceptionGroup as group:  # a stage failed; the TaskGroup stopped the others
        faults = list(leaf_exceptions(group))
        if not all(isinstance(fault, OSError) for fault in faults):
            raise  # a bug: the traceback is what helps
        for fault in faults:  # a disk or file error: say which, in one line
            print(f"pipeline.py: error: {fault}", file=sys.stderr)
        return 1


def leaf_exceptions(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaf_exceptions(exc)
        else:
            yield exc


if __name__ == "__main__":
    sys.exit(run_cli())
