"""An async request batcher for Gemini embeddings.

Inputs stream in; a Batcher groups them by size or timeout; batches go to the
Gemini embed_content API, several calls at a time; results reach a logger.

    python batcher.py                      # offline: a simulated client, no key needed
    GEMINI_API_KEY=... python batcher.py   # the real API through genai.Client()
    python batcher.py --help               # every flag

The stages, in order, joined by bounded asyncio queues and ended by a None sentinel:

    enqueue_inputs -> Batcher.batch -> embed_content -> log_outputs

Application code that wants one embedding per await uses BatchedEmbedder instead:

    async with BatchedEmbedder(client, batch_size=32, timeout=timedelta(milliseconds=20)) as e:
        embedding = await e.embed("some text")
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeAlias, TypeVar

from google import genai
from google.genai import errors, types

log = logging.getLogger("batcher")

MAX_BATCH_SIZE = 100  # the API rejects more than 100 texts in one call
QUEUE_SIZE = 256  # bound of every queue: backpressure instead of unbounded memory
TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})
# Permanent errors about the request's content: splitting the batch isolates the bad text.
# Others (401, 403, 404: the key or the model) fail every text alike, so they are not split.
BISECT_CODES = frozenset({400, 413, 422})
# Adaptive mode flushes a partial batch once the expected number of further
# arrivals before its deadline (rate x time left) falls below this.
ADAPTIVE_EPSILON = 0.03
ADAPTIVE_ALPHA = 0.1  # weight of the newest gap in the moving average

T = TypeVar("T")
Input: TypeAlias = str
InputBatch: TypeAlias = list[Input]
# A failed item travels as (content, error) instead of (content, embedding).
Output: TypeAlias = tuple[Input, "types.ContentEmbedding | Exception"]
Client: TypeAlias = Any  # genai.Client or SimulatedClient: both have .aio.models.embed_content


# --- Records ---------------------------------------------------------------------------


@dataclass
class BatchCounts:
    """How the batches left the Batcher. (Counted with one addition per full batch.)"""

    batch_size: int
    full: int = 0
    timed_out: int = 0
    flushed_at_end: int = 0
    items_in_partial_batches: int = 0

    @property
    def batches(self) -> int:
        return self.full + self.timed_out + self.flushed_at_end

    @property
    def items(self) -> int:
        return self.full * self.batch_size + self.items_in_partial_batches


@dataclass
class RunStats:
    """What the logger saw, and when each input arrived (for latency)."""

    arrived_at: dict[Input, float] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0


# --- Faults and retries ----------------------------------------------------------------


def is_transient(exc: BaseException) -> bool:
    """429, 408 and 5xx API errors, and connection errors, are worth another try."""
    if isinstance(exc, errors.APIError):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    # httpx / httpx2 / aiohttp connection errors, matched by name so no transport is imported.
    names = {cls.__name__ for cls in type(exc).__mro__}
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
    return f"{type(exc).__name__}: {exc}"


class Retrier:
    """Runs API calls with retries, and counts calls and retries.

    Transient errors are retried with exponential backoff and full jitter, up to
    max_attempts calls in all. When the server names a delay, no call through this
    Retrier starts before it has passed: all concurrent calls pause, not just the
    one that was told. Other errors are raised at once.
    """

    def __init__(self, *, max_attempts: int = 5, base_delay_s: float = 0.5, max_delay_s: float = 30.0) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.calls = 0
        self.retries = 0
        self._paused_until = 0.0  # loop time before which no call may start

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.max_attempts + 1):
            # A loop, not one sleep: another call may extend the pause while we wait.
            while (pause_s := self._paused_until - loop.time()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(pause_s)
            self.calls += 1
            try:
                return await fn()
            except Exception as exc:
                if not is_transient(exc) or attempt == self.max_attempts:
                    raise
                if (delay_s := server_retry_delay_s(exc)) is not None:
                    self._paused_until = max(self._paused_until, loop.time() + delay_s)
                backoff_s = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
                log.warning("retrying after %s (attempt %d)", describe(exc), attempt)
                self.retries += 1
                await asyncio.sleep(random.uniform(0, backoff_s))
        raise AssertionError("unreachable")


async def embed_batch(
    client: Client,
    texts: list[str],
    *,
    retrier: Retrier,
    model: str = "gemini-embedding-001",
    dimensions: int | None = 3,
) -> list[types.ContentEmbedding | Exception]:
    """Embeds texts in one call; returns an embedding or an error per text, in order.

    A permanent error on the content (400, 413, 422) is bisected, so only the bad texts
    fail: one bad text in 100 costs at most 2*ceil(log2(100)) more calls.
    """
    config = types.EmbedContentConfig(output_dimensionality=dimensions)
    try:
        response = await retrier.call(
            lambda: client.aio.models.embed_content(model=model, contents=texts, config=config)
        )
        embeddings = response.embeddings or []
        if len(embeddings) != len(texts):
            raise ValueError(f"{len(embeddings)} embeddings returned for {len(texts)} texts")
        return list(embeddings)
    except errors.APIError as exc:
        if exc.code not in BISECT_CODES or len(texts) == 1:
            return [exc] * len(texts)
    except Exception as exc:
        if not is_transient(exc) and not isinstance(exc, ValueError):
            raise  # a bug, not a fault of this batch: let it surface
        return [exc] * len(texts)
    middle = len(texts) // 2
    left = await embed_batch(client, texts[:middle], retrier=retrier, model=model, dimensions=dimensions)
    right = await embed_batch(client, texts[middle:], retrier=retrier, model=model, dimensions=dimensions)
    return left + right


# --- The simulated client --------------------------------------------------------------


class SimulatedClient:
    """Stands in for genai.Client offline: client.aio.models.embed_content returns a
    real types.EmbedContentResponse with deterministic vectors after latency_s."""

    def __init__(self, *, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.aio = self  # so client.aio.models.embed_content works as on genai.Client
        self.models = self

    async def embed_content(
        self, *, model: str, contents: list[str], config: types.EmbedContentConfig | None = None
    ) -> types.EmbedContentResponse:
        if len(contents) > MAX_BATCH_SIZE:
            message = f"* BatchEmbedContentsRequest.requests: at most {MAX_BATCH_SIZE} requests can be in one batch"
            raise errors.ClientError(400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})
        await asyncio.sleep(self.latency_s)
        dimensions = (config.output_dimensionality if config else None) or 3
        return types.EmbedContentResponse(
            embeddings=[types.ContentEmbedding(values=fake_vector(text, dimensions)) for text in contents]
        )


def fake_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic vector in [-1, 1] for a text: the same text, the same vector, every run."""
    rng = random.Random(text)  # seeded from the text (via SHA-512), not from the global state
    return [round(rng.uniform(-1, 1), 6) for _ in range(dimensions)]


def make_client(*, offline: bool, fake_latency_s: float) -> Client:
    """genai.Client() when a key is set (it honours GOOGLE_GEMINI_BASE_URL), else a simulation.

    The SDK's own retries are turned off: they ignore the server's retry delay, and ours don't.
    """
    has_key = bool(os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY"))
    if offline or not has_key:
        reason = "--offline" if offline else "no GEMINI_API_KEY"
        print(f"batcher: {reason}: using the simulated client (latency {fake_latency_s}s)", file=sys.stderr)
        return SimulatedClient(latency_s=fake_latency_s)
    options = types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(http_options=options)


# --- Stage 1: the input enqueuer --------------------------------------------------------


async def enqueue_inputs(
    input_queue: asyncio.Queue[Input | None],
    *,
    num_inputs: int = 100,
    max_delay_s: float = 0.3,
    stats: RunStats | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Puts input-0, input-1, ... with random gaps, then the None sentinel.

    Stops early, still sending the sentinel, when stop is set (Ctrl-C).
    """
    loop = asyncio.get_running_loop()
    for i in range(num_inputs):
        if stop is not None and stop.is_set():
            break
        content = f"input-{i}"
        if stats is not None:
            stats.arrived_at[content] = loop.time()
        await input_queue.put(content)
        await asyncio.sleep(random.uniform(0, max_delay_s))
    await input_queue.put(None)
    log.info("All inputs enqueued.")


# --- Stage 2: the batcher ---------------------------------------------------------------


class Batcher(Generic[T]):
    """Groups items from an input queue into batches on a batch queue.

    A batch leaves when it holds batch_size items, or when timeout has passed since its
    first item arrived. While idle the batcher waits for an item with no timer running.
    Items already waiting are taken with get_nowait(): no timer and no task per item.
    The None sentinel flushes the partial batch and is passed on. No batch is empty,
    and items keep their arrival order.

    With adaptive=True a partial batch also leaves early once the observed arrival
    rate says another item is unlikely (expected < ADAPTIVE_EPSILON) before the deadline.
    """

    def __init__(self, batch_size: int, timeout: timedelta, *, adaptive: bool = False) -> None:
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}")
        if timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._batch_size = batch_size
        self._timeout_s = timeout.total_seconds()
        self._adaptive = adaptive
        self._mean_gap_s: float | None = None  # moving average of inter-arrival gaps
        self._last_arrival = 0.0
        self.counts = BatchCounts(batch_size)

    async def batch(self, input_queue: asyncio.Queue[T | None], batch_queue: asyncio.Queue[list[T] | None]) -> None:
        loop = asyncio.get_running_loop()
        # The hot loop's names, looked up once.
        size, adaptive, counts, get_nowait = self._batch_size, self._adaptive, self.counts, input_queue.get_nowait
        verbose = log.isEnabledFor(logging.INFO)
        ended = False
        while not ended:
            try:
                item = get_nowait()
            except asyncio.QueueEmpty:
                item = await input_queue.get()  # idle: sleep until an item comes, no timer
            if item is None:
                break
            if adaptive:
                self._observe_arrival(loop.time())
            batch = [item]
            deadline = None  # the clock is read only if we must wait
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

            if len(batch) == size:
                counts.full += 1
            else:
                counts.items_in_partial_batches += len(batch)
                if ended:
                    counts.flushed_at_end += 1
                else:
                    counts.timed_out += 1
            if verbose:
                log.info(
                    "batch of %d left (%s)", len(batch), "full" if len(batch) == size else "end" if ended else "timeout"
                )
            try:
                batch_queue.put_nowait(batch)
            except asyncio.QueueFull:
                await batch_queue.put(batch)  # backpressure: wait for the embed stage
        await batch_queue.put(None)  # pass the sentinel on

    def _observe_arrival(self, now: float) -> None:
        if self._last_arrival:
            gap_s = now - self._last_arrival
            mean = self._mean_gap_s
            self._mean_gap_s = gap_s if mean is None else mean + ADAPTIVE_ALPHA * (gap_s - mean)
        self._last_arrival = now

    def _flush_at(self, deadline: float) -> float:
        """When the partial batch leaves if nothing more comes."""
        if self._adaptive and self._mean_gap_s is not None:
            # rate * time_left < EPSILON  <=>  time_left < EPSILON * mean_gap
            return deadline - ADAPTIVE_EPSILON * self._mean_gap_s
        return deadline


# --- Stage 3: the embedding generator ---------------------------------------------------


async def embed_content(
    client: Client,
    batch_queue: asyncio.Queue[InputBatch | None],
    output_queue: asyncio.Queue[Output | None],
    *,
    concurrency: int = 4,
    model: str = "gemini-embedding-001",
    dimensions: int | None = 3,
    retrier: Retrier | None = None,
) -> None:
    """Embeds each batch, up to `concurrency` calls in flight, and puts one
    (content, embedding) or (content, error) pair per item on the output queue."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    retrier = retrier or Retrier()

    async def worker() -> None:
        while (batch := await batch_queue.get()) is not None:
            results = await embed_batch(client, batch, retrier=retrier, model=model, dimensions=dimensions)
            for pair in zip(batch, results, strict=True):
                await output_queue.put(pair)
        batch_queue.put_nowait(None)  # the slot we just emptied: wake the next worker

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    await output_queue.put(None)


# --- Stage 4: the output logger ---------------------------------------------------------


async def log_outputs(
    output_queue: asyncio.Queue[Output | None], *, stats: RunStats | None = None, quiet: bool = False
) -> None:
    """Prints one line per item until the sentinel, and records latency and outcome."""
    loop = asyncio.get_running_loop()
    stats = stats if stats is not None else RunStats()
    while (output := await output_queue.get()) is not None:
        content, result = output
        if (arrived := stats.arrived_at.pop(content, None)) is not None:
            stats.latencies_s.append(loop.time() - arrived)
        if isinstance(result, Exception):
            stats.failed += 1
            if not quiet:
                print(f"Failed: {content} -> {describe(result)}")
        else:
            stats.succeeded += 1
            if not quiet:
                print(f"Content: {content} -> Embedding: {result.values}")


# --- The per-caller API -----------------------------------------------------------------


@dataclass
class _Request:
    text: str
    future: asyncio.Future[types.ContentEmbedding]


class BatchedEmbedder:
    """Await one embedding per call; calls are batched underneath.

        async with BatchedEmbedder(client, batch_size=32, timeout=timedelta(milliseconds=20)) as e:
            embedding = await e.embed("some text")

    A caller whose item failed gets the error (an errors.APIError, for instance); the
    others in its batch still get their embeddings. A cancelled caller's item is
    dropped from its batch if the batch has not been sent yet.
    """

    def __init__(
        self,
        client: Client,
        *,
        batch_size: int = 8,
        timeout: timedelta = timedelta(milliseconds=50),
        concurrency: int = 4,
        model: str = "gemini-embedding-001",
        dimensions: int | None = None,
        adaptive: bool = False,
        retrier: Retrier | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._client = client
        self._batcher: Batcher[_Request] = Batcher(batch_size, timeout, adaptive=adaptive)
        self._concurrency = concurrency
        self._model = model
        self._dimensions = dimensions
        self.retrier = retrier or Retrier()
        self._requests: asyncio.Queue[_Request | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._batches: asyncio.Queue[list[_Request] | None] = asyncio.Queue(maxsize=concurrency)
        self._tasks = asyncio.TaskGroup()
        self._closed = False

    async def __aenter__(self) -> BatchedEmbedder:
        await self._tasks.__aenter__()
        self._tasks.create_task(self._batcher.batch(self._requests, self._batches))
        for _ in range(self._concurrency):
            self._tasks.create_task(self._serve())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        await self._requests.put(None)  # the batcher flushes, then the workers finish
        await self._tasks.__aexit__(exc_type, exc, tb)

    async def embed(self, text: str) -> types.ContentEmbedding:
        if self._closed:
            raise RuntimeError("BatchedEmbedder is closed")
        future: asyncio.Future[types.ContentEmbedding] = asyncio.get_running_loop().create_future()
        await self._requests.put(_Request(text, future))
        return await future  # a cancelled caller cancels its future too

    async def _serve(self) -> None:
        while (batch := await self._batches.get()) is not None:
            live = [request for request in batch if not request.future.done()]
            if not live:
                continue
            texts = [request.text for request in live]
            results = await embed_batch(
                self._client, texts, retrier=self.retrier, model=self._model, dimensions=self._dimensions
            )
            for request, result in zip(live, results, strict=True):
                if request.future.done():  # cancelled while in flight
                    continue
                if isinstance(result, Exception):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)
        self._batches.put_nowait(None)


# --- main -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (0..100) of values; 0.0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(counts: BatchCounts, retrier: Retrier, stats: RunStats, wall_s: float) -> str:
    lat = stats.latencies_s
    mean_batch = counts.items / counts.batches if counts.batches else 0.0
    return (
        f"Summary: {counts.items} items in {counts.batches} batches "
        f"({counts.full} full, {counts.timed_out} timed out, {counts.flushed_at_end} flushed at end)\n"
        f"  mean batch size {mean_batch:.2f}, {retrier.calls} API calls, {retrier.retries} retries, "
        f"{stats.failed} failed items\n"
        f"  item latency p50 {percentile(lat, 50):.3f}s, p99 {percentile(lat, 99):.3f}s, "
        f"max {max(lat, default=0.0):.3f}s; wall time {wall_s:.2f}s"
    )


async def main(
    *,
    num_inputs: int = 100,
    batch_size: int = 8,
    timeout_s: float = 1.0,
    input_delay_s: float = 0.3,
    concurrency: int = 4,
    max_attempts: int = 5,
    dimensions: int = 3,
    model: str = "gemini-embedding-001",
    adaptive: bool = False,
    offline: bool = False,
    fake_latency_s: float = 0.2,
    quiet: bool = False,
    client: Client | None = None,
) -> int:
    """Runs the four stages; returns the exit status (0 all embedded, 1 some failed, 130 interrupted)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    client = client or make_client(offline=offline, fake_latency_s=fake_latency_s)
    batcher: Batcher[Input] = Batcher(batch_size=batch_size, timeout=timedelta(seconds=timeout_s), adaptive=adaptive)
    retrier = Retrier(max_attempts=max_attempts)
    stats = RunStats()
    input_queue: asyncio.Queue[Input | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
    batch_queue: asyncio.Queue[InputBatch | None] = asyncio.Queue(maxsize=concurrency)
    output_queue: asyncio.Queue[Output | None] = asyncio.Queue(maxsize=QUEUE_SIZE)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # signal handlers can only be set there
        loop.add_signal_handler(signal.SIGINT, on_interrupt, stop)
    started = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                enqueue_inputs(input_queue, num_inputs=num_inputs, max_delay_s=input_delay_s, stats=stats, stop=stop)
            )
            tg.create_task(batcher.batch(input_queue, batch_queue))
            tg.create_task(
                embed_content(
                    client,
                    batch_queue,
                    output_queue,
                    concurrency=concurrency,
                    model=model,
                    dimensions=dimensions,
                    retrier=retrier,
                )
            )
            tg.create_task(log_outputs(output_queue, stats=stats, quiet=quiet))
    finally:
        if in_main_thread:
            loop.remove_signal_handler(signal.SIGINT)
    print(summary(batcher.counts, retrier, stats, time.perf_counter() - started))
    if stop.is_set():
        return 130
    return 1 if stats.failed else 0


def on_interrupt(stop: asyncio.Event) -> None:
    """First Ctrl-C: stop enqueuing and drain what is in flight. Second: exit at once."""
    if stop.is_set():
        sys.stdout.flush()
        os._exit(130)
    print("batcher: interrupted: draining what is in flight (Ctrl-C again to quit now)", file=sys.stderr)
    stop.set()


# --- CLI --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the problem, exit status 2 (argparse's default adds the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ranged(
    kind: Callable[[str], Any], low: float, high: float = math.inf, *, strict_low: bool = False
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        too_low = value <= low if strict_low else value < low
        if too_low or value > high or (isinstance(value, float) and not math.isfinite(value)):
            bound = f"> {low}" if strict_low else f">= {low}" if high == math.inf else f"{low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="batcher.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-inputs", type=_ranged(int, 0), default=100, help="inputs to enqueue (default 100)")
    parser.add_argument("--batch-size", type=_ranged(int, 1, MAX_BATCH_SIZE), default=8, help="1..100 (default 8)")
    parser.add_argument(
        "--timeout",
        type=_ranged(float, 0, strict_low=True),
        default=1.0,
        help="seconds from a batch's first item (default 1.0)",
    )
    parser.add_argument(
        "--input-delay",
        type=_ranged(float, 0),
        default=0.3,
        help="max random gap between inputs, seconds (default 0.3)",
    )
    parser.add_argument("--concurrency", type=_ranged(int, 1), default=4, help="API calls in flight (default 4)")
    parser.add_argument(
        "--max-attempts", type=_ranged(int, 1), default=5, help="calls per batch, retries included (default 5)"
    )
    parser.add_argument("--dimensions", type=_ranged(int, 1), default=3, help="output_dimensionality (default 3)")
    parser.add_argument(
        "--model", default="gemini-embedding-001", help="embedding model (default gemini-embedding-001)"
    )
    parser.add_argument("--adaptive", action="store_true", help="flush partial batches early when arrivals are slow")
    parser.add_argument("--offline", action="store_true", help="use the simulated client even with a key")
    parser.add_argument(
        "--fake-latency", type=_ranged(float, 0), default=0.2, help="simulated API latency, seconds (default 0.2)"
    )
    parser.add_argument("--seed", type=int, help="random seed, for repeatable runs")
    parser.add_argument("--quiet", action="store_true", help="no per-item lines, only the summary")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    # Other libraries stay at WARNING: an HTTP client's INFO lines could show request details.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.seed is not None:
        random.seed(args.seed)
    sys.exit(
        asyncio.run(
            main(
                num_inputs=args.num_inputs,
                batch_size=args.batch_size,
                timeout_s=args.timeout,
                input_delay_s=args.input_delay,
                concurrency=args.concurrency,
                max_attempts=args.max_attempts,
                dimensions=args.dimensions,
                model=args.model,
                adaptive=args.adaptive,
                offline=args.offline,
                fake_latency_s=args.fake_latency,
                quiet=args.quiet,
            )
        )
    )
