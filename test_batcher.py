"""Tests for batcher.py: run with `python -m unittest`. Fakes record calls, timestamps and
peak concurrency; the only network is a tiny HTTP stub on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import io
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest
import warnings
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import aiofiles
from google import genai
from google.genai import errors, types

import batcher
from batcher import BatchedEmbedder, Batcher, Retrier, embed_content, log_outputs
from bench import run_virtual  # an event loop on a virtual clock

HERE = os.path.dirname(os.path.abspath(__file__))


def setUpModule() -> None:
    """Each genai.Client loads the CA bundle into two SSL contexts (100 ms here) that the loopback
    stubs, plain HTTP, never use: this module's clients share them, one per set of arguments."""
    shared = mock.patch.object(ssl, "create_default_context", functools.cache(ssl.create_default_context))
    shared.start()
    unittest.addModuleCleanup(shared.stop)


class Forked(subprocess.Popen):  # type: ignore[type-arg]
    """`python SCRIPT.py ARGS` as a user runs it, but forked from this process, which has imported
    the script and the SDK already: a child starts in milliseconds, not in the second that a new
    interpreter takes to import google.genai (20 children: a third of the suite's time). The child
    runs the script's run_cli(ARGS) in `cwd` with `env` on its own stdin, stdout and stderr, and
    ends as the command would: its status, or a traceback and 1. The rest is Popen's own: pipes,
    signals, communicate, wait. (It replaces Popen's fork-and-exec step, the same on Python 3.11 to
    3.13. Each file's bad-input test still starts the real command once: __main__, and no traceback.)"""

    def _execute_child(
        self, args: list[str], executable: Any, preexec_fn: Any, close_fds: Any, pass_fds: Any, cwd: Any,
        env: dict[str, str] | None, startupinfo: Any, creationflags: Any, shell: Any, p2cread: int, p2cwrite: int,
        c2pread: int, c2pwrite: int, errread: int, errwrite: int, *rest: Any,
    ) -> None:  # fmt: skip
        script, new_session = sys.modules[Path(args[1]).stem], rest[5]  # rest: ..., start_new_session, ...
        with warnings.catch_warnings():  # "multi-threaded, use of fork() may deadlock": a stub's idle server
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            status = 1
            try:
                if new_session:
                    os.setsid()
                for target, fd in enumerate((p2cread, c2pwrite, errwrite)):
                    if fd != -1:
                        os.dup2(fd, target)
                for fd in {p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite} - {-1, 0, 1, 2}:
                    os.close(fd)  # this child's pipes, but its own ends as 0, 1 and 2: EOF comes as it should
                os.chdir(cwd or ".")
                if env is not None:
                    os.environ.clear()
                    os.environ.update(env)
                sys.stdin, sys.stdout, sys.stderr = open(0), open(1, "w"), open(2, "w")  # noqa: SIM115
                status = script.run_cli(args[2:])
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        self.pid, self._child_created = pid, True
        for mine, theirs in ((p2cread, p2cwrite), (c2pwrite, c2pread), (errwrite, errread)):  # as Popen does
            if mine != -1 and theirs != -1 and mine != getattr(self, "_devnull", None):
                os.close(mine)
        if hasattr(self, "_devnull"):
            os.close(self._devnull)


def run_forked(
    args: list[str], *, input: str | None = None, timeout: float = 60, **popen: Any
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(args, capture_output=True, text=True), through Forked."""
    with Forked(args, stdin=subprocess.PIPE if input is not None else None, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, **popen) as proc:  # fmt: skip
        out, err = proc.communicate(input, timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


TOLERANCE_S = 0.05  # scheduling slack allowed on timing assertions
logging.getLogger("batcher").setLevel(logging.CRITICAL)  # retries are expected here: keep the output clean


def api_error(code: int, retry_delay: str | None = None) -> errors.APIError:
    status = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}[code]
    body: dict[str, Any] = {"code": code, "message": f"fake {code}", "status": status}
    if retry_delay:
        body["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
    cls = errors.ClientError if code < 500 else errors.ServerError
    return cls(code, {"error": body})


def wait_until_locked(path: Path, timeout_s: float = 10.0) -> None:
    """Returns once a process holds a flock on path, as Linux lists it in /proc/locks (read
    only: taking the lock to test it could make the other run fail to take it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            inode = f":{path.stat().st_ino} "
            if any("FLOCK" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()):
                return
        time.sleep(0.01)
    raise AssertionError(f"nobody locked {path} within {timeout_s} s")


class SpyClient:
    """A fake client.aio.models: records every call's texts, start time and peak concurrency.

    fail(texts, call_number) may return an exception to raise for that call.
    """

    def __init__(
        self, *, latency_s: float = 0.0, fail: Callable[[list[str], int], Exception | None] | None = None
    ) -> None:
        self.aio = self.models = self
        self.latency_s = latency_s
        self.fail = fail
        self.calls: list[list[str]] = []
        self.started_at: list[float] = []
        self.in_flight = 0
        self.peak_in_flight = 0

    async def embed_content(
        self, *, model: str, contents: list[str | dict[str, Any]], config: types.EmbedContentConfig | None = None
    ) -> types.EmbedContentResponse:
        texts = [batcher.text_of(content) for content in contents]  # one input a text, as embed_call sends
        self.calls.append(texts)
        call_number = len(self.calls)
        self.started_at.append(time.monotonic())
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
            if self.fail and (exc := self.fail(list(texts), call_number)):
                raise exc
            return types.EmbedContentResponse(
                embeddings=[types.ContentEmbedding(values=[float(len(text))]) for text in texts]
            )
        finally:
            self.in_flight -= 1


class CountingQueue(asyncio.Queue[Any]):
    """An asyncio.Queue that counts awaited get() calls (each may arm a timer)."""

    awaited_gets = 0

    async def get(self) -> Any:
        self.awaited_gets += 1
        return await super().get()


async def drain(queue: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while (item := await queue.get()) is not None:
        items.append(item)
    return items


async def feed(queue: asyncio.Queue[Any], items: list[Any], gaps_s: Callable[[], float] = lambda: 0.0) -> None:
    for item in items:
        await queue.put(item)
        if (gap := gaps_s()) > 0:
            await asyncio.sleep(gap)
    await queue.put(None)


class Killed(BaseException):
    """kill -9 at a chosen moment, in process: nothing after it runs but cleanup."""


KILLED = (Killed, BaseExceptionGroup)  # as it leaves main(): alone, or in its TaskGroup's group


class AsyncTestCase(unittest.IsolatedAsyncioTestCase):
    """unittest's event loop without asyncio's debug mode, in which the scripts never run: its
    checks on every callback cost the suite a fifth of its time."""

    async def asyncSetUp(self) -> None:
        asyncio.get_running_loop().set_debug(False)


class BatcherTest(AsyncTestCase):
    async def run_batcher(
        self, batcher_: Batcher[Any], items: list[Any], gaps_s: Callable[[], float] = lambda: 0.0
    ) -> list[list[Any]]:
        inputs: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
        batches: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed(inputs, items, gaps_s))
            tg.create_task(batcher_.batch(inputs, batches))
            result = tg.create_task(drain(batches))
        return result.result()

    async def test_full_batch_leaves_without_waiting_for_timeout(self) -> None:
        started = time.monotonic()
        batches = await self.run_batcher(Batcher(4, timedelta(seconds=10)), list(range(8)))
        self.assertEqual(batches, [[0, 1, 2, 3], [4, 5, 6, 7]])
        self.assertLess(time.monotonic() - started, 1.0)

    async def test_timeout_counts_from_the_batch_first_item_not_the_last_batch(self) -> None:
        inputs: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        batches: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        task = asyncio.create_task(Batcher(8, timedelta(seconds=0.2)).batch(inputs, batches))
        await asyncio.sleep(0.3)  # idle longer than the timeout: must not count
        put_at = time.monotonic()
        await inputs.put("a")
        batch = await batches.get()
        waited = time.monotonic() - put_at
        self.assertEqual(batch, ["a"])
        self.assertAlmostEqual(waited, 0.2, delta=TOLERANCE_S)
        await inputs.put(None)
        self.assertIsNone(await batches.get())
        await task

    async def test_idle_batcher_waits_with_one_get_and_no_timer(self) -> None:
        inputs = CountingQueue(maxsize=4)
        batches: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        task = asyncio.create_task(Batcher(8, timedelta(milliseconds=5)).batch(inputs, batches))
        await asyncio.sleep(0.2)  # forty timeouts long
        self.assertEqual(inputs.awaited_gets, 1)
        self.assertTrue(batches.empty())
        await inputs.put(None)
        self.assertIsNone(await batches.get())
        await task

    async def test_waiting_items_are_taken_without_a_wait_per_item(self) -> None:
        inputs = CountingQueue()
        for i in range(1000):
            inputs.put_nowait(i)
        inputs.put_nowait(None)
        batches: asyncio.Queue[Any] = asyncio.Queue()
        await Batcher(100, timedelta(seconds=1)).batch(inputs, batches)
        self.assertEqual(inputs.awaited_gets, 0)  # all taken with get_nowait()
        self.assertEqual(batches.qsize(), 11)

    async def test_sentinel_flushes_the_partial_batch_and_is_passed_on(self) -> None:
        batcher_: Batcher[int] = Batcher(8, timedelta(seconds=10))
        self.assertEqual(await self.run_batcher(batcher_, [1, 2, 3]), [[1, 2, 3]])
        self.assertEqual(batcher_.counts, {"flushed at end": 1})

    async def test_empty_stream_gives_no_batch(self) -> None:
        self.assertEqual(await self.run_batcher(Batcher(8, timedelta(seconds=1)), []), [])

    async def test_counts_full_timed_out_and_flushed_batches(self) -> None:
        batcher_: Batcher[int] = Batcher(2, timedelta(milliseconds=20))
        gaps = iter([0.0, 0.0, 0.06, 0.0, 0.0])  # [0, 1] full; [2] times out; [3, 4] full; [5] at end
        await self.run_batcher(batcher_, list(range(6)), lambda: next(gaps, 0.0))
        self.assertEqual(batcher_.counts, {"full": 2, "timed out": 1, "flushed at end": 1})
        self.assertEqual(batcher_.items, 6)

    async def test_stress_no_item_lost_duplicated_or_reordered(self) -> None:
        rng = random.Random(7)
        items = list(range(600))
        for batch_size, timeout_ms in [(1, 0.2), (7, 0.5), (64, 1.0), (100, 0.3)]:
            # No gap, a bare yield (1 ns), or a gap near the timeout: arrivals race the timer.
            gaps = lambda: rng.choice([0.0, 0.0, 1e-9, 1e-9, 0.0002, 0.0005])  # noqa: E731
            batches = await self.run_batcher(Batcher(batch_size, timedelta(milliseconds=timeout_ms)), items, gaps)
            self.assertEqual([item for batch in batches for item in batch], items)
            self.assertTrue(all(1 <= len(batch) <= batch_size for batch in batches))

    def test_invalid_settings_name_the_bad_value(self) -> None:
        for size in (0, 101):
            with self.assertRaisesRegex(ValueError, f"batch_size must be 1..100, got {size}"):
                Batcher(size, timedelta(seconds=1))
        with self.assertRaisesRegex(ValueError, "timeout must be > 0"):
            Batcher(8, timedelta(0))
        with self.assertRaisesRegex(ValueError, "max_attempts must be >= 1, got 0"):
            Retrier(max_attempts=0)

    async def test_adaptive_keeps_batches_full_when_arrivals_are_fast(self) -> None:
        rng = random.Random(3)
        batcher_: Batcher[int] = Batcher(8, timedelta(seconds=0.5), adaptive=True)
        batches = await self.run_batcher(batcher_, list(range(400)), lambda: rng.expovariate(2000))
        self.assertEqual([len(b) for b in batches], [8] * 50)


async def batch_latencies(batcher_: Batcher[float], arrivals: list[float]) -> list[float]:
    """Feeds items at the given loop times; returns each item's wait until its batch left."""
    loop = asyncio.get_running_loop()
    inputs: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
    batches: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)

    async def arrive() -> None:
        for at in arrivals:
            await asyncio.sleep(at - loop.time())
            await inputs.put(loop.time())
        await inputs.put(None)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(arrive())
        tg.create_task(batcher_.batch(inputs, batches))
        waits = []
        while (batch := await batches.get()) is not None:
            waits += [loop.time() - arrived for arrived in batch]
    return waits


class AdaptiveBatcherTest(unittest.TestCase):
    """In virtual time: exact, and slow arrival rates cost no real seconds."""

    def test_adaptive_flushes_at_once_once_it_has_seen_that_arrivals_are_slow(self) -> None:
        batcher_: Batcher[float] = Batcher(8, timedelta(seconds=1), adaptive=True)
        waits = run_virtual(batch_latencies(batcher_, [100.0 * i for i in range(1, 11)]))
        self.assertEqual(waits[0], 1.0)  # nothing learnt yet: the full timeout
        self.assertEqual(max(waits[1:]), 0.0)

    def test_adaptive_cuts_latency_at_slow_poisson_arrivals_with_at_most_5_percent_more_calls(self) -> None:
        rng = random.Random(11)
        arrivals = list(itertools.accumulate(rng.expovariate(0.01) for _ in range(3000)))  # 1 per 100 s
        fixed: Batcher[float] = Batcher(8, timedelta(seconds=1))
        adaptive: Batcher[float] = Batcher(8, timedelta(seconds=1), adaptive=True)
        fixed_waits = run_virtual(batch_latencies(fixed, arrivals))
        adaptive_waits = run_virtual(batch_latencies(adaptive, arrivals))
        self.assertGreater(statistics.mean(fixed_waits), 0.95)
        self.assertLess(statistics.mean(adaptive_waits), 0.05)
        self.assertLessEqual(adaptive.counts.total(), 1.05 * fixed.counts.total())

    def test_adaptive_batches_stay_as_full_as_fixed_at_fast_arrivals(self) -> None:
        rng = random.Random(5)
        arrivals = list(itertools.accumulate(rng.expovariate(500) for _ in range(5000)))
        fixed: Batcher[float] = Batcher(8, timedelta(seconds=1))
        adaptive: Batcher[float] = Batcher(8, timedelta(seconds=1), adaptive=True)
        run_virtual(batch_latencies(fixed, arrivals))
        run_virtual(batch_latencies(adaptive, arrivals))
        self.assertEqual(adaptive.counts.total(), fixed.counts.total())


async def batches_with_slow_calls(
    batcher_: Batcher[int], arrivals: list[float], call_s: float, calls: int
) -> list[list[int]]:
    """Items 0, 1, ... arrive at the given loop times; `calls` consumers take batches from a batch
    queue of one, as embed_content does, each taking call_s per batch. Returns the batches taken."""
    loop = asyncio.get_running_loop()
    inputs: asyncio.Queue[Any] = asyncio.Queue(maxsize=batcher.QUEUE_SIZE)
    batches: asyncio.Queue[Any] = asyncio.Queue(maxsize=batcher.BATCH_QUEUE_SIZE)
    taken: list[list[int]] = []

    async def arrive() -> None:
        for i, at in enumerate(arrivals):
            await asyncio.sleep(at - loop.time())
            await inputs.put(i)
        await inputs.put(None)

    async def call() -> None:
        while (batch := await batches.get()) is not None:
            taken.append(list(batch))  # a copy, as a call sends it: later changes would be lost
            await asyncio.sleep(call_s)
        batches.put_nowait(None)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(arrive())
        tg.create_task(batcher_.batch(inputs, batches))
        for _ in range(calls):
            tg.create_task(call())
    return taken


class AdaptiveGrowthTest(unittest.TestCase):
    """In virtual time."""

    def test_adaptive_batches_grow_up_to_100_while_the_calls_are_behind_and_lose_nothing(self) -> None:
        rng = random.Random(8)
        arrivals = list(itertools.accumulate(rng.expovariate(1000) for _ in range(5000)))  # 1,000/s
        for adaptive in (False, True):
            batcher_: Batcher[int] = Batcher(8, timedelta(seconds=1), adaptive=adaptive)
            taken = run_virtual(batches_with_slow_calls(batcher_, arrivals, call_s=0.2, calls=4))
            self.assertEqual([i for batch in taken for i in batch], list(range(5000)))  # once each, in order
            sizes = [len(batch) for batch in taken]
            if adaptive:  # 4 calls of 0.2 s need 50 a call for 1,000/s
                self.assertEqual(max(sizes), 100)
                self.assertGreater(statistics.mean(sizes), 45)
            else:
                self.assertEqual(max(sizes), 8)

    def test_random_arrivals_and_call_times_lose_no_item_while_batches_grow(self) -> None:
        for seed in range(20):
            rng = random.Random(seed)
            arrivals = list(itertools.accumulate(rng.expovariate(rng.choice([50, 500, 5000])) for _ in range(800)))
            batcher_: Batcher[int] = Batcher(rng.randint(1, 10), timedelta(seconds=0.05), adaptive=True)
            taken = run_virtual(batches_with_slow_calls(batcher_, arrivals, rng.uniform(0.001, 0.3), rng.randint(1, 4)))
            self.assertEqual([i for batch in taken for i in batch], list(range(800)), seed)
            self.assertLessEqual(max(map(len, taken)), 100)

    def test_adaptive_flushes_once_another_arrival_before_the_timeout_is_less_likely_than_not(self) -> None:
        batcher_: Batcher[float] = Batcher(8, timedelta(seconds=1), adaptive=True)
        waits = run_virtual(batch_latencies(batcher_, [1.0 * i for i in range(1, 12)]))  # one a second
        self.assertEqual(waits[0], 1.0)  # nothing known yet: the full timeout
        self.assertTrue(
            all(abs(wait - (1 - math.log(2))) < 1e-6 for wait in waits[1:-1]), waits
        )  # 0.31 s; the last: at the end


class EmbedStageTest(AsyncTestCase):
    async def run_stage(self, client: SpyClient, batches: list[list[str]], **kwargs: Any) -> list[tuple[str, Any]]:
        """Runs embed_content on batches of texts (each text is its own id); returns (text, result)."""
        batch_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
        output_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=8)
        kwargs.setdefault("retrier", Retrier(base_delay_s=0.001))
        kwargs.setdefault("settings", batcher.EmbedSettings(normalize=False))  # the fake's vectors name their texts
        kwargs.setdefault("shutdown", batcher.Shutdown())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed(batch_queue, [[batcher.Input(text, text) for text in batch] for batch in batches]))
            tg.create_task(embed_content(client, batch_queue, output_queue, **kwargs))
            outputs = tg.create_task(drain(output_queue))
        return [(item.id, result) for batch in outputs.result() for item, result in batch]

    async def test_calls_stay_within_concurrency_and_every_result_arrives_once(self) -> None:
        client = SpyClient(latency_s=0.02)
        batches = [[f"b{b}-{i}" for i in range(5)] for b in range(40)]
        outputs = await self.run_stage(client, batches, concurrency=4)
        self.assertEqual(client.peak_in_flight, 4)
        self.assertEqual(sorted(c for c, _ in outputs), sorted(t for b in batches for t in b))
        self.assertTrue(all(e.values == [float(len(c))] for c, e in outputs))

    async def test_results_keep_the_order_of_the_batch(self) -> None:
        client = SpyClient()
        outputs = await self.run_stage(client, [["a", "bb"]])
        self.assertEqual([(c, e.values) for c, e in outputs], [("a", [1.0]), ("bb", [2.0])])

    async def test_transient_errors_are_retried_until_success(self) -> None:
        client = SpyClient(fail=lambda texts, n: api_error(503) if n <= 2 else None)
        retrier = Retrier(base_delay_s=0.001)
        outputs = await self.run_stage(client, [["a", "b"]], retrier=retrier)
        self.assertEqual(len(client.calls), 3)
        self.assertEqual(retrier.retries, 2)
        self.assertTrue(all(isinstance(e, types.ContentEmbedding) for _, e in outputs))

    async def test_exhausted_attempts_fail_the_items_and_the_run_completes(self) -> None:
        client = SpyClient(fail=lambda texts, n: api_error(503) if "x" in texts else None)
        outputs = await self.run_stage(client, [["x"], ["ok"]], retrier=Retrier(max_attempts=3, base_delay_s=0.001))
        results = dict(outputs)
        self.assertIsInstance(results["x"], errors.ServerError)
        self.assertIsInstance(results["ok"], types.ContentEmbedding)
        self.assertEqual(sum(call == ["x"] for call in client.calls), 3)

    async def test_connection_errors_are_transient(self) -> None:
        client = SpyClient(fail=lambda texts, n: ConnectionResetError("reset") if n == 1 else None)
        outputs = await self.run_stage(client, [["a"]], retrier=Retrier(base_delay_s=0.001))
        self.assertIsInstance(outputs[0][1], types.ContentEmbedding)

    async def test_server_retry_delay_pauses_every_concurrent_call(self) -> None:
        failed_at: list[float] = []

        def fail(texts: list[str], n: int) -> Exception | None:
            if n == 1:
                failed_at.append(time.monotonic())
                return api_error(429, retry_delay="0.300s")
            return None

        for max_attempts in (5, 1):  # a 429 on a batch's last attempt pauses the others too
            with self.subTest(max_attempts=max_attempts):
                failed_at.clear()
                client = SpyClient(latency_s=0.01, fail=fail)
                retrier = Retrier(base_delay_s=0.001, max_attempts=max_attempts)
                await self.run_stage(client, [[f"t{i}"] for i in range(12)], concurrency=4, retrier=retrier)
                later = [t for t in client.started_at if t > failed_at[0]]
                self.assertTrue(later)
                self.assertGreaterEqual(min(later) - failed_at[0], 0.3 - 0.01)

    async def test_one_bad_text_in_100_is_isolated_by_bisection_within_budget(self) -> None:
        client = SpyClient(fail=lambda texts, n: api_error(400) if "bad" in texts else None)
        texts = [f"t{i}" for i in range(100)]
        texts[37] = "bad"
        outputs = await self.run_stage(client, [texts])
        failed = [c for c, e in outputs if isinstance(e, Exception)]
        self.assertEqual(failed, ["bad"])
        self.assertLessEqual(len(client.calls) - 1, 2 * math.ceil(math.log2(100)) + 1)
        self.assertEqual(len(outputs), 100)

    async def test_an_unknown_model_stops_the_run_without_bisecting_or_reporting_items(self) -> None:
        client = SpyClient(fail=lambda texts, n: api_error(404))
        shutdown = batcher.Shutdown()
        batches = [[f"b{b}-{i}" for i in range(50)] for b in range(6)]
        outputs = await self.run_stage(client, batches, shutdown=shutdown, concurrency=2)
        self.assertLessEqual(len(client.calls), 2)  # the calls in flight when it was seen
        self.assertEqual(outputs, [])  # left for the next run, not failed
        self.assertIn("404", shutdown.failure or "")

    async def test_bisection_stops_when_both_halves_fail_alike(self) -> None:
        client = SpyClient(fail=lambda texts, n: api_error(400))  # whatever the texts
        outputs = await self.run_stage(client, [[f"t{i}" for i in range(100)]])
        self.assertEqual(len(client.calls), 3)  # the batch, then each half once
        self.assertEqual(len(outputs), 100)
        self.assertTrue(all(isinstance(e, errors.ClientError) for _, e in outputs))

    def test_retry_delay_read_from_retry_info_or_retry_after(self) -> None:
        self.assertEqual(batcher.server_retry_delay_s(api_error(429, retry_delay="1.5s")), 1.5)
        with_header = errors.ClientError(429, {"error": {"code": 429}}, SimpleNamespace(headers={"retry-after": "7"}))
        self.assertEqual(batcher.server_retry_delay_s(with_header), 7.0)
        self.assertIsNone(batcher.server_retry_delay_s(api_error(503)))

    async def test_simulated_client_returns_real_types_and_rejects_over_100_texts(self) -> None:
        client = batcher.SimulatedClient()
        config = types.EmbedContentConfig(output_dimensionality=5)
        a, b = "a", {"parts": [{"text": "b"}]}  # the two forms embed_call sends
        response = await client.aio.models.embed_content(model="m", contents=[a, b], config=config)
        self.assertIsInstance(response, types.EmbedContentResponse)
        assert response.embeddings is not None
        self.assertEqual([len(e.values or []) for e in response.embeddings], [5, 5])
        again = await client.aio.models.embed_content(model="m", contents=[{"parts": [{"text": "a"}]}], config=config)
        assert again.embeddings is not None
        self.assertEqual(again.embeddings[0].values, response.embeddings[0].values)
        with self.assertRaises(errors.ClientError):
            await client.aio.models.embed_content(model="m", contents=[a] * 101)
        full = await client.aio.models.embed_content(
            model="m", contents=[a], config=types.EmbedContentConfig(output_dimensionality=3072)
        )
        assert full.embeddings is not None
        self.assertEqual(len(full.embeddings[0].values or []), 3072)


class LoggerTest(AsyncTestCase):
    async def test_prints_one_line_per_item_as_in_the_document(self) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        stats = batcher.RunStats()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            await asyncio.gather(
                feed(
                    queue,
                    [
                        [(batcher.Input("input-7", "input-7"), types.ContentEmbedding(values=[0.1, -0.2, 0.3]))],
                        [(batcher.Input("input-8", "input-8"), api_error(400))],
                    ],
                ),
                log_outputs(queue, stats=stats),
            )
        self.assertEqual(
            out.getvalue().splitlines(),
            ["Content: input-7 -> Embedding: [0.1, -0.2, 0.3]", "Failed: input-8 -> 400 INVALID_ARGUMENT: fake 400"],
        )
        self.assertEqual((stats.succeeded, stats.failed), (1, 1))

    async def test_on_a_terminal_failed_and_log_lines_clear_the_progress_line_first(self) -> None:
        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        with contextlib.redirect_stdout(out := Terminal()):
            await asyncio.gather(
                feed(queue, [[(batcher.Input("x:1", "x"), api_error(400))]]),
                log_outputs(queue, stats=batcher.RunStats()),
            )
        self.assertEqual(out.getvalue(), "\r\x1b[KFailed: x:1 -> 400 INVALID_ARGUMENT: fake 400\n")
        handler = batcher.LineHandler(err := Terminal())
        handler.emit(logging.LogRecord("batcher", logging.WARNING, __file__, 1, "resuming", None, None))
        self.assertEqual(err.getvalue(), "\r\x1b[Kresuming\n")
        handler = batcher.LineHandler(plain := io.StringIO())  # off a terminal: nothing to clear
        handler.emit(logging.LogRecord("batcher", logging.WARNING, __file__, 1, "resuming", None, None))
        self.assertEqual(plain.getvalue(), "resuming\n")


class BatchedEmbedderTest(AsyncTestCase):
    async def test_each_caller_gets_its_own_embedding_from_shared_batches(self) -> None:
        client = SpyClient(latency_s=0.01)
        embedder = BatchedEmbedder(client, batch_size=10, timeout=timedelta(milliseconds=20), normalize=False)
        async with embedder:  # (raw vectors: the fake's one number names the text)
            results = await asyncio.gather(*(embedder.embed("x" * n) for n in range(1, 31)))
        self.assertEqual([r.values for r in results], [[float(n)] for n in range(1, 31)])
        self.assertEqual([len(call) for call in client.calls], [10, 10, 10])

    async def test_only_the_caller_whose_item_failed_gets_the_error(self) -> None:
        client = SpyClient(fail=lambda texts, n: api_error(400) if "bad" in texts else None)
        async with BatchedEmbedder(client, batch_size=8, timeout=timedelta(milliseconds=20)) as embedder:
            results = await asyncio.gather(*(embedder.embed(t) for t in ["a", "bad", "c", "d"]), return_exceptions=True)
        self.assertIsInstance(results[1], batcher.EmbeddingFailed)
        assert isinstance(results[1], batcher.EmbeddingFailed)
        self.assertIsInstance(results[1].error, errors.ClientError)
        self.assertTrue(all(isinstance(r, types.ContentEmbedding) for i, r in enumerate(results) if i != 1))

    async def test_a_cancelled_caller_is_dropped_from_its_batch(self) -> None:
        client = SpyClient()
        embedder = BatchedEmbedder(client, batch_size=8, timeout=timedelta(milliseconds=100), normalize=False)
        async with embedder:
            keep = asyncio.create_task(embedder.embed("keep"))
            drop = asyncio.create_task(embedder.embed("drop"))
            await asyncio.sleep(0.02)  # both queued, the batch still open
            drop.cancel()
            self.assertEqual((await keep).values, [4.0])
        self.assertTrue(drop.cancelled())
        self.assertEqual(client.calls, [["keep"]])

    async def test_embed_outside_the_block_raises_at_once(self) -> None:
        embedder = BatchedEmbedder(SpyClient())
        with self.assertRaisesRegex(RuntimeError, "outside its `async with` block"):
            async with asyncio.timeout(1):
                await embedder.embed("a")

    async def test_a_failing_worker_ends_every_waiting_caller_promptly(self) -> None:
        client = SpyClient(latency_s=0.05, fail=lambda texts, n: AttributeError("a bug"))  # not a classified fault
        callers: list[asyncio.Task[Any]] = []

        async def own() -> None:
            async with BatchedEmbedder(client, batch_size=2, timeout=timedelta(milliseconds=10)) as embedder:
                callers.extend(asyncio.create_task(embedder.embed(f"t{i}")) for i in range(6))
                await asyncio.sleep(10)  # the owner is busy elsewhere when the worker fails

        owner = asyncio.create_task(own())
        async with asyncio.timeout(1):
            with self.assertRaises(ExceptionGroup):
                await owner
            results = await asyncio.gather(*callers, return_exceptions=True)
        self.assertEqual(len(results), 6)
        self.assertTrue(all(isinstance(r, batcher.EmbeddingFailed) for r in results), results)

    async def test_a_cancelled_owner_ends_every_waiting_and_queued_caller_promptly(self) -> None:
        client = SpyClient(latency_s=10)
        callers: list[asyncio.Task[Any]] = []
        entered = asyncio.Event()

        async def own() -> None:
            async with BatchedEmbedder(client, batch_size=1, timeout=timedelta(milliseconds=1), concurrency=1) as e:
                # more callers than the request queue holds: some wait for room
                callers.extend(asyncio.create_task(e.embed(f"t{i}")) for i in range(batcher.QUEUE_SIZE + 50))
                entered.set()
                await asyncio.sleep(10)

        owner = asyncio.create_task(own())
        await entered.wait()
        await asyncio.sleep(0.05)  # one call in flight, the batch queue full, the request queue full
        owner.cancel()
        async with asyncio.timeout(1):
            with self.assertRaises(asyncio.CancelledError):
                await owner
            results = await asyncio.gather(*callers, return_exceptions=True)
        self.assertTrue(all(isinstance(r, batcher.EmbeddingFailed) for r in results))

    async def test_each_failed_caller_gets_its_own_exception(self) -> None:
        client = SpyClient(fail=lambda texts, n: api_error(503))
        async with BatchedEmbedder(client, batch_size=4, max_attempts=1) as embedder:
            results = await asyncio.gather(*(embedder.embed(t) for t in "abcd"), return_exceptions=True)
        self.assertEqual(len({id(r) for r in results}), 4)
        self.assertTrue(
            all(isinstance(r, batcher.EmbeddingFailed) and getattr(r.error, "code", 0) == 503 for r in results)
        )


def refused_on_v1(path: str) -> dict[str, Any] | None:
    """Google's 404 for what exists on /v1beta only (google-genai 3's release notes): the -latest
    model aliases, the Files API and the Batch API. None: served on this path's version."""
    if not re.match(r"/(upload/)?v1/", path):
        return None
    if m := re.search(r"models/([^/:]+-latest):(\w+)", path):
        message = f"models/{m.group(1)} is not found for API version v1, or is not supported for {m.group(2)}."
    elif re.search(r"/files|/batches|:(asyncBatchEmbedContent|batchGenerateContent)", path):
        message = f"The requested URL {path.partition('?')[0]} was not found on this server."
    else:
        return None
    return {"error": {"code": 404, "message": message, "status": "NOT_FOUND"}}


class StubHandler(BaseHTTPRequestHandler):
    """A tiny stand-in for the Gemini API. The first `fail_first` embed calls get a 429
    with a RetryInfo delay; then it answers batchEmbedContents with one vector per text. As the
    API, it refuses taskType and title for every model but gemini-embedding-001."""

    requests: list[tuple[str, dict[str, Any]]]
    fail_first = 0
    error: dict[str, Any] | None = None  # the answer to every call, if set
    received_at: list[float] | None = None

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.received_at is not None:
            self.received_at.append(time.monotonic())
        self.requests.append((self.path, body))
        if (refusal := refused_on_v1(self.path)) is not None:
            self.reply(404, refusal)
        elif self.error is not None:
            self.reply(self.error["error"]["code"], self.error)
        elif len(self.requests) <= self.fail_first:
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.2s"}]
            self.reply(
                429, {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": details}}
            )
        elif "gemini-embedding-001" not in self.path and any("taskType" in r or "title" in r for r in body["requests"]):
            # gemini-embedding-2 takes its task in the text, and rejects the field
            message = "Invalid JSON payload: task_type and title are not supported for this model"
            self.reply(400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})
        elif len(body["requests"]) > 100:
            self.reply(
                400,
                {
                    "error": {
                        "code": 400,
                        "message": "at most 100 requests can be in one batch",
                        "status": "INVALID_ARGUMENT",
                    }
                },
            )
        else:
            self.reply(200, {"embeddings": [{"values": [0.5, -0.5, float(i)]} for i in range(len(body["requests"]))]})

    def reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def stub_server(
    fail_first: int = 0, error: dict[str, Any] | None = None, received_at: list[float] | None = None
) -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """The stub, serving on a free port; yields its URL and the requests it received. received_at,
    if given, gets the time.monotonic() at which each request arrived."""
    requests: list[tuple[str, dict[str, Any]]] = []
    attributes = {"requests": requests, "fail_first": fail_first, "error": error, "received_at": received_at}
    handler = type("Handler", (StubHandler,), attributes)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()
        server.server_close()


def real_client(base_url: str) -> Any:
    """The real genai.Client, made by batcher.make_client with a key, against a stub at base_url."""
    env = {"GEMINI_API_KEY": "test-key", "GOOGLE_API_KEY": "", "GOOGLE_GEMINI_BASE_URL": base_url}
    with mock.patch.dict(os.environ, env):
        return batcher.make_client(offline=False, fake_latency_s=0)


class RealClientTest(AsyncTestCase):
    async def test_end_to_end_through_genai_client_against_a_local_stub(self) -> None:
        with stub_server(fail_first=1) as (base_url, requests):
            client = real_client(base_url)
            self.assertIsInstance(client, genai.Client)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                config = batcher.Config(num_inputs=20, batch_size=8, timeout_s=0.05, input_delay_s=0)
                status = await batcher.main(config, client, shutdown=batcher.Shutdown())
        self.assertEqual(status, 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(
            sorted(line for line in lines if line.startswith("Content:"))[0],
            "Content: input-0 -> Embedding: [0.7071067811865475, -0.7071067811865475, 0.0]",  # [0.5, -0.5, 0], unit
        )
        self.assertEqual(sum(line.startswith("Content:") for line in lines), 20)
        self.assertIn("4 API calls, 1 retry,", out.getvalue())
        paths = {path for path, _ in requests}
        self.assertEqual(len(paths), 1)
        self.assertEqual(paths.pop(), "/v1beta/models/gemini-embedding-001:batchEmbedContents")  # not SDK 3's v1
        self.assertTrue(all(r["outputDimensionality"] == 3 for _, body in requests for r in body["requests"]))
        self.assertEqual(sum(len(body["requests"]) for _, body in requests[1:]), 20)


class ApiVersionTest(AsyncTestCase):
    async def test_v1beta_goes_on_the_wire_unless_google_genai_api_version_says_otherwise(self) -> None:
        for chosen, sent in (("", "v1beta"), ("beta", "v1beta"), ("v1alpha", "v1alpha")):
            with self.subTest(chosen=chosen), stub_server() as (base_url, requests):
                with mock.patch.dict(os.environ, {"GOOGLE_GENAI_API_VERSION": chosen}):
                    client = real_client(base_url)
                try:
                    embeddings = await batcher.embed_batch(
                        client, ["a", "b"], settings=batcher.EmbedSettings(), retrier=batcher.Retrier()
                    )
                finally:
                    await client.aio.aclose()
                self.assertEqual(len(embeddings), 2)
                self.assertEqual(
                    [path for path, _ in requests], [f"/{sent}/models/gemini-embedding-001:batchEmbedContents"]
                )


class FaultyStubHandler(BaseHTTPRequestHandler):
    """batchEmbedContents on a bad day, by the texts of a call: "hang" is never answered; on
    their first call, "html" gets a proxy's HTML page, "drop" a dropped connection and "short"
    one embedding too few. Anything else gets one vector per text."""

    calls: dict[str, int]
    release: threading.Event

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if refused_on_v1(self.path) is not None:
            self.connection.shutdown(2)  # not served: the test fails loudly
            return
        texts = [r["content"]["parts"][0]["text"] for r in body["requests"]]
        first = set()
        for text in texts:
            self.calls[text] = self.calls.get(text, 0) + 1
            if self.calls[text] == 1:
                first.add(text)
        if "hang" in texts:
            self.release.wait(10)
            return
        if "drop" in first:
            self.connection.shutdown(2)
            return
        if "html" in first:
            self.reply(b"<html><body>502 Bad Gateway</body></html>", "text/html")
            return
        count = len(texts) - 1 if "short" in first else len(texts)
        self.reply(json.dumps({"embeddings": [{"values": [1.0, 2.0, 3.0]}] * count}).encode(), "application/json")

    def reply(self, data: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def faulty_client(request_timeout_s: float = 60) -> Iterator[tuple[Any, dict[str, int]]]:
    """The real genai.Client, made by batcher.make_client, against the faulty stub."""
    calls: dict[str, int] = {}
    release = threading.Event()
    handler = type("Handler", (FaultyStubHandler,), {"calls": calls, "release": release})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    env = {
        "GEMINI_API_KEY": "test-key",
        "GOOGLE_API_KEY": "",
        "GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{server.server_port}",
    }
    try:
        with mock.patch.dict(os.environ, env):
            yield batcher.make_client(offline=False, fake_latency_s=0, request_timeout_s=request_timeout_s), calls
    finally:
        release.set()
        server.shutdown()
        server.server_close()


class BadDayTest(AsyncTestCase):
    """The real genai.Client against a local server that fails the way real ones do."""

    async def embed(self, client: Any, texts: list[str], retrier: Retrier) -> dict[str, Any]:
        return dict(
            zip(
                texts,
                await batcher.embed_batch(client, texts, settings=batcher.EmbedSettings("m", 3), retrier=retrier),
                strict=True,
            )
        )

    async def test_a_call_never_answered_times_out_is_retried_and_fails_with_the_reason(self) -> None:
        retrier = Retrier(max_attempts=2, request_timeout_s=0.3, base_delay_s=0.001)
        started = time.monotonic()
        with faulty_client(request_timeout_s=0.3) as (client, calls):
            results = await self.embed(client, ["hang"], retrier)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(calls, {"hang": 2})
        self.assertEqual(batcher.describe(results["hang"]), "timed out after 0.3 s")

    async def test_a_stall_outside_the_http_call_is_bounded_too(self) -> None:
        retrier = Retrier(max_attempts=2, request_timeout_s=0.1, base_delay_s=0.001)
        results = await self.embed(SpyClient(latency_s=60), ["a"], retrier)
        self.assertEqual(batcher.describe(results["a"]), "timed out after 0.1 s")

    async def test_an_html_body_a_dropped_connection_and_a_short_reply_are_retried(self) -> None:
        retrier = Retrier(base_delay_s=0.001)
        with faulty_client() as (client, calls):
            for text in ("html", "drop", "short"):
                results = await self.embed(client, [text, f"{text}-ok"], retrier)
                self.assertTrue(all(isinstance(r, types.ContentEmbedding) for r in results.values()), results)
                self.assertEqual(calls[text], 2)
        self.assertEqual(retrier.retries, 3)

    async def test_a_bug_in_the_call_surfaces_instead_of_failing_items(self) -> None:
        client = SpyClient(fail=lambda texts, n: AttributeError("a bug of ours"))
        with self.assertRaises(AttributeError):
            await self.embed(client, ["a"], Retrier(base_delay_s=0.001))

    async def test_a_value_error_raised_before_sending_is_a_bug_not_a_malformed_reply(self) -> None:
        client = SpyClient(fail=lambda texts, n: ValueError("model is required."))
        with self.assertRaisesRegex(ValueError, "model is required"):
            await self.embed(client, ["a"], Retrier(base_delay_s=0.001))
        self.assertEqual(len(client.calls), 1)  # not retried as an unreadable reply


class CorpusTestCase(AsyncTestCase):
    """batcher.py --input FILE --output FILE."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", str(self.tmp)], check=True))
        self.corpus, self.output = self.tmp / "corpus.txt", self.tmp / "out.jsonl"

    def write_corpus(self, n: int) -> list[str]:
        texts = [f"text number {i}" for i in range(n)]
        self.corpus.write_text("".join(f"{t}\n\n" if i % 7 == 3 else f"  {t}\n" for i, t in enumerate(texts)))
        return texts

    async def run_main(self, client: Any, **changes: Any) -> tuple[int, str]:
        settings: dict[str, Any] = {"input": self.corpus, "output": self.output, "batch_size": 10, "timeout_s": 0.02}
        config = batcher.Config(**(settings | changes))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            async with asyncio.timeout(30):
                status = await batcher.main(config, client, shutdown=batcher.Shutdown())
        return status, out.getvalue()

    def written(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.output.read_text().splitlines()]

    def write_texts(self, n: int) -> list[str]:
        """n texts of 400 characters: 100 tokens each for --tpm and --price, however they are batched."""
        texts = [f"{i:04d}" + "x" * 396 for i in range(n)]
        self.corpus.write_text("".join(text + "\n" for text in texts))
        return texts


class CorpusTest(CorpusTestCase):
    async def test_a_corpus_is_embedded_to_jsonl_through_the_real_client(self) -> None:
        texts = self.write_corpus(25)
        with stub_server() as (base_url, requests):
            client = real_client(base_url)
            status, out = await self.run_main(client)
        self.assertEqual(status, 0)
        records = self.written()
        by_id = {r["id"]: r["text"] for r in records}
        self.assertEqual(sorted(by_id.values()), sorted(texts))  # stripped, blank lines skipped
        self.assertEqual(by_id["corpus.txt:6"], "text number 4")  # line numbers count the blank line
        self.assertEqual(len(records[0]["embedding"]), 3)
        self.assertEqual(sum(len(body["requests"]) for _, body in requests), 25)
        self.assertIn("25 embedded, 0 failed", out)

    async def test_a_rerun_sends_only_what_is_missing_and_cuts_a_torn_line(self) -> None:
        texts = self.write_corpus(30)
        first = SpyClient(fail=lambda batch, n: api_error(400) if "text number 5" in batch else None)
        config_changes = {"max_attempts": 1}
        status, out = await self.run_main(first, **config_changes)
        self.assertEqual(status, 1)
        self.assertIn("Failed: corpus.txt:7 -> 400 INVALID_ARGUMENT: fake 400", out)
        with self.output.open("a") as f:
            f.write('{"id": "corpus.txt:99", "text": "torn')  # a kill mid-write
        again = SpyClient()
        status, out = await self.run_main(again)
        self.assertEqual(status, 0)
        self.assertEqual(again.calls, [["text number 5"]])
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))
        self.assertIn("29 skipped", out)

    async def test_quiet_leaves_out_the_per_item_lines(self) -> None:
        self.corpus.write_bytes(b"one\nbad \xff line\n")
        status, out = await self.run_main(SpyClient(), quiet=True)
        self.assertEqual(status, 1)
        self.assertEqual([line for line in out.splitlines() if not line.startswith(" ")][1:], [])  # the summary only
        self.assertTrue(out.startswith("Summary:"))

    async def test_the_demo_with_an_output_file_resumes_exactly_once(self) -> None:
        for _ in range(2):
            status, _ = await self.run_main(SpyClient(), input=None, num_inputs=30, input_delay_s=0)
            self.assertEqual(status, 0)
        self.assertEqual(sorted(r["id"] for r in self.written()), sorted(f"input-{i}" for i in range(30)))

    async def test_an_undecodable_line_fails_with_its_id_and_the_rest_are_embedded(self) -> None:
        self.corpus.write_bytes(b"one\nbad \xff line\nthree\n")
        status, out = await self.run_main(SpyClient())
        self.assertEqual(status, 1)
        self.assertIn("Failed: corpus.txt:2 -> ", out)
        self.assertIn("undecodable UTF-8", out)
        self.assertEqual([r["id"] for r in self.written()], ["corpus.txt:1", "corpus.txt:3"])

    async def test_tpm_spaces_call_starts_by_their_tokens_and_with_rpm_takes_the_longer_gap(self) -> None:
        sizes = [400, 200, 400, 200, 400, 200]  # characters: 100 and 50 tokens
        self.corpus.write_text("".join("x" * n + "\n" for n in sizes))
        for rpm, gap_after in ((None, {400: 0.1, 200: 0.05}), (800, {400: 0.1, 200: 0.075})):
            received_at: list[float] = []
            with self.subTest(rpm=rpm), stub_server(received_at=received_at) as (base_url, requests):
                client = real_client(base_url)
                self.addAsyncCleanup(client.aio.aclose)
                output = self.tmp / f"tpm-{rpm}.jsonl"
                started = time.monotonic()
                await self.run_main(client, output=output, batch_size=1, concurrency=6, tpm=60_000, rpm=rpm)
                self.assertLess(received_at[0] - started, 0.2)  # the first call at once (0.2: setup, on a busy VM)
                order = [len(body["requests"][0]["content"]["parts"][0]["text"]) for _, body in requests]
                # A call's tokens are paid (at 1,000 tokens/s) before the next start. Arrivals at the stub
                # jitter by some ms, and the first has the connection to make: gaps from the second on.
                gaps = [b - a for a, b in itertools.pairwise(received_at[1:])]
                for size, gap in zip(order[1:], gaps, strict=False):
                    self.assertGreaterEqual(gap, gap_after[size] - 0.02, (order, gaps))
                    self.assertLess(gap, gap_after[size] + 0.04, (order, gaps))
                expected_s = sum(gap_after[size] for size in order[1:-1])
                self.assertAlmostEqual(received_at[-1] - received_at[1], expected_s, delta=0.03)

    async def test_rpm_spaces_call_starts_evenly_with_no_burst(self) -> None:
        self.write_corpus(8)
        client = SpyClient()
        await self.run_main(client, batch_size=1, concurrency=8, rpm=1200)  # one call per 50 ms
        gaps = [b - a for a, b in itertools.pairwise(client.started_at)]
        self.assertEqual(len(gaps), 7)
        self.assertTrue(all(0.045 <= gap <= 0.1 for gap in gaps), gaps)

    async def test_files_cancelled_at_the_open_leak_nothing(self) -> None:
        self.write_corpus(30)
        self.output.write_text('{"id": "corpus.txt:1", "text": "x", "embedding": [1]}\n')
        await asyncio.sleep(0.05)
        before = len(os.listdir("/proc/self/fd"))
        rng = random.Random(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for i in range(200):
                queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
                stage: Coroutine[Any, Any, Any]
                if i % 2:
                    stage = batcher.read_corpus(batcher.Run(batcher.Config()), self.corpus, queue, queue)
                else:
                    stage = batcher.open_ledger(self.output, batcher.Config())
                task = asyncio.ensure_future(stage)
                for _ in range(rng.randrange(3)):  # 0 to 2 loop turns: at the open, or just after
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            gc.collect()
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        self.assertEqual([w for w in caught if issubclass(w.category, ResourceWarning)], [])

    async def test_a_file_still_closes_when_cancelled_again_while_closing(self) -> None:
        # A TaskGroup cancels its tasks again for each stage that fails; a close still queued
        # for a worker thread must not be dropped by the second cancellation.
        self.write_corpus(3)
        busy, release = ThreadPoolExecutor(1), threading.Event()
        self.addCleanup(busy.shutdown)
        asyncio.get_running_loop().set_default_executor(busy)  # aiofiles' threads: one, soon busy
        before, opened = len(os.listdir("/proc/self/fd")), asyncio.Event()

        async def read() -> None:
            async with batcher.open_file(self.corpus, "rb"):
                opened.set()
                await asyncio.sleep(60)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)  # what a file closed by the GC says
            task = asyncio.create_task(read())
            await opened.wait()
            busy.submit(release.wait)  # the close will queue behind this
            task.cancel()
            await asyncio.sleep(0.05)  # the task now waits for its close
            task.cancel()
            release.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            gc.collect()
        self.assertEqual([w for w in caught if issubclass(w.category, ResourceWarning)], [])
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    async def test_off_a_terminal_progress_is_a_plain_line_every_interval(self) -> None:
        stats = batcher.RunStats(enqueued=10, succeeded=5, failed=1)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), mock.patch.object(batcher, "PROGRESS_EVERY_S", 0.2):
            progress = asyncio.create_task(batcher.show_progress(stats, tty=False))
            await asyncio.sleep(0.5)
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 2)  # at 0.2 s and 0.4 s
        self.assertRegex(lines[-1], r"^progress: 6 done, 1 failed, 4 in flight, \d+/s$")


def fake_stdin(data: bytes) -> Any:
    """Patches aiofiles.stdin_bytes with a pipe that holds data."""

    async def read1(n: int) -> bytes:
        chunk, rest[0] = rest[0][:n], rest[0][n:]
        return chunk

    rest = [data]
    return mock.patch.object(aiofiles, "stdin_bytes", SimpleNamespace(read1=read1))


class CorpusEdgeCaseTest(CorpusTestCase):
    """Files as real editors and tools leave them."""

    async def test_a_bom_crlf_and_cr_only_line_ends_and_invisible_lines_read_as_meant(self) -> None:
        self.corpus.write_bytes(b"\xef\xbb\xbfalpha\r\nbeta\r\n\xe2\x80\x8b\r\n\x00\x00\rgamma\rdelta")
        client = SpyClient()
        with mock.patch.object(batcher, "CHUNK_BYTES", 5):  # "\r\n" falls across chunk boundaries
            status, out = await self.run_main(client)
        self.assertEqual(status, 0)
        got = {r["id"]: r["text"] for r in self.written()}
        self.assertEqual(got, {"corpus.txt:1": "alpha", "corpus.txt:2": "beta", "corpus.txt:5": "gamma",
                               "corpus.txt:6": "delta"})  # fmt: skip
        self.assertEqual(sorted(t for call in client.calls for t in call), ["alpha", "beta", "delta", "gamma"])
        self.assertNotIn("item latency", out)  # a corpus has no arrival times: no latency line
        self.assertIn("4 embedded, 0 failed items\n", out)

    async def test_a_bom_on_stdin_is_dropped(self) -> None:
        with fake_stdin("\ufeffSome text\n".encode()):
            await self.run_main(SpyClient(), input=batcher.STDIN)
        self.assertEqual([(r["id"], r["text"]) for r in self.written()], [("stdin:1", "Some text")])

    async def test_a_stopped_run_says_what_it_leaves_for_the_next_run(self) -> None:
        self.write_corpus(100)
        info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        body = {
            "error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT", "details": [info]}
        }
        client = SpyClient(fail=lambda texts, n: errors.ClientError(400, body))
        with contextlib.redirect_stderr(io.StringIO()):
            status, out = await self.run_main(client, concurrency=1)
        self.assertEqual(status, 2)
        self.assertIn(f"{len(client.calls)} API call", out)
        found = re.search(r"left for the next run: (\d+) items read but not done, and those not read", out)
        assert found is not None, out
        self.assertGreater(int(found.group(1)), 0)


class StopTest(CorpusTestCase):
    async def test_ctrl_c_against_a_server_that_never_answers_ends_after_the_grace(self) -> None:
        self.corpus.write_text("hang\n" * 40)
        shutdown = batcher.Shutdown(grace_s=0.3)
        config = batcher.Config(input=self.corpus, output=self.output, batch_size=10, timeout_s=0.02)
        with faulty_client() as (client, calls), contextlib.redirect_stderr(io.StringIO()):
            asyncio.get_running_loop().call_later(0.3, shutdown.request)
            started = time.monotonic()
            with contextlib.redirect_stdout(out := io.StringIO()):
                status = await batcher.main(config, client, shutdown=shutdown)
            elapsed = time.monotonic() - started
        self.assertEqual(status, 130)
        self.assertLess(elapsed, 0.3 + 0.3 + 1.5)  # the signal, the grace, and a margin: not 60 s x 5 attempts
        self.assertEqual(calls["hang"], 4 * 10)  # the four calls in flight, none retried, no new one
        self.assertEqual(self.output.read_text(), "")  # abandoned, not failed: left for the next run
        self.assertNotIn("Failed:", out.getvalue())
        self.assertIn("left for the next run: 40 items", out.getvalue())

    async def test_no_retry_starts_after_the_first_signal(self) -> None:
        self.write_corpus(30)
        shutdown = batcher.Shutdown(grace_s=5)

        def fail(texts: list[str], n: int) -> Exception:
            if n == 1:
                shutdown.request()  # Ctrl-C while the first call is in flight; it then fails with a 503
            return api_error(503)

        client = SpyClient(fail=fail)
        config = batcher.Config(input=self.corpus, output=self.output, batch_size=10, concurrency=1, timeout_s=0.02)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            status = await batcher.main(config, client, shutdown=shutdown)
        self.assertEqual((status, len(client.calls)), (130, 1))


class EveryModelTest(CorpusTestCase):
    async def test_one_vector_per_text_on_every_model_through_the_real_client(self) -> None:
        texts = self.write_corpus(25)
        for model in ("gemini-embedding-001", "gemini-embedding-2"):
            with self.subTest(model=model), stub_server() as (base_url, requests):
                client = real_client(base_url)
                self.addAsyncCleanup(client.aio.aclose)
                # The stub answers as the API does: one vector per request, however many parts it has,
                # so the SDK's merge of a list of strings (every model but -001) gives one vector for two.
                merged = await client.aio.models.embed_content(model=model, contents=["a", "b"])
                self.assertEqual(len(merged.embeddings or []), 1 if model == "gemini-embedding-2" else 2)
                output = self.tmp / f"{model}.jsonl"
                status, _ = await self.run_main(client, model=model, output=output)  # corpus mode
                self.assertEqual(status, 0)
                written = [json.loads(line)["text"] for line in output.read_text().splitlines()]
                self.assertEqual(sorted(written), sorted(texts))
                status, out = await self.run_main(client, model=model, input=None, output=None, num_inputs=12,
                                                  input_delay_s=0)  # fmt: skip
                self.assertEqual(status, 0)  # the document's demo
                self.assertIn("12 embedded, 0 failed items", out)
                async with batcher.BatchedEmbedder(client, model=model, batch_size=5) as embedder:
                    vectors = await asyncio.gather(*(embedder.embed(f"text {i}") for i in range(7)))
                self.assertEqual(len(vectors), 7)
                sent = [request for _, body in requests[1:] for request in body["requests"]]
                self.assertEqual(len(sent), 25 + 12 + 7)  # one request per text: never merged
                self.assertTrue(all(len(request["content"]["parts"]) == 1 for request in sent))


def sent(requests: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every embed request the stub received (one per text), in order."""
    return [request for _, body in requests for request in body["requests"]]


class TaskTypeTest(CorpusTestCase):
    async def test_a_task_type_is_a_field_for_001_and_the_guide_prefix_for_2_in_every_mode(self) -> None:
        texts = self.write_corpus(6)
        for model in ("gemini-embedding-001", "gemini-embedding-2"):
            with self.subTest(model=model), stub_server() as (base_url, requests):
                client = real_client(base_url)
                self.addAsyncCleanup(client.aio.aclose)
                output = self.tmp / f"{model}.jsonl"
                status, _ = await self.run_main(client, model=model, output=output, task_type="RETRIEVAL_QUERY")
                self.assertEqual(status, 0)
                _, demo = await self.run_main(client, model=model, input=None, output=None, num_inputs=3,
                                              input_delay_s=0, task_type="CLUSTERING")  # fmt: skip
                async with BatchedEmbedder(client, model=model, task_type="FACT_VERIFICATION") as embedder:
                    await embedder.embed("the moon is cheese")
                records = [json.loads(line) for line in output.read_text().splitlines()]
                self.assertEqual(sorted(r["text"] for r in records), sorted(texts))  # the user's text, as given
                self.assertIn("Content: input-0 -> Embedding:", demo)
                requests_sent = sent(requests)
                got = [(r.get("taskType"), r["content"]["parts"][0]["text"]) for r in requests_sent]
                expected: list[tuple[str | None, str]]
                if model == "gemini-embedding-001":
                    expected = [("RETRIEVAL_QUERY", t) for t in texts]
                    expected += [("CLUSTERING", f"input-{i}") for i in range(3)]
                    expected.append(("FACT_VERIFICATION", "the moon is cheese"))
                else:
                    expected = [(None, f"task: search result | query: {t}") for t in texts]
                    expected += [(None, f"task: clustering | query: input-{i}") for i in range(3)]
                    expected.append((None, "task: fact checking | query: the moon is cheese"))
                self.assertEqual(sorted(got[:6]), sorted(expected[:6]))
                self.assertEqual(sorted(got[6:]), sorted(expected[6:]))
                manifest = json.loads(batcher.manifest_path(output).read_text())
                self.assertEqual(manifest["settings"]["task_type"], "RETRIEVAL_QUERY")

    async def test_a_resume_with_another_task_type_is_refused(self) -> None:
        self.write_corpus(3)
        await self.run_main(SpyClient(), task_type="RETRIEVAL_DOCUMENT")
        with self.assertRaisesRegex(batcher.UsageError, '^--task-type was "RETRIEVAL_DOCUMENT" for the records in'):
            await self.run_main(SpyClient(), task_type="RETRIEVAL_QUERY")

    def test_a_bad_task_type_gets_one_line_naming_the_choices_and_exit_2(self) -> None:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exit_:
            batcher.parse_args(["--task-type", "retrieval"])
        self.assertEqual(exit_.exception.code, 2)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        self.assertIn("argument --task-type: expected one of RETRIEVAL_QUERY, RETRIEVAL_DOCUMENT,", err.getvalue())
        self.assertIn("got 'retrieval'", err.getvalue())
        self.assertEqual(batcher.parse_args(["--task-type", "retrieval_document"]).task_type, "RETRIEVAL_DOCUMENT")
        with self.assertRaisesRegex(ValueError, "^task_type must be one of RETRIEVAL_QUERY, .*got 'QUERY'"):
            BatchedEmbedder(SpyClient(), task_type="QUERY")


class JsonlCorpusTest(CorpusTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.corpus = self.tmp / "chunks.jsonl"

    def write_rows(self, rows: list[Any]) -> None:
        self.corpus.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    async def test_rows_keep_their_id_title_and_metadata_and_bad_rows_fail_alone(self) -> None:
        self.write_rows([
            {"id": "doc1#0", "text": "Cats purr.", "title": "Cats", "page": 1},
            {"text": "no id here", "source": {"file": "a.pdf"}},
            '{"text": "torn',  # bad JSON
            {"id": "doc1#0", "text": "again"},  # a duplicate id
            {"title": "no text"},
            {"text": "NaN is not JSON", "score": float("nan")},
            {"id": "chunks.jsonl:9", "text": "takes line 9's id"},
            ["not", "an", "object"],
            {"id": 7, "text": "an id that is not a string"},
            {"id": "doc2#0", "text": "  Dogs bark.  ", "title": "Dogs"},
        ])  # fmt: skip
        client = SpyClient()
        status, out = await self.run_main(client)
        self.assertEqual(status, 1)
        failed = sorted(line.split(" -> ")[0] for line in out.splitlines() if line.startswith("Failed:"))
        self.assertEqual(failed, [f"Failed: chunks.jsonl:{n}" for n in (3, 4, 5, 6, 7, 8, 9)])
        self.assertIn('Failed: chunks.jsonl:4 -> bad JSONL row: duplicate id "doc1#0"', out)
        self.assertIn('"text" must be a non-empty string', out)
        self.assertIn("NaN is not valid JSON", out)
        records = {r["id"]: r for r in self.written()}
        self.assertEqual(list(records), ["doc1#0", "chunks.jsonl:2", "doc2#0"])
        self.assertEqual(
            {k: v for k, v in records["doc1#0"].items() if k != "embedding"},
            {"id": "doc1#0", "text": "Cats purr.", "title": "Cats", "metadata": {"page": 1}},
        )
        self.assertEqual(records["chunks.jsonl:2"]["metadata"], {"source": {"file": "a.pdf"}})
        self.assertEqual(records["doc2#0"]["text"], "Dogs bark.")
        self.assertEqual(sorted(t for call in client.calls for t in call), ["Cats purr.", "Dogs bark.", "no id here"])

    async def test_a_rerun_resumes_by_id_and_refuses_a_changed_title(self) -> None:
        rows = [{"id": f"c{i}", "text": f"chunk {i}", "title": f"doc {i // 3}"} for i in range(9)]
        self.write_rows(rows[:5])
        await self.run_main(SpyClient())
        self.write_rows(rows[::-1])  # another order: ids, not lines, say what is done
        client = SpyClient()
        self.assertEqual((await self.run_main(client))[0], 0)
        self.assertEqual(sorted(t for call in client.calls for t in call), [f"chunk {i}" for i in range(5, 9)])
        self.assertEqual(sorted(r["id"] for r in self.written()), [f"c{i}" for i in range(9)])
        rows[4]["title"] = "another title"
        self.write_rows(rows)
        with self.assertRaisesRegex(
            batcher.UsageError, '^the input of c4 changed since it was embedded: "doc 1" -> "an'
        ):
            await self.run_main(SpyClient())

    async def test_stdin_is_text_unless_input_format_jsonl(self) -> None:
        row = json.dumps({"id": "r1", "text": "from a pipe"}) + "\n"
        for input_format, expected in (("auto", ("stdin:1", row.strip())), ("jsonl", ("r1", "from a pipe"))):
            with self.subTest(input_format=input_format), fake_stdin(row.encode()):
                output = self.tmp / f"{input_format}.jsonl"
                await self.run_main(SpyClient(), input=batcher.STDIN, output=output, input_format=input_format)
                record = json.loads(output.read_text())
                self.assertEqual((record["id"], record["text"]), expected)

    async def test_titles_go_one_per_call_to_001_and_in_the_document_prefix_to_2(self) -> None:
        titles = ["Cats", "Cats", None, "Dogs", "Cats", None]
        self.write_rows([{"text": f"t{i}"} | ({"title": t} if t else {}) for i, t in enumerate(titles)])
        for model in ("gemini-embedding-001", "gemini-embedding-2"):
            with self.subTest(model=model), stub_server() as (base_url, requests):
                client = real_client(base_url)
                self.addAsyncCleanup(client.aio.aclose)
                output = self.tmp / f"{model}.jsonl"
                status, _ = await self.run_main(client, model=model, output=output, task_type="RETRIEVAL_DOCUMENT")
                self.assertEqual(status, 0)
                self.assertEqual(len(self.written_to(output)), 6)
                calls = [[(r.get("title"), r["content"]["parts"][0]["text"]) for r in body["requests"]]
                         for _, body in requests]  # fmt: skip
                if model == "gemini-embedding-001":  # a title per call: the batch of 6 goes in 3 calls
                    self.assertEqual(calls, [
                        [("Cats", "t0"), ("Cats", "t1"), ("Cats", "t4")], [(None, "t2"), (None, "t5")], [("Dogs", "t3")]
                    ])  # fmt: skip
                    self.assertTrue(all(r["taskType"] == "RETRIEVAL_DOCUMENT" for r in sent(requests)))
                else:
                    self.assertEqual(calls, [[
                        (None, f"title: {t or 'none'} | text: t{i}") for i, t in enumerate(titles)
                    ]])  # fmt: skip

    def written_to(self, output: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in output.read_text().splitlines()]


class BatchStub:
    """The Batch API's REST surface for embeddings, as google-genai sends it (files.py, batches.py,
    _api_client.py): the resumable upload (POST /upload/v1beta/files, answered with an absolute
    x-goog-upload-url; POSTs there with "upload" / "upload, finalize", answered x-goog-upload-status
    active / final and {"file": {...}}); POST .../models/{m}:asyncBatchEmbedContent with
    {"batch": {"inputConfig": {"file_name"}}} (the SDK's own field name), answered as a long-running
    operation; GET .../batches/N (BATCH_STATE_RUNNING for polls_to_end polls, then end_states[N-1] or
    SUCCEEDED, with metadata.output.responsesFile); GET .../files/{name}:download?alt=media, whose
    lines are {"key", "response": {"embedding": {"values"}}} passed through results(rows)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.requests: list[tuple[str, str, bytes]] = []
        self.files: dict[str, bytes] = {}
        self.sessions: dict[str, bytearray] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.polls_to_end = 1
        self.end_states: list[str] = []
        self.results: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] = lambda rows: rows
        self.port = 0
        # Faults: statuses to answer, in turn, per call ("create" makes the job first: a late answer).
        self.faults: dict[str, list[int]] = {"get": [], "create": [], "download": [], "cancel": []}
        self.hold_uploads = threading.Event()  # set: an upload start hangs until released
        self.released = threading.Event()

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self.changed:
            self.requests.append((method, path, body))
            try:
                return self._handle(method, path, headers, body)
            finally:
                self.changed.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout_s), "the stub waited in vain"

    def fault(self, call: str) -> tuple[int, dict[str, str], bytes] | None:
        if not self.faults[call]:
            return None
        code = self.faults[call].pop(0)
        status = {403: "PERMISSION_DENIED", 404: "NOT_FOUND", 503: "UNAVAILABLE"}.get(code, "UNKNOWN")
        return code, {}, json.dumps({"error": {"code": code, "message": f"{call} fault", "status": status}}).encode()

    def _handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if (refusal := refused_on_v1(path)) is not None:
            return 404, {}, json.dumps(refusal).encode()
        if method == "GET" and re.fullmatch(r"/v1(beta)?/batches(\?.*)?", path):
            if "filter=" in path:  # the Developer API refuses a list filter
                return 400, {}, b'{"error": {"code": 400, "message": "filter", "status": "INVALID_ARGUMENT"}}'
            return 200, {}, json.dumps({"operations": [self.operation(name) for name in reversed(self.jobs)]}).encode()
        if method == "POST" and re.fullmatch(r"/upload/v1(beta)?/files", path):
            if self.hold_uploads.is_set():
                self.changed.notify_all()  # the upload is under way
                self.changed.release()  # others may be served meanwhile
                try:
                    self.released.wait(30)
                finally:
                    self.changed.acquire()
            assert headers["X-Goog-Upload-Protocol"] == "resumable" and headers["X-Goog-Upload-Command"] == "start"
            session = str(len(self.sessions) + 1)
            self.sessions[session] = bytearray()
            url = f"http://127.0.0.1:{self.port}/upload-session/{session}"
            return 200, {"x-goog-upload-url": url, "x-goog-upload-status": "active"}, b"{}"
        if method == "POST" and (m := re.fullmatch(r"/upload-session/(\d+)", path)):
            data = self.sessions[m.group(1)]
            assert int(headers["X-Goog-Upload-Offset"]) == len(data)
            data += body
            if "finalize" not in headers["X-Goog-Upload-Command"]:
                return 200, {"x-goog-upload-status": "active"}, b"{}"
            name = f"files/upload-{m.group(1)}"
            self.files[name] = bytes(data)
            file = {"name": name, "mimeType": "jsonl", "sizeBytes": str(len(data)), "state": "ACTIVE"}
            return 200, {"x-goog-upload-status": "final"}, json.dumps({"file": file}).encode()
        if method == "POST" and (m := re.fullmatch(r"/v1(beta)?/models/([^/:]+):asyncBatchEmbedContent", path)):
            batch = json.loads(body)["batch"]
            name = f"batches/{len(self.jobs) + 1}"
            self.jobs[name] = {"file": batch["inputConfig"]["file_name"], "model": m.group(2), "polls": 0,
                               "display_name": batch.get("displayName"), "state": "BATCH_STATE_PENDING"}  # fmt: skip
            if (late := self.fault("create")) is not None:
                return late  # made, but the answer says otherwise
            return 200, {}, json.dumps(self.operation(name)).encode()
        if method == "GET" and (m := re.fullmatch(r"/v1(beta)?/(batches/\d+)", path)):
            if (fault := self.fault("get")) is not None:
                return fault
            job = self.jobs[m.group(2)]
            job["polls"] += 1
            if job["state"] in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
                number = int(m.group(2).split("/")[1])
                ends = self.end_states[number - 1] if number <= len(self.end_states) else "BATCH_STATE_SUCCEEDED"
                job["state"] = ends if job["polls"] > self.polls_to_end else "BATCH_STATE_RUNNING"
                if job["state"] == "BATCH_STATE_SUCCEEDED":
                    self.files[f"files/results-{number}"] = self.answer(self.files[job["file"]])
            return 200, {}, json.dumps(self.operation(m.group(2))).encode()
        if method == "POST" and (m := re.fullmatch(r"/v1(beta)?/(batches/\d+):cancel", path)):
            if (fault := self.fault("cancel")) is not None:
                return fault
            self.jobs[m.group(2)]["state"] = "BATCH_STATE_CANCELLED"
            return 200, {}, b"{}"
        if method == "GET" and (m := re.fullmatch(r"/v1(beta)?/files/([^/:]+):download\?alt=media", path)):
            if (fault := self.fault("download")) is not None:
                return fault
            return 200, {"Content-Type": "application/octet-stream"}, self.files[f"files/{m.group(2)}"]
        raise AssertionError(f"the stub does not know {method} {path}")

    def operation(self, name: str) -> dict[str, Any]:
        job = self.jobs[name]
        metadata: dict[str, Any] = {"model": f"models/{job['model']}", "state": job["state"],
                                    "displayName": job["display_name"]}  # fmt: skip
        if job["state"] == "BATCH_STATE_SUCCEEDED":
            metadata["output"] = {"responsesFile": f"files/results-{name.split('/')[1]}"}
        return {"name": name, "metadata": metadata}

    def answer(self, requests: bytes) -> bytes:
        rows = []
        for line in requests.decode().splitlines():
            row = json.loads(line)
            text = row["request"]["content"]["parts"][0]["text"]
            rows.append({"key": row["key"], "response": {"embedding": {"values": [float(len(text)), 0.0, 0.0]}}})
        return "".join(json.dumps(row) + "\n" for row in self.results(rows)).encode()

    def created(self) -> int:
        return len(self.jobs)

    def uploaded_requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for name, data in self.files.items() if name.startswith("files/upload")
                for line in data.decode().splitlines()]  # fmt: skip


class BatchStubHandler(BaseHTTPRequestHandler):
    stub: BatchStub

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.serve("GET")

    def do_POST(self) -> None:
        self.serve("POST")

    def serve(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers, data = self.stub.handle(method, self.path, self.headers, body)
        headers.setdefault("Content-Type", "application/json")
        with contextlib.suppress(ConnectionError):  # a client that gave up (a hung upload abandoned)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)


@contextlib.contextmanager
def batch_server() -> Iterator[tuple[str, BatchStub]]:
    stub = BatchStub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (BatchStubHandler,), {"stub": stub}))
    stub.port = server.server_port
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", stub
    finally:
        server.shutdown()
        server.server_close()


class BatchApiTest(CorpusTestCase):
    async def run_batch(self, url: str, **changes: Any) -> tuple[int, str]:
        client = real_client(url)
        try:
            settings = {"batch_api": True, "poll_interval_s": 0.01, "batch_job_size": 4} | changes
            return await self.run_main(client, **settings)
        finally:
            await client.aio.aclose()

    async def test_jobs_go_through_upload_create_poll_download_and_give_the_interactive_records(self) -> None:
        self.corpus = self.tmp / "chunks.jsonl"
        rows = [{"id": f"c{i}", "text": f"chunk {i}", "title": "Doc", "page": i} for i in range(9)]
        self.corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
        for model in ("gemini-embedding-001", "gemini-embedding-2"):
            output = self.tmp / f"{model}.jsonl"
            with self.subTest(model=model), batch_server() as (url, stub):
                status, out = await self.run_batch(url, model=model, output=output, task_type="RETRIEVAL_DOCUMENT",
                                                   dimensions=768)  # fmt: skip
                self.assertEqual(status, 0, out)
                self.assertEqual(stub.created(), 3)  # jobs of 4, 4 and 1
                self.assertRegex(stub.jobs["batches/1"]["display_name"], rf"^batcher\.py {model}\.jsonl job_00001 \d+$")
                self.assertIn("3 Batch API jobs created, billed at the batch price", out)
                sent = {r["key"]: r["request"] for r in stub.uploaded_requests()}
                if model == "gemini-embedding-001":
                    self.assertEqual(sent["c0"], {"content": {"parts": [{"text": "chunk 0"}]},
                                                  "taskType": "RETRIEVAL_DOCUMENT", "title": "Doc",
                                                  "outputDimensionality": 768})  # fmt: skip
                else:
                    self.assertEqual(sent["c0"], {"content": {"parts": [{"text": "title: Doc | text: chunk 0"}]},
                                                  "outputDimensionality": 768})  # fmt: skip
                records = {r["id"]: r for r in (json.loads(line) for line in output.read_text().splitlines())}
                self.assertEqual(sorted(records), sorted(f"c{i}" for i in range(9)))
                self.assertEqual(records["c3"]["metadata"], {"page": 3})
                self.assertEqual(records["c3"]["embedding"], [1.0, 0.0, 0.0])  # unit length, as interactive
                manifest = json.loads(batcher.manifest_path(output).read_text())
                self.assertEqual(manifest["jobs"], [])

    async def test_shuffled_results_a_missing_key_and_a_row_error_are_matched_by_key(self) -> None:
        texts = self.write_corpus(8)
        lost: list[str] = []

        def results(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            rows = rows[::-1]
            lost.append(rows.pop(0)["key"])
            rows[0] = {"key": rows[0]["key"], "error": {"code": 400, "message": "too long", "status": "INVALID"}}
            lost.append(rows[0]["key"])
            return rows

        with batch_server() as (url, stub):
            stub.results = results
            status, out = await self.run_batch(url, normalize=False)
        self.assertEqual(status, 1)
        written = {r["id"]: r for r in self.written()}
        self.assertTrue(all(r["embedding"] == [float(len(r["text"])), 0.0, 0.0] for r in written.values()))
        self.assertEqual(len(written) + len(lost), len(texts))
        self.assertIn("no result for this text in batch job batches/", out)
        self.assertIn("batch: 400 INVALID: too long", out)
        with batch_server() as (url, stub):  # the failed ones go again: never written, never lost
            self.assertEqual((await self.run_batch(url, normalize=False))[0], 0)
            self.assertEqual(stub.created(), 1)
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))

    async def test_an_expired_job_is_resubmitted_and_ctrl_c_while_waiting_is_resumed_without_a_new_job(self) -> None:
        texts = self.write_corpus(6)
        with batch_server() as (url, stub):
            stub.end_states = ["BATCH_STATE_EXPIRED"]
            stub.polls_to_end = 10**9  # waits until the test lets it end
            shutdown = batcher.Shutdown()

            def both_recorded() -> None:  # created, and in the manifest: the first already waited on
                stub.wait_until(lambda: stub.created() == 2 and any(m == "GET" for m, _, _ in stub.requests))
                deadline = time.monotonic() + 10
                while len(json.loads(batcher.manifest_path(self.output).read_text()).get("jobs", [])) < 2:
                    assert time.monotonic() < deadline, "the second job was never recorded"
                    time.sleep(0.005)

            async def interrupt() -> None:
                await asyncio.to_thread(both_recorded)
                shutdown.request(signal.SIGINT)

            client = real_client(url)
            self.addAsyncCleanup(client.aio.aclose)
            config = batcher.Config(input=self.corpus, output=self.output, batch_api=True, poll_interval_s=30,
                                    batch_job_size=4)  # fmt: skip
            started = time.monotonic()
            err = io.StringIO()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(interrupt())
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                    status = await batcher.main(config, client, shutdown=shutdown)
            self.assertLess(time.monotonic() - started, 5)  # at once: not a 30 s poll nor the 5 s grace
            self.assertEqual(status, 130)
            self.assertIn("2 Batch API jobs still running at Google", err.getvalue())
            with self.assertRaisesRegex(batcher.UsageError, "run with --batch-api to collect them"):
                await self.run_main(SpyClient())
            stub.polls_to_end = 0
            self.assertEqual((await self.run_batch(url))[0], 0)
            self.assertEqual(stub.created(), 3)  # the expired job again, once; no new job for the other
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))


class BatchSeamTest(CorpusTestCase):
    """The seams between --batch-api, resume and faults, through the real client and the stub."""

    async def run_batch(self, url: str, shutdown: batcher.Shutdown | None = None, **changes: Any) -> tuple[int, str]:
        client = real_client(url)
        settings: dict[str, Any] = {"input": self.corpus, "output": self.output, "batch_api": True,
                                    "poll_interval_s": 0.01, "batch_job_size": 4, "max_attempts": 3,
                                    "request_timeout_s": 2}  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                async with asyncio.timeout(30):
                    config = batcher.Config(**(settings | changes))
                    status = await batcher.main(config, client, shutdown=shutdown or batcher.Shutdown())
        finally:
            await client.aio.aclose()
        return status, out.getvalue() + err.getvalue()

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads(batcher.manifest_path(self.output).read_text()))

    def batch_folder(self) -> Path:
        return self.output.with_name(self.output.name + ".batch")

    async def leave_a_live_job(self, url: str, stub: BatchStub) -> None:
        """Runs until a job is recorded, then stops as Ctrl-C does: the job stays live at the stub."""
        stub.polls_to_end = 10**9
        shutdown = batcher.Shutdown()

        async def interrupt() -> None:
            await asyncio.to_thread(stub.wait_until, lambda: any(m == "GET" for m, _, _ in stub.requests))
            shutdown.request(signal.SIGINT)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(interrupt())
            self.assertEqual((await self.run_batch(url, shutdown=shutdown))[0], 130)
        stub.polls_to_end = 0

    async def test_records_of_a_collected_job_still_in_the_manifest_are_not_written_again(self) -> None:
        texts = self.write_corpus(8)
        with batch_server() as (url, stub):
            self.assertEqual((await self.run_batch(url))[0], 0)
            kept = self.manifest()
            stub.jobs = {}  # as if run 1 was killed after writing: the jobs still recorded, and the stub knows them
            self.assertEqual((await self.run_batch(url))[0], 0)
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))
        # Recorded again, as kill -9 after the writes leaves them: a re-run writes nothing twice.
        with batch_server() as (url, stub):
            self.assertEqual((await self.run_batch(url))[0], 0)
            jobs: list[dict[str, Any]] = [
                {"name": f"batches/{i + 1}", "texts": f"job_{i + 1:05d}.jsonl", "attempt": 1} for i in range(2)
            ]
            self.batch_folder().mkdir()
            for i, job in enumerate(jobs):
                rows = [{"id": r["id"], "text": r["text"], "title": None, "metadata": None}
                        for r in self.written()[4 * i : 4 * i + 4]]  # fmt: skip
                (self.batch_folder() / job["texts"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
                stub.jobs[job["name"]] = {"file": "files/none", "model": "m", "polls": 0, "display_name": None,
                                          "state": "BATCH_STATE_SUCCEEDED"}  # fmt: skip
                stub.files[f"files/results-{i + 1}"] = stub.answer(
                    "".join(json.dumps({"key": r["id"], "request": {"content": {"parts": [{"text": r["text"]}]}}})
                            + "\n" for r in rows).encode()
                )  # fmt: skip
            batcher.write_manifest(self.output, kept | {"jobs": jobs})
            status, out = await self.run_batch(url)
            self.assertEqual(status, 0, out)
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))
        self.assertEqual(self.manifest()["jobs"], [])

    async def test_a_live_job_keeps_its_settings_and_its_texts(self) -> None:
        self.write_corpus(6)
        with batch_server() as (url, stub):
            await self.leave_a_live_job(url, stub)
            self.assertEqual(self.written(), [])
            created = stub.created()
            with self.assertRaisesRegex(batcher.UsageError, r"--dimensions was \(none\) .* now 5"):
                await self.run_batch(url, dimensions=5)
            self.corpus.write_text(self.corpus.read_text().replace("text number 1", "text number one"))
            with self.assertRaisesRegex(batcher.UsageError, "the input of corpus.txt:2 changed"):
                await self.run_batch(url)
            self.assertEqual(stub.created(), created)  # no new job for either

    async def test_batch_cancel_cancels_the_recorded_jobs_whatever_the_flags_and_forgets_them(self) -> None:
        texts = self.write_corpus(6)
        with batch_server() as (url, stub):
            await self.leave_a_live_job(url, stub)
            (self.batch_folder() / "job_00042.jsonl").write_text("{}\n")  # an orphan (kill -9 before its record)
            settings, recorded = self.manifest()["settings"], len(self.manifest()["jobs"])  # 1 or 2, as Ctrl-C fell
            status, out = await self.run_batch(url, batch_cancel=True, batch_api=False, input=None, dimensions=5)
            self.assertEqual(status, 0, out)  # the flags of the run it cancels are not needed
            jobs = batcher.plural(recorded, "Batch API job")
            self.assertTrue(out.endswith(f"Summary: {jobs} cancelled or forgotten, 0 still recorded\n"), out)
            self.assertEqual(stub.jobs["batches/1"]["state"], "BATCH_STATE_CANCELLED")
        self.assertEqual(self.manifest(), self.manifest() | {"settings": settings, "jobs": []})
        self.assertFalse(self.batch_folder().exists())  # its files and the orphan gone with it
        self.assertEqual((await self.run_main(SpyClient()))[0], 0)  # the texts, embedded now
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))

    async def test_batch_cancel_works_offline_on_the_simulated_batch_api(self) -> None:
        texts, shutdown, record = self.write_corpus(4), batcher.Shutdown(), batcher.Ledger.record

        async def record_then_stop(ledger: batcher.Ledger, job: batcher.Job, *, replacing: Any = None) -> None:
            await record(ledger, job, replacing=replacing)
            if job.name:  # created: Ctrl-C now leaves it live
                shutdown.request(signal.SIGINT)

        offline: dict[str, Any] = {
            "input": self.corpus,
            "output": self.output,
            "batch_api": True,
            "poll_interval_s": 60,
        }
        with mock.patch.object(batcher.Ledger, "record", record_then_stop):
            status = await batcher.main(batcher.Config(**offline), batcher.SimulatedClient(), shutdown=shutdown)
        self.assertEqual((status, len(self.manifest()["jobs"])), (130, 1))
        with contextlib.redirect_stdout(io.StringIO()) as out:
            cancel = batcher.Config(output=self.output, batch_cancel=True)
            status = await batcher.main(cancel, batcher.SimulatedClient(), shutdown=batcher.Shutdown())
        self.assertEqual((status, self.manifest()["jobs"]), (0, []), out.getvalue())
        self.assertEqual((await self.run_main(SpyClient()))[0], 0)
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))

    async def test_batch_cancel_keeps_a_job_whose_cancel_the_key_refused_or_a_fault_cut_off(self) -> None:
        self.write_corpus(4)
        with batch_server() as (url, stub):
            await self.leave_a_live_job(url, stub)
            stub.faults["cancel"] = [403, 503]  # the key refused; then a fault, and no attempt left
            for _ in range(2):
                status, out = await self.run_batch(url, batch_cancel=True, max_attempts=1)
                self.assertEqual(status, 1, out)
                self.assertRegex(
                    out, r"batches/1: (403 PERMISSION_DENIED|503 UNAVAILABLE): cancel fault; still recorded"
                )
                self.assertEqual([job["name"] for job in self.manifest()["jobs"]], ["batches/1"])
            shutdown = batcher.Shutdown()
            shutdown.request(signal.SIGINT)  # Ctrl-C before the cancel: nothing is sent, the job stays
            self.assertEqual((await self.run_batch(url, shutdown, batch_cancel=True))[0], 130)
            self.assertEqual([job["name"] for job in self.manifest()["jobs"]], ["batches/1"])
            self.assertEqual((await self.run_batch(url, batch_cancel=True))[0], 0)
            self.assertEqual(self.manifest()["jobs"], [])

    async def test_a_403_on_get_stops_the_run_and_keeps_the_job_for_the_next_run(self) -> None:
        texts = self.write_corpus(4)
        with batch_server() as (url, stub):
            stub.faults["get"] = [403]
            status, out = await self.run_batch(url)
            self.assertEqual(status, 2)
            self.assertIn("cannot look at batch job batches/1 (403 PERMISSION_DENIED", out)
            self.assertEqual([job["name"] for job in self.manifest()["jobs"]], ["batches/1"])
            self.assertEqual((await self.run_batch(url))[0], 0)
            self.assertEqual(stub.created(), 1)  # never paid twice
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))

    async def test_a_create_answered_with_an_error_after_making_the_job_adopts_it(self) -> None:
        texts = self.write_corpus(4)
        with batch_server() as (url, stub):
            stub.faults["create"] = [503]
            status, out = await self.run_batch(url, max_attempts=3)
            self.assertEqual(status, 0, out)
            self.assertEqual(stub.created(), 1)
            listed = [p for m, p, _ in stub.requests if m == "GET" and p.endswith("/batches?pageSize=100")]
            self.assertEqual(len(listed), 1, stub.requests)
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))

    async def test_a_kill_between_create_and_its_record_adopts_the_job_and_pays_once(self) -> None:
        texts = self.write_corpus(4)
        record = batcher.Ledger.record

        async def killed_once_created(ledger: batcher.Ledger, job: batcher.Job, *, replacing: Any = None) -> None:
            if job.name and replacing is not None and not replacing.name:  # create returned: kill -9 now
                raise Killed
            await record(ledger, job, replacing=replacing)

        with batch_server() as (url, stub):
            with mock.patch.object(batcher.Ledger, "record", killed_once_created), self.assertRaises(KILLED):
                await self.run_batch(url)
            [pending] = self.manifest()["jobs"]
            self.assertEqual((pending["name"], stub.created()), ("", 1))  # made at Google, not named here
            self.assertEqual(pending["display_name"], stub.jobs["batches/1"]["display_name"])
            status, out = await self.run_batch(url)
            self.assertEqual(status, 0, out)
            self.assertEqual(stub.created(), 1)  # adopted by its display name: never paid twice
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))
        self.assertEqual(self.manifest()["jobs"], [])

    async def test_a_kill_before_a_recorded_create_reached_the_api_sends_the_texts_once_on_the_next_run(self) -> None:
        texts = self.write_corpus(4)
        with batch_server() as (url, stub):
            with mock.patch.object(batcher.EmbedJobs, "create", side_effect=Killed), self.assertRaises(KILLED):
                await self.run_batch(url)
            self.assertEqual([(job["name"], job["attempt"]) for job in self.manifest()["jobs"]], [("", 1)])
            status, out = await self.run_batch(url, max_attempts=1)  # a job never made is not an attempt
            self.assertEqual(status, 0, out)
            self.assertEqual(stub.created(), 1)
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))
        self.assertFalse(self.batch_folder().exists())

    async def test_a_failing_download_is_retried_and_a_gone_results_file_resends_the_texts(self) -> None:
        texts = self.write_corpus(4)
        with batch_server() as (url, stub):
            stub.faults["download"] = [503, 404]
            status, out = await self.run_batch(url, max_attempts=3)
            self.assertEqual(status, 0, out)
            self.assertEqual(stub.created(), 2)  # the first job's results gone for good: sent again, once
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))
        self.assertFalse(self.batch_folder().exists())  # no empty results file left behind

    async def test_ctrl_c_during_a_hung_upload_exits_130_within_the_grace_and_leaves_no_file(self) -> None:
        self.write_corpus(4)
        with batch_server() as (url, stub):
            stub.hold_uploads.set()
            self.addCleanup(stub.released.set)
            shutdown = batcher.Shutdown(grace_s=0.5)

            async def interrupt() -> None:
                await asyncio.to_thread(stub.wait_until, lambda: bool(stub.requests))
                shutdown.request(signal.SIGINT)

            started = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(interrupt())
                status, _ = await self.run_batch(url, shutdown=shutdown, request_timeout_s=60)
            self.assertEqual(status, 130)
            self.assertLess(time.monotonic() - started, 5)
            self.assertEqual(stub.created(), 0)
        self.assertEqual(list(self.batch_folder().glob("*")) if self.batch_folder().exists() else [], [])

    async def test_job_files_are_found_from_any_folder_and_orphans_are_removed(self) -> None:
        texts = self.write_corpus(6)
        with batch_server() as (url, stub):
            await self.leave_a_live_job(url, stub)
            self.assertTrue(all("/" not in job["texts"] for job in self.manifest()["jobs"]))
            orphan = self.batch_folder() / "job_00042.jsonl"  # written, never recorded (a kill -9 between)
            orphan.write_text("{}\n")
            elsewhere = self.tmp / "elsewhere"
            elsewhere.mkdir()
            cwd = os.getcwd()
            os.chdir(elsewhere)
            try:
                self.assertEqual((await self.run_batch(url))[0], 0)
            finally:
                os.chdir(cwd)
            self.assertFalse(orphan.exists())
            self.assertEqual(stub.created(), 2)
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))


class CostTest(CorpusTestCase):
    """--price and --max-cost. An embedding's tokens are its characters / 4 (the Developer API
    reports none): texts of 400 characters are 100 tokens each, however they are batched."""

    async def test_the_summary_names_the_cost_to_the_cent_interactive_and_batch_api(self) -> None:
        self.write_texts(10)  # 1,000 tokens: $1.00 at $1,000 per 1M tokens
        with stub_server() as (base_url, _):
            client = real_client(base_url)
            self.addAsyncCleanup(client.aio.aclose)
            status, out = await self.run_main(client, price=(1000.0,))
        self.assertEqual(status, 0, out)
        self.assertIn("  cost: $1.00 at --price 1000\n", out)
        self.output.unlink()
        batcher.manifest_path(self.output).unlink()
        with batch_server() as (url, _):
            status, out = await self.run_batch(url, price=(1000.0,))
        self.assertEqual(status, 0, out)
        self.assertIn("  cost: $0.50 at --price 1000 (Batch API: half the given price)\n", out)
        status, out = await self.run_main(SpyClient())  # no --price: a hint, not a sum
        self.assertIn("cost: give --price", out)

    async def run_batch(self, url: str, **changes: Any) -> tuple[int, str]:
        client = real_client(url)
        try:
            return await self.run_main(client, batch_api=True, poll_interval_s=0.01, batch_job_size=4, **changes)
        finally:
            await client.aio.aclose()

    async def test_max_cost_stops_within_the_budget_and_a_rerun_without_it_embeds_each_text_once(self) -> None:
        texts = self.write_texts(50)  # $0.01 a text at $100 per 1M tokens: calls of 2, $0.02 each
        client = SpyClient(latency_s=0.01)
        with contextlib.redirect_stderr(err := io.StringIO()):
            status, out = await self.run_main(client, price=(100.0,), max_cost_usd=0.1, batch_size=2, concurrency=2)
        self.assertEqual(status, 2, out)
        [line] = err.getvalue().splitlines()
        self.assertRegex(
            line,
            r"^batcher\.py: error: the budget of \$0\.10 is reached: \$0\.0\d spent, .*\$0\.0\d left, and the next "
            r"call or job would cost about \$0\.02;",
        )
        self.assertLessEqual(len(self.written()), 10)  # $0.10: 10 texts at most, estimates being exact here
        self.assertGreaterEqual(len(self.written()), 8)  # and not far under it
        self.assertIn("cost: $0.", out)
        status, out = await self.run_main(SpyClient())
        self.assertEqual(status, 0, out)
        self.assertEqual(sorted(r["text"] for r in self.written()), sorted(texts))

    async def test_a_dry_runs_dollars_are_what_an_interactive_and_a_batch_api_run_pay(self) -> None:
        self.corpus.write_text("".join(f"{i:04d}" + "x" * 397 + "\n" for i in range(8)))  # 100.25 tokens each
        price, dry = (10_000.0,), "  cost: $8.02 interactive, $4.01 with the Batch API (half price)"  # 802 tokens
        self.assertIn(dry, (await self.run_main(SpyClient(), dry_run=True, price=price))[1])
        self.assertIn("  cost: $8.02 at --price 10000\n", (await self.run_main(SpyClient(), price=price))[1])
        self.output.unlink()
        batcher.manifest_path(self.output).unlink()
        with batch_server() as (url, _):
            status, out = await self.run_batch(url, price=price)
        self.assertEqual(status, 0, out)
        self.assertIn("  cost: $4.01 at --price 10000 (Batch API: half the given price)\n", out)

    async def test_a_batch_api_jobs_results_are_paid_out_of_its_hold_never_counted_twice(self) -> None:
        self.write_texts(4)  # one job: $0.02 at $100 per 1M tokens, half price; $0.005 a result
        deliver, counted = batcher.EmbedJobs.deliver, list[float]()

        async def deliver_and_count(kind: batcher.EmbedJobs, item: Any, row: Any, job: Any) -> None:
            counted.append(round(kind.cost.spent_usd + kind.cost.held_usd, 9))  # what a budget sees between results
            await deliver(kind, item, row, job)

        with batch_server() as (url, _), mock.patch.object(batcher.EmbedJobs, "deliver", deliver_and_count):
            status, out = await self.run_batch(url, price=(100.0,))
        self.assertEqual(status, 0, out)
        self.assertEqual(counted, [0.02] * 4)  # spent + held: the job's dollars once, as its results are paid

    async def test_a_batch_api_job_past_the_budget_is_not_submitted(self) -> None:
        self.write_texts(12)  # jobs of 4 texts: $0.04 each at $100 per 1M tokens, half price: $0.02
        with batch_server() as (url, stub), contextlib.redirect_stderr(err := io.StringIO()):
            stub.polls_to_end = 10**9  # no job ends, so none is paid for before the third is refused
            status, out = await self.run_batch(url, price=(100.0,), max_cost_usd=0.05)
            self.assertEqual(status, 2, out)
            self.assertIn("$0.04 held by calls or jobs in flight, $0.01 left", err.getvalue())
            self.assertEqual(stub.created(), 2)  # a third would hold $0.06


class DryRunTest(CorpusTestCase):
    async def test_a_dry_run_calls_nothing_writes_nothing_and_counts_only_what_is_left(self) -> None:
        texts = self.write_texts(10)
        self.corpus.write_text("".join(text + "\n" for text in texts[:4]))
        self.assertEqual((await self.run_main(SpyClient()))[0], 0)
        self.corpus.write_text("".join(text + "\n" for text in texts))  # 6 more, of 100 tokens each
        before = {path.name: path.read_bytes() for path in self.tmp.iterdir() if path.is_file()}
        with stub_server() as (base_url, requests):
            client = real_client(base_url)
            self.addAsyncCleanup(client.aio.aclose)
            status, out = await self.run_main(client, dry_run=True, price=(0.15,), rpm=60, batch_size=4)
            self.assertEqual((status, requests), (0, []))
        self.assertEqual({path.name: path.read_bytes() for path in self.tmp.iterdir() if path.is_file()}, before)
        self.assertEqual(out.splitlines(), [
            "Dry run: 6 texts to send, 4 skipped (done, or waiting in a recorded Batch API job); nothing was called "
            "or written",
            "  input tokens: about 600 (characters / 4)",
            "  cost: $0.000090 interactive, $0.000045 with the Batch API (half price)",
            "  the quota (--rpm, --tpm) makes it take at least 2 s (0.0 h)",  # 2 calls of 4 texts at most
        ])  # fmt: skip

    async def test_a_dry_run_refuses_what_a_run_refuses_and_makes_no_file(self) -> None:
        self.write_texts(3)
        status, out = await self.run_main(SpyClient(), dry_run=True)
        self.assertEqual(status, 0)
        self.assertIn("3 texts to send, 0 skipped", out)
        self.assertEqual(sorted(path.name for path in self.tmp.iterdir()), [self.corpus.name])
        self.assertEqual((await self.run_main(SpyClient()))[0], 0)
        before = {path.name: path.read_bytes() for path in self.tmp.iterdir() if path.is_file()}
        with self.assertRaisesRegex(batcher.UsageError, r"--dimensions was \(none\) for the records"):
            await self.run_main(SpyClient(), dry_run=True, dimensions=5)
        self.assertEqual({path.name: path.read_bytes() for path in self.tmp.iterdir() if path.is_file()}, before)


class UnitVectorTest(CorpusTestCase):
    async def test_vectors_are_unit_length_unless_no_normalize_in_corpus_mode_the_demo_and_embedder(self) -> None:
        self.write_corpus(12)
        with stub_server() as (base_url, _):  # it answers [0.5, -0.5, i]: not unit length
            client = real_client(base_url)
            self.addAsyncCleanup(client.aio.aclose)
            for normalize in (True, False):
                output = self.tmp / f"normalize-{normalize}.jsonl"
                await self.run_main(client, output=output, normalize=normalize)
                vectors = [json.loads(line)["embedding"] for line in output.read_text().splitlines()]
                _, demo = await self.run_main(client, input=None, output=None, num_inputs=5, input_delay_s=0,
                                              normalize=normalize)  # fmt: skip
                vectors += [
                    json.loads(line.partition("Embedding: ")[2]) for line in demo.splitlines() if "Content:" in line
                ]
                async with batcher.BatchedEmbedder(client, batch_size=4, normalize=normalize) as embedder:
                    vectors += [
                        e.values or [] for e in await asyncio.gather(*(embedder.embed(f"q{i}") for i in range(4)))
                    ]
                self.assertEqual(len(vectors), 12 + 5 + 4)
                lengths = {round(math.hypot(*vector), 9) for vector in vectors}
                self.assertEqual(lengths == {1.0}, normalize, lengths)
        self.assertEqual(batcher.unit_vector([0.6, 0.8]), [0.6, 0.8])  # already unit length: kept
        self.assertEqual(batcher.unit_vector([0.0, 0.0]), [0.0, 0.0])

    def test_a_record_keeps_9_significant_digits_enough_for_every_float32(self) -> None:
        item = batcher.Input("a:1", "a")
        line = batcher.record_line(item, [0.0066913045, -0.123456789012, 3.0, 1e-05, 1 / 3])
        self.assertIn('"embedding": [0.0066913045, -0.123456789, 3.0, 1e-05, 0.333333333]}', line)
        rng = random.Random(5)
        values = [struct.unpack("f", struct.pack("f", rng.gauss(0, 0.05)))[0] for _ in range(1000)]
        written = json.loads(batcher.record_line(item, values))["embedding"]
        self.assertEqual([struct.pack("f", v) for v in written], [struct.pack("f", v) for v in values])
        self.assertIn('"embedding": [NaN, Infinity]', batcher.record_line(item, [math.nan, math.inf]))

    async def test_a_resume_with_normalization_changed_is_refused(self) -> None:
        self.write_corpus(5)
        await self.run_main(SpyClient())
        with self.assertRaisesRegex(batcher.UsageError, r"^normalization \(--no-normalize\) was true for the records"):
            await self.run_main(SpyClient(), normalize=False)


class KeepAliveTest(CorpusTestCase):
    async def test_the_keep_alive_pool_holds_a_connection_per_call_in_flight_across_pauses(self) -> None:
        self.write_corpus(120)
        connections, calls = itertools.count(), itertools.count(1)

        class KeepAliveHandler(StubHandler):
            protocol_version = "HTTP/1.1"  # keeps connections open, as the real API does

            def setup(self) -> None:
                next(connections)  # one handler per connection
                super().setup()

            def do_POST(self) -> None:
                if next(calls) % 15:  # every 15th call: a pause for all
                    super().do_POST()
                    return
                self.rfile.read(int(self.headers["Content-Length"]))
                details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.05s"}]
                error = {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": details}
                self.reply(429, {"error": error})

        requests: list[tuple[str, dict[str, Any]]] = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (KeepAliveHandler,), {"requests": requests}))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        env = {
            "GEMINI_API_KEY": "k",
            "GOOGLE_API_KEY": "",
            "GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{server.server_port}",
        }
        with mock.patch.dict(os.environ, env):
            client = batcher.make_client(offline=False, fake_latency_s=0, connections=32)
        self.addAsyncCleanup(client.aio.aclose)
        status, _ = await self.run_main(client, batch_size=1, concurrency=32, quiet=True)
        self.assertEqual(status, 0)
        self.assertEqual(len(self.written()), 120)
        self.assertLessEqual(next(connections), 32 + 4)  # with 20 kept, each pause would reopen 12


class RunStopTest(CorpusTestCase):
    """Errors that every call would meet stop the run and report nothing: a re-run does it all."""

    async def run_quietly(self, client: Any, **changes: Any) -> tuple[int, str, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status, out = await self.run_main(client, **changes)
        return status, out, err.getvalue()

    async def test_a_spent_daily_quota_stops_the_run_names_the_quota_and_reports_nothing(self) -> None:
        self.write_corpus(100)
        quota = "EmbedContentRequestsPerDayPerProjectPerModel-FreeTier"
        details = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": quota}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "40s"},
        ]
        error = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": details}}
        started = time.monotonic()
        with stub_server(error=error) as (base_url, requests):
            client = real_client(base_url)
            status, out, err = await self.run_quietly(client, concurrency=4)
        self.assertEqual(status, 2)
        self.assertLess(time.monotonic() - started, 5)  # neither retried nor paused for the 40 s
        self.assertLessEqual(len(requests), 4)  # the calls in flight
        self.assertNotIn("Failed:", out)
        self.assertIn(f"the daily quota for gemini-embedding-001 is spent ({quota})", err)
        self.assertEqual(self.output.read_text(), "")
        self.assertEqual((await self.run_main(SpyClient()))[0], 0)  # the next day: everything
        self.assertEqual(len(self.written()), 100)

    async def test_a_setting_every_call_rejects_stops_the_run_after_three_batches(self) -> None:
        self.write_corpus(100)
        message = "Request contains an invalid argument."
        rejected = {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
        with stub_server(error=rejected) as (base_url, requests):
            client = real_client(base_url)
            status, out, err = await self.run_quietly(client, concurrency=1)
        self.assertEqual(status, 2)
        self.assertLessEqual(len(requests), 3 * 3)  # three batches, each split once
        self.assertNotIn("Failed:", out)
        self.assertIn(f"the first 3 batches all failed alike: 400 INVALID_ARGUMENT: {message}", err)
        self.assertEqual((await self.run_main(SpyClient()))[0], 0)
        self.assertEqual(len(self.written()), 100)

    async def test_failures_after_a_success_are_reported_per_text(self) -> None:
        self.write_corpus(50)
        client = SpyClient(fail=lambda texts, n: api_error(400) if n > 1 else None)
        status, out, _ = await self.run_quietly(client, concurrency=1)
        self.assertEqual(status, 1)
        self.assertEqual(out.count("Failed:"), 40)
        self.assertEqual(len(self.written()), 10)


class ResumeSafetyTest(CorpusTestCase):
    """A resume never mixes settings or texts, and never changes a file that is not its own."""

    def snapshot(self) -> list[bytes | None]:
        paths = (self.output, batcher.manifest_path(self.output))
        return [path.read_bytes() if path.exists() else None for path in paths]

    async def test_another_corpus_of_the_same_name_is_refused_and_the_output_left_alone(self) -> None:
        (self.tmp / "a").mkdir()
        (self.tmp / "b").mkdir()
        (self.tmp / "a" / "corpus.txt").write_text("".join(f"a text {i}\n" for i in range(1000)))
        (self.tmp / "b" / "corpus.txt").write_text("".join(f"b text {i}\n" for i in range(1000)))
        self.assertEqual((await self.run_main(SpyClient(), input=self.tmp / "a" / "corpus.txt"))[0], 0)
        before, client = self.snapshot(), SpyClient()
        with self.assertRaises(batcher.UsageError) as refused:
            await self.run_main(client, input=self.tmp / "b" / "corpus.txt")
        self.assertEqual(
            str(refused.exception),
            'the input of corpus.txt:1 changed since it was embedded: "a text 0" -> "b text 0", and 999 more: '
            "use a new --output, or restore the input",
        )
        self.assertEqual((client.calls, self.snapshot()), ([], before))

    async def test_another_text_on_stdin_is_refused_and_the_output_left_alone(self) -> None:
        with fake_stdin(b"one\ntwo\n"):
            self.assertEqual((await self.run_main(SpyClient(), input=batcher.STDIN))[0], 0)
        before = self.snapshot()
        with fake_stdin(b"uno\ndos\ntres\n"), self.assertRaisesRegex(batcher.UsageError, "stdin:1 changed.*1 more"):
            await self.run_main(SpyClient(), input=batcher.STDIN)
        self.assertEqual(self.snapshot(), before)

    async def test_records_written_before_a_late_change_is_found_are_taken_back(self) -> None:
        self.corpus.write_text("".join(f"text {i}\n" for i in range(3000)))
        await self.run_main(SpyClient(), input=None, num_inputs=0)  # an empty output with its manifest
        with self.output.open("a") as f:  # only the last line was embedded before
            f.write(json.dumps({"id": "corpus.txt:3000", "text": "old text", "embedding": [0.0]}) + "\n")
        before, client = self.snapshot(), SpyClient()
        with self.assertRaisesRegex(batcher.UsageError, "corpus.txt:3000 changed"):
            await self.run_main(client, batch_size=100, dimensions=3)  # as the demo's manifest says
        self.assertGreater(len(client.calls), 0)  # the change was found after some calls ...
        self.assertEqual(self.snapshot(), before)  # ... and what they wrote is gone again

    async def test_a_changed_setting_is_refused_with_old_and_new_values_until_the_output_is_empty(self) -> None:
        self.write_corpus(20)
        await self.run_main(SpyClient(), dimensions=3)
        before = self.snapshot()
        cases: list[tuple[dict[str, Any], str]] = [
            ({"dimensions": 768}, f"--dimensions was 3 for the records in {self.output}, now 768: use a new"),
            ({"model": "gemini-embedding-2"}, '--model was "gemini-embedding-001" for the records in '),
        ]
        for changes, message in cases:
            with self.subTest(changes), self.assertRaises(batcher.UsageError) as refused:
                await self.run_main(SpyClient(), **changes)
            self.assertTrue(str(refused.exception).startswith(message), refused.exception)
            self.assertEqual(self.snapshot(), before)
        self.output.write_bytes(b"")  # no record yet: the output takes new settings
        self.assertEqual((await self.run_main(SpyClient(), dimensions=768))[0], 0)
        manifest = json.loads(batcher.manifest_path(self.output).read_text())
        self.assertEqual(
            manifest["settings"],
            {"model": "gemini-embedding-001", "dimensions": 768, "normalize": True, "task_type": None},
        )

    async def test_a_file_that_is_not_our_records_is_refused_and_left_alone(self) -> None:
        self.write_corpus(3)
        notes = self.tmp / "notes.txt"
        for data in [b"my notes\nthe last line, with no newline", b'{"id": "x"}\n', b"one torn-looking line"]:
            with self.subTest(data):
                notes.write_bytes(data)
                with self.assertRaisesRegex(batcher.UsageError, "notes.txt holds lines that batcher.py did not"):
                    await self.run_main(SpyClient(), output=notes)
                self.assertEqual(notes.read_bytes(), data)
                self.assertFalse(batcher.manifest_path(notes).exists())

    async def test_an_output_from_before_the_manifest_is_adopted_when_every_line_is_a_record(self) -> None:
        texts = self.write_corpus(5)
        old = {"id": "corpus.txt:1", "text": texts[0], "embedding": [1.0, 2.0, 3.0]}
        self.output.write_text(json.dumps(old) + "\n")
        client = SpyClient()
        self.assertEqual((await self.run_main(client))[0], 0)
        self.assertEqual(sorted(t for call in client.calls for t in call), sorted(texts[1:]))
        self.assertTrue(batcher.manifest_path(self.output).exists())


class SharedRuntimeTest(unittest.TestCase):
    def test_the_runtime_section_is_the_same_in_both_scripts_and_each_names_itself(self) -> None:
        here = Path(__file__).parent
        sections = []
        for name in ("batcher.py", "pipeline.py"):
            text = (here / name).read_text()
            start, end = text.index("# Runtime shared by both scripts"), text.index("# === End of the shared runtime")
            self.assertGreater(end - start, 10_000, name)  # the whole runtime, not an empty section
            sections.append(text[start:end])
        self.assertEqual(sections[0], sections[1], "the shared runtime differs: copy one section over the other")
        self.assertEqual(batcher.PROG, "batcher")
        for name in ("Retrier", "Gate", "Shutdown", "open_file", "make_client", "describe", "stop_reason"):
            self.assertIn(f"{name}", sections[0])
            self.assertEqual(getattr(batcher, name).__module__, "batcher")


class CommandLineTest(unittest.TestCase):
    def run_script(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
        return run_forked([sys.executable, "batcher.py", *args], cwd=HERE, env=env, timeout=timeout_s)

    def test_defaults_reproduce_the_document_run(self) -> None:
        args = batcher.parse_args([])
        self.assertEqual((args.num_inputs, args.batch_size, args.timeout_s, args.input_delay_s), (100, 8, 1.0, 0.3))
        embedding = batcher.config_from(batcher.Config, args).embedding
        self.assertEqual((args.concurrency, args.max_attempts), (4, 5))
        self.assertEqual((embedding.dimensions, embedding.model), (3, "gemini-embedding-001"))

    def test_a_corpus_gets_the_models_full_size_unless_dimensions_says_otherwise(self) -> None:
        corpus = batcher.config_from(batcher.Config, batcher.parse_args(["--input", "corpus.txt"]))
        self.assertIsNone(corpus.embedding.dimensions)  # not the demo's 3: a search index needs the real size
        self.assertIsNone(corpus.embedding.config(None).output_dimensionality)
        given = batcher.parse_args(["--input", "corpus.txt", "--dimensions", "768"])
        self.assertEqual(batcher.config_from(batcher.Config, given).embedding.dimensions, 768)

    def test_offline_run_prints_every_item_and_a_summary(self) -> None:
        result = self.run_script("--num-inputs", "30", "--input-delay", "0", "--fake-latency", "0.01", "--seed", "1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("simulated client", result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(
            sorted(int(line.split()[1][6:]) for line in lines if line.startswith("Content:")), list(range(30))
        )
        self.assertIn("Summary: 30 items in 4 batches (3 full, 0 timed out, 1 flushed at end)", result.stdout)
        self.assertRegex(result.stdout, r"p50 [0-9.]+s, p99 [0-9.]+s, max [0-9.]+s; wall time [0-9.]+s")

    def test_the_command_with_a_key_uses_the_real_client_and_never_prints_the_key(self) -> None:
        with stub_server() as (base_url, requests):
            env = {**os.environ, "GEMINI_API_KEY": "secret-test-key", "GOOGLE_GEMINI_BASE_URL": base_url}
            command = [sys.executable, "batcher.py", "--num-inputs", "10", "--input-delay", "0", "--timeout", "0.05"]
            result = run_forked(command, cwd=HERE, env=env, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sum(len(body["requests"]) for _, body in requests), 10)
        self.assertNotIn("simulated", result.stderr)
        self.assertNotIn("secret-test-key", result.stdout + result.stderr)

    def test_bad_flags_get_one_line_naming_the_flag_and_exit_2(self) -> None:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exit_:
            batcher.run_cli(["--batch-size", "101"])
        self.assertEqual(exit_.exception.code, 2)
        self.assertEqual(err.getvalue(), "batcher.py: error: argument --batch-size: must be 1..100, got 101\n")
        for flag, value in [("--batch-size", "0"), ("--timeout", "0"), ("--timeout", "nan"), ("--concurrency", "x")]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exit_:
                batcher.parse_args([flag, value])
            self.assertEqual(exit_.exception.code, 2)
            self.assertEqual(len(err.getvalue().splitlines()), 1, err.getvalue())
            self.assertIn(flag, err.getvalue())

    def test_an_empty_model_name_gets_one_line_and_exit_2(self) -> None:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exit_:
            batcher.run_cli(["--model", ""])
        self.assertEqual(exit_.exception.code, 2)
        self.assertEqual(err.getvalue(), "batcher.py: error: argument --model: a model name is required, got ''\n")
        with self.assertRaisesRegex(ValueError, "model must be a model name"):
            batcher.BatchedEmbedder(SpyClient(), model="")

    def test_help_shows_every_default_with_readable_metavars(self) -> None:
        parser = batcher.make_parser()
        options = " ".join(parser.format_help().partition("options:")[2].split())
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:  # a flag: on or off
                continue
            flag = action.option_strings[0]
            found = re.search(rf"{flag}\b(.*?)\(default: (.*?)\)", options)
            assert found is not None, flag
            self.assertEqual(found.group(2), "none" if action.default is None else str(action.default), flag)
            self.assertRegex(found.group(1), r"^ [A-Z]+ ", flag)  # SECONDS, N, PATH, NAME

    def test_ctrl_c_finishes_calls_in_flight_prints_the_summary_and_exits_130(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
        args = ["--num-inputs", "100000", "--input-delay", "0.002", "--fake-latency", "0.1"]
        proc = Forked(
            [sys.executable, "batcher.py", *args],
            cwd=HERE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(20)]  # running and producing
        proc.send_signal(signal.SIGINT)
        with proc.stdout:  # read() through the same buffer readline() used; communicate() would skip it
            lines += proc.stdout.read().splitlines()
        proc.wait(timeout=20)
        self.assertEqual(proc.returncode, 130)
        printed = [line for line in lines if line.startswith("Content:")]
        embedded = re.search(r"(\d+) embedded", "\n".join(lines))
        assert embedded is not None, lines
        self.assertEqual(len(printed), int(embedded.group(1)))  # every item counted done was printed, once
        self.assertEqual(len(set(printed)), len(printed))


class CorpusCommandLineTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", str(self.tmp)], check=True))
        self.env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
        self.corpus, self.output = self.tmp / "corpus.txt", self.tmp / "out.jsonl"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, os.path.join(HERE, "batcher.py"), *args]

    def run_script(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_forked(self.command(*args), cwd=self.tmp, env=self.env, input=stdin)

    def write_corpus(self, n: int) -> None:
        self.corpus.write_text("".join(f"text {i}\n" for i in range(n)))

    def assert_each_line_once(self, n: int) -> None:
        ids = [json.loads(line)["id"] for line in self.output.read_text().splitlines()]
        self.assertEqual(sorted(ids), sorted(f"corpus.txt:{i}" for i in range(1, n + 1)))

    def test_stdin_is_read_with_stdin_ids(self) -> None:
        result = self.run_script("--input", "-", "--output", "out.jsonl", "--fake-latency", "0", stdin="a\n\n b \n")
        self.assertEqual(result.returncode, 0, result.stderr)
        records = [json.loads(line) for line in self.output.read_text().splitlines()]
        self.assertEqual([(r["id"], r["text"]) for r in records], [("stdin:1", "a"), ("stdin:3", "b")])
        self.assertNotIn("Content:", result.stdout)  # the file holds the embeddings
        self.assertIn("Summary: 2 items", result.stdout)

    def test_bad_input_gets_one_line_and_exit_2(self) -> None:
        self.write_corpus(3)
        (self.tmp / "folder").mkdir()
        os.mkfifo(self.tmp / "fifo")
        cases = [
            (["--input", "missing.txt"], "input file not found: missing.txt"),
            (["--input", "folder"], "input is not a file: folder"),
            (["--input", "fifo"], "input is not a file: fifo (to read a pipe, give --input - and pipe it in)"),
            (["--input", "corpus.txt", "--output", "nowhere/out.jsonl"], "output folder not found: nowhere"),
            (["--input", "corpus.txt", "--output", "folder"], "output is a folder, not a file: folder"),
            (["--input", "corpus.txt", "--output", "corpus.txt"], "output is the input file: corpus.txt"),
            (["--request-timeout", "0"], "argument --request-timeout: must be > 0, got 0"),
            (["--rpm", "-1"], "argument --rpm: must be > 0, got -1"),
            (["--price", "-1"], "argument --price: must be >= 0, got -1"),
            (["--price", "abc"], "argument --price: expected a number, got 'abc'"),
            (["--price", "1,2"], "--price takes one number for embeddings: dollars per 1M input tokens (no output)"),
            (["--max-cost", "5"], "--max-cost needs --price: the cost is counted at that price"),
            (["--batch-cancel"], "--batch-cancel cancels the jobs of an existing --output file, got none"),
            (["--batch-cancel", "--output", "new.jsonl"],
             "--batch-cancel cancels the jobs of an existing --output file, got new.jsonl"),
            (["--batch-cancel", "--output", "corpus.txt", "--input", "corpus.txt", "--dry-run"],
             "--dry-run and --batch-cancel cannot be used together: a dry run cancels nothing"),
        ]  # fmt: skip
        for args, message in cases:  # in this process: a child per case would cost a second each
            out, err = io.StringIO(), io.StringIO()
            with contextlib.chdir(self.tmp), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = batcher.run_cli([*args, "--offline"])
                except SystemExit as exit_:
                    status = int(exit_.code or 0)
            self.assertEqual((status, out.getvalue()), (2, ""), args)
            self.assertEqual(err.getvalue(), f"batcher.py: error: {message}\n")
        result = subprocess.run(  # the real command: no traceback
            self.command("--input", "missing.txt", "--offline"), cwd=self.tmp, env=self.env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        self.assertEqual((result.returncode, result.stdout), (2, ""))
        self.assertEqual(result.stderr, "batcher.py: error: input file not found: missing.txt\n")
        self.assertEqual(self.corpus.read_text(), "text 0\ntext 1\ntext 2\n")

    def test_vertex_ai_uses_the_real_client_and_missing_credentials_get_one_line(self) -> None:
        self.write_corpus(20)
        no_credentials = str(self.tmp / "no-such-key.json")  # (a missing file: google.auth asks no server)
        vertex = {"GOOGLE_GENAI_USE_VERTEXAI": "true", "GEMINI_API_KEY": "", "GOOGLE_API_KEY": ""}
        vertex |= {"GOOGLE_CLOUD_LOCATION": "us-central1", "GOOGLE_APPLICATION_CREDENTIALS": no_credentials}
        for project in ("my-project", ""):  # credentials needed at the first call, or to make the client
            out, err = io.StringIO(), io.StringIO()
            with (
                self.subTest(project=project),
                mock.patch.dict(os.environ, vertex | {"GOOGLE_CLOUD_PROJECT": project}),
                contextlib.chdir(self.tmp),
                contextlib.redirect_stderr(err),
                contextlib.redirect_stdout(out),
            ):
                if project:
                    client = batcher.make_client(offline=False, fake_latency_s=0)
                    self.assertIsInstance(client, genai.Client)  # not the simulation
                    self.assertTrue(client.vertexai)
                status = batcher.run_cli(["--input", "corpus.txt", "--output", "out.jsonl", "--quiet"])
            self.assertEqual(status, 2)
            [line] = err.getvalue().splitlines()
            self.assertIn("no-such-key.json was not found", line)
            self.assertTrue(line.startswith("batcher.py: error: "), line)
            self.assertNotIn("Failed:", out.getvalue())

    def test_batch_api_on_vertex_ai_gets_one_line_and_exit_2_before_any_file(self) -> None:
        self.write_corpus(3)
        vertex = {"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_API_KEY": "express-mode-key", "GEMINI_API_KEY": ""}
        for flag in ("--batch-api", "--batch-cancel"):
            err = io.StringIO()
            with mock.patch.dict(os.environ, vertex), contextlib.chdir(self.tmp), contextlib.redirect_stderr(err):
                self.assertEqual(batcher.run_cli(["--input", "corpus.txt", "--output", "out.jsonl", flag]), 2)
            self.assertRegex(err.getvalue(), r"^batcher\.py: error: --batch-api and --batch-cancel use the Gemini "
                             r"Developer API's Batch API; Vertex AI .*\n$")  # fmt: skip
        self.assertEqual(sorted(path.name for path in self.tmp.iterdir()), ["corpus.txt"])

    def run_in_process(self, *args: str) -> tuple[int, str, str]:
        """run_cli in this process, in the temp folder: the status, stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.chdir(self.tmp), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = batcher.run_cli([*args, "--offline", "--fake-latency", "0"])
            except SystemExit as exit_:
                status = int(exit_.code or 0)
        problems = "".join(line for line in err.getvalue().splitlines(True) if "simulated client" not in line)
        return status, out.getvalue(), problems

    def test_an_output_on_a_read_only_file_system_or_a_dangling_symlink_gets_one_line_and_exit_2(self) -> None:
        self.write_corpus(3)
        real_open: Any = aiofiles.open

        def read_only(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if set(mode) & set("awx+"):
                raise OSError(30, "Read-only file system", str(path))
            return real_open(path, mode, *args, **kwargs)

        with mock.patch.object(aiofiles, "open", read_only):
            status, out, err = self.run_in_process("--input", "corpus.txt", "--output", "out.jsonl")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, "batcher.py: error: cannot write the output file out.jsonl: Read-only file system\n")
        (self.tmp / "link.jsonl").symlink_to(self.tmp / "gone" / "out.jsonl")
        status, out, err = self.run_in_process("--input", "corpus.txt", "--output", "link.jsonl")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, "batcher.py: error: cannot write the output file link.jsonl: No such file or directory\n")

    def test_a_full_disk_mid_run_gets_one_line_naming_the_file_the_summary_and_exit_1(self) -> None:
        self.write_corpus(50)
        real_open_file = batcher.open_file

        class FullDisk:  # the open output file, whose writes fail as on a full disk
            def __init__(self, f: Any) -> None:
                self.f = f

            def __getattr__(self, name: str) -> Any:
                return getattr(self.f, name)

            async def write(self, data: bytes) -> None:
                raise OSError(28, "No space left on device")

        @contextlib.asynccontextmanager
        async def open_file(path: Path, mode: Any) -> Any:
            async with real_open_file(path, mode) as f:
                yield FullDisk(f) if mode == "ab" else f

        with mock.patch.object(batcher, "open_file", open_file):
            status, out, err = self.run_in_process("--input", "corpus.txt", "--output", "out.jsonl")
        self.assertEqual(status, 1)
        self.assertEqual(err, "batcher.py: error: [Errno 28] No space left on device: 'out.jsonl'\n")
        self.assertIn("Summary: ", out)
        self.assertIn("left for the next run", out)
        self.assertEqual(self.output.read_text(), "")

    def test_kill_9_twice_then_a_rerun_leaves_every_text_exactly_once(self) -> None:
        self.write_corpus(5000)
        rng = random.Random(4)
        for _ in range(2):
            args = ["--input", "corpus.txt", "--output", "out.jsonl", "--fake-latency", "0.01", "--quiet"]
            args += ["--dimensions", "3"]  # small records: the simulated model's full size is 3072
            proc = Forked(
                self.command(*args, "--batch-size", "7"),
                cwd=self.tmp,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            size = self.output.stat().st_size if self.output.exists() else 0
            grown = size + rng.randint(1, 100) * 1000  # kill at a random point, once writing is under way
            deadline = time.monotonic() + 20
            while (not self.output.exists() or self.output.stat().st_size < grown) and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.kill()
            proc.wait()
        self.assertLess(len(self.output.read_bytes().splitlines()), 5000)  # killed part way
        status, _, err = self.run_in_process(*args)
        self.assertEqual(status, 0, err)  # and not refused: kill -9 left no lock behind
        self.assert_each_line_once(5000)

    def test_sigterm_drains_prints_the_summary_exits_143_and_a_resume_finishes_exactly_once(self) -> None:
        self.write_corpus(5000)
        args = ["--input", "corpus.txt", "--output", "out.jsonl", "--fake-latency", "0.05", "--quiet"]
        args += ["--dimensions", "3"]  # small records: the simulated model's full size is 3072
        proc = Forked(
            self.command(*args), cwd=self.tmp, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        while not self.output.exists() or self.output.stat().st_size < 1000:
            time.sleep(0.02)  # under way
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        self.assertEqual(proc.returncode, 143, err)
        self.assertIn("interrupted (SIGTERM)", err)
        self.assertIn("Summary:", out)
        status, _, err = self.run_in_process(*args)
        self.assertEqual(status, 0, err)
        self.assert_each_line_once(5000)

    def test_a_second_run_on_the_same_output_is_refused(self) -> None:
        self.write_corpus(10)
        args = ["--input", "corpus.txt", "--output", "out.jsonl", "--fake-latency", "60", "--quiet"]
        first = Forked(self.command(*args), cwd=self.tmp, env=self.env, stderr=subprocess.PIPE)
        self.addCleanup(first.communicate)
        self.addCleanup(first.kill)
        assert first.stderr is not None
        wait_until_locked(self.output)
        status, _, err = self.run_in_process("--input", "corpus.txt", "--output", "out.jsonl")
        self.assertEqual(status, 2)
        self.assertIn("batcher.py: error: another run is using out.jsonl", err)

    def test_a_bad_key_stops_the_run_with_one_line_and_a_rerun_does_everything(self) -> None:
        self.write_corpus(100)

        class BadKeyHandler(BaseHTTPRequestHandler):
            calls = 0

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                type(self).calls += 1
                info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
                error = {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT", "details": [info]}
                data = json.dumps({"error": error}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", 0), BadKeyHandler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        env = {"GEMINI_API_KEY": "secret-bad-key", "GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{server.server_port}"}
        args = ["--input", "corpus.txt", "--output", "out.jsonl", "--batch-size", "8", "--timeout", "0.01"]
        result = run_forked(self.command(*args), cwd=self.tmp, env=self.env | env)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertLessEqual(BadKeyHandler.calls, 4)  # the calls in flight (--concurrency 4), not 187
        [line] = [line for line in result.stderr.splitlines() if "error" in line]
        self.assertIn("batcher.py: error: the API refused the request as a whole", line)
        self.assertIn("API key not valid", line)
        self.assertNotIn("secret-bad-key", result.stdout + result.stderr)
        self.assertNotIn("Failed:", result.stdout)  # nothing is reported failed: it is left for the rerun
        status, _, err = self.run_in_process(*args)  # offline: the simulated client
        self.assertEqual(status, 0, err)
        self.assert_each_line_once(100)


if __name__ == "__main__":
    unittest.main()
