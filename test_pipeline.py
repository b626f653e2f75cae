"""Tests for pipeline.py and make_inputs.sh: run with `python -m unittest`. Fakes record calls
and timestamps; folders are temporary; the only network is an HTTP stub on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest
import warnings
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from google import genai
from google.genai import errors, types

import pipeline
from pipeline import Config, Shutdown

HERE = Path(__file__).resolve().parent


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


logging.getLogger("pipeline").setLevel(logging.CRITICAL)  # failures and retries are expected here


def api_error(code: int, retry_delay: str | None = None) -> errors.APIError:
    body: dict[str, Any] = {"code": code, "message": f"fake {code}", "status": "X"}
    if retry_delay:
        body["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
    return (errors.ClientError if code < 500 else errors.ServerError)(code, {"error": body})


class SpyClient(pipeline.SimulatedClient):
    """The simulated model, recording each call's prompt and start time. on_call(call_number)
    runs as a call starts; fail(prompt, call_number) may return an exception to raise."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        fail: Callable[[str, int], Exception | None] | None = None,
        on_call: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(latency_s=latency_s)
        self.fail = fail
        self.on_call = on_call
        self.prompts: list[str] = []
        self.started_at: list[float] = []

    async def generate_content(self, *, model: str, contents: str, config: Any = None) -> types.GenerateContentResponse:
        self.prompts.append(contents)
        self.started_at.append(time.monotonic())
        call_number = len(self.prompts)
        if self.on_call:
            self.on_call(call_number)
        response = await super().generate_content(model=model, contents=contents, config=config)
        if self.fail and (exc := self.fail(contents, call_number)):
            raise exc
        return response


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


def disk_full() -> Any:
    """Patches pipeline.open_file so that every write to a file opened for writing fails
    as on a full disk."""
    real_open_file = pipeline.open_file

    @contextlib.asynccontextmanager
    async def open_file(path: Path, mode: Any) -> Any:
        async with real_open_file(path, mode) as f:
            if mode == "rb":
                yield f
                return

            async def write(data: bytes) -> None:
                raise OSError(28, "No space left on device")

            yield SimpleNamespace(write=write, flush=f.flush, name=f.name)

    return mock.patch.object(pipeline, "open_file", open_file)


def write_inputs(folder: Path, shards: int, per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    prompts = []
    for shard in range(shards):
        lines = [f"What is two times {shard * per_shard + i}?" for i in range(per_shard)]
        (folder / f"shard_{shard}.txt").write_text("".join(line + "\n" for line in lines))
        prompts += lines
    return prompts


def records(folder: Path, name: str = "shard_*.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(folder.glob(name)) for line in path.read_text().splitlines()]


class Killed(BaseException):
    """kill -9 at a chosen moment, in process: nothing after it runs but cleanup."""


KILLED = (Killed, BaseExceptionGroup)  # as it leaves main(): alone, or in its TaskGroup's group


class AsyncTestCase(unittest.IsolatedAsyncioTestCase):
    """unittest's event loop without asyncio's debug mode, in which the scripts never run: its
    checks on every callback cost the suite a fifth of its time."""

    async def asyncSetUp(self) -> None:
        asyncio.get_running_loop().set_debug(False)


class PipelineTestCase(AsyncTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", str(self.tmp)], check=True))
        self.inputs, self.outputs = self.tmp / "inputs", self.tmp / "outputs"
        self.config = Config(inputs=self.inputs, outputs=self.outputs, base_delay_s=0.001, quiet=True)

    async def run_pipeline(
        self, client: Any = None, shutdown: Shutdown | None = None, **changes: Any
    ) -> tuple[int, str]:
        """Runs pipeline.main; returns the status and stdout, and keeps stderr in self.stderr."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            async with asyncio.timeout(30):  # a hang fails the test instead of the suite
                status = await pipeline.main(
                    replace(self.config, **changes), client or SpyClient(), shutdown=shutdown or Shutdown()
                )
        self.stderr = err.getvalue()
        return status, out.getvalue()

    def assert_exactly_once(self, prompts: list[str]) -> None:
        """Every prompt is in exactly one place: a shard or errors.jsonl."""
        done = [r["prompt"] for r in records(self.outputs)] + [
            r["prompt"] for r in records(self.outputs, "errors.jsonl")
        ]
        self.assertEqual(sorted(done), sorted(prompts))


class EndToEndTest(PipelineTestCase):
    async def test_every_prompt_answered_once_with_stable_ids(self) -> None:
        prompts = write_inputs(self.inputs, 10, 3)
        status, summary = await self.run_pipeline()
        self.assertEqual(status, 0)
        got = records(self.outputs)
        self.assertEqual(sorted(r["prompt"] for r in got), sorted(prompts))
        for r in got:
            self.assertEqual(set(r), {"id", "prompt", "response", "usage", "model_version"})
            self.assertEqual(int(r["response"]), 2 * int(r["prompt"].split()[-1][:-1]))
        usage = {"input_tokens": 6, "output_tokens": 1}  # the simulated model's characters / 4, rounded up
        record = {"id": "shard_4.txt:2", "prompt": "What is two times 13?", "response": "26", "usage": usage}
        self.assertIn(record | {"model_version": "simulated"}, got)
        self.assertIn("30 prompts read, 0 skipped (already done), 30 succeeded, 0 failed, 0 retries", summary)

    async def test_blank_lines_are_skipped_and_line_numbers_kept(self) -> None:
        self.inputs.mkdir()
        (self.inputs / "a.txt").write_text("\n  \nWhat is two times 1?  \r\n\n\tWhat is two times 2?")
        await self.run_pipeline()
        self.assertEqual(sorted(r["id"] for r in records(self.outputs)), ["a.txt:3", "a.txt:5"])
        self.assertEqual(
            sorted(r["prompt"] for r in records(self.outputs)), ["What is two times 1?", "What is two times 2?"]
        )

    async def test_chunk_boundaries_split_neither_lines_nor_characters(self) -> None:
        self.inputs.mkdir()
        lines = [
            "Ünïcödé prompt number one",
            "",
            "a line much longer than one chunk of seven bytes",
            "ß",
            "last, no newline",
        ]
        (self.inputs / "u.txt").write_text("\n".join(lines), encoding="utf-8")
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=100)
        with mock.patch.object(pipeline, "CHUNK_BYTES", 7):
            await pipeline.read_inputs(
                pipeline.Run(Config()), pipeline.input_files(self.inputs), queue, queue, consumers=0
            )
        got = [queue.get_nowait() for _ in range(queue.qsize())]
        expected = [(f"u.txt:{n}", text, None) for n, text in enumerate(lines, 1) if text]
        self.assertEqual(got, expected)

    async def test_shards_hold_at_most_shard_size_records_and_none_is_empty(self) -> None:
        write_inputs(self.inputs, 3, 4)
        await self.run_pipeline(shard_size=5)
        shards = sorted(p.name for p in self.outputs.glob("shard_*.jsonl"))
        self.assertEqual(shards, ["shard_00000.jsonl", "shard_00001.jsonl", "shard_00002.jsonl"])
        sizes = [len((self.outputs / name).read_text().splitlines()) for name in shards]
        self.assertEqual(sizes, [5, 5, 2])

    async def test_several_readers_and_writers_keep_exactly_once_and_own_their_shards(self) -> None:
        prompts = write_inputs(self.inputs, 7, 50)
        status, _ = await self.run_pipeline(readers=3, writers=4, workers=8, shard_size=7)
        self.assertEqual(status, 0)
        self.assert_exactly_once(prompts)
        for path in self.outputs.glob("shard_*.jsonl"):
            self.assertTrue(1 <= len(path.read_text().splitlines()) <= 7)

    async def test_a_pool_process_survives_ctrl_c_while_it_starts(self) -> None:
        # A terminal's Ctrl-C reaches the whole process group, and a pool process that is still
        # importing pipeline.py has not run ignore_interrupts yet.
        pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=pipeline.ignore_interrupts)
        self.addCleanup(pool.shutdown)
        counting = asyncio.ensure_future(pipeline.count_words_in(pool, "one two three"))
        while not counting.done():
            for child in multiprocessing.active_children():  # the pool's process, from its first instant
                if child.pid is not None:
                    os.kill(child.pid, signal.SIGINT)
            await asyncio.sleep(0.01)
        self.assertEqual(await counting, 3)

    async def test_word_count_adds_the_field_computed_in_a_process_pool(self) -> None:
        write_inputs(self.inputs, 1, 2)
        submitted: list[Any] = []

        class SpyPool(ProcessPoolExecutor):
            def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
                submitted.append(fn)
                return super().submit(fn, *args, **kwargs)

        with mock.patch.object(pipeline, "ProcessPoolExecutor", SpyPool):
            await self.run_pipeline(word_count=True)
        self.assertEqual([r["word_count"] for r in records(self.outputs)], [1, 1])  # "0", "2"
        self.assertEqual(submitted, [pipeline.count_words, pipeline.count_words])


class FaultTest(PipelineTestCase):
    async def test_exactly_once_under_random_transient_failures(self) -> None:
        prompts = write_inputs(self.inputs, 8, 25)
        rng = random.Random(1)
        client = SpyClient(fail=lambda prompt, n: api_error(503) if rng.random() < 0.4 else None)
        status, summary = await self.run_pipeline(client, workers=6, max_attempts=4)
        self.assert_exactly_once(prompts)
        failures = records(self.outputs, "errors.jsonl")
        self.assertEqual(status, 1 if failures else 0)
        self.assertTrue(all(r["attempts"] == 4 for r in failures))
        self.assertGreater(int(summary.split(" retries")[0].split()[-1]), 50)

    async def test_connection_errors_are_retried(self) -> None:
        prompts = write_inputs(self.inputs, 1, 4)
        client = SpyClient(fail=lambda prompt, n: ConnectionResetError("reset by peer") if n <= 2 else None)
        status, summary = await self.run_pipeline(client)
        self.assertEqual(status, 0)
        self.assertIn("2 retries", summary)
        self.assert_exactly_once(prompts)

    async def test_permanent_errors_go_to_errors_jsonl_without_retry(self) -> None:
        prompts = write_inputs(self.inputs, 2, 3)
        client = SpyClient(fail=lambda prompt, n: api_error(400) if prompt.endswith("4?") else None)
        status, _ = await self.run_pipeline(client)
        self.assertEqual(status, 1)
        failure = records(self.outputs, "errors.jsonl")
        self.assertEqual(
            failure,
            [{"id": "shard_1.txt:2", "prompt": "What is two times 4?", "error": "400 X: fake 400", "attempts": 1}],
        )
        self.assertEqual(client.prompts.count("What is two times 4?"), 1)
        self.assert_exactly_once(prompts)

    async def test_no_deadlock_with_queue_size_1_when_every_call_fails(self) -> None:
        prompts = write_inputs(self.inputs, 5, 10)
        client = SpyClient(fail=lambda prompt, n: api_error(503))
        status, _ = await self.run_pipeline(client, queue_size=1, workers=4, max_attempts=2)
        self.assertEqual(status, 1)
        self.assertEqual(len(records(self.outputs, "errors.jsonl")), 50)
        self.assert_exactly_once(prompts)

    async def test_server_retry_delay_pauses_every_worker(self) -> None:
        write_inputs(self.inputs, 1, 30)
        failed_at: list[float] = []

        def fail(prompt: str, n: int) -> Exception | None:
            if n == 1:
                failed_at.append(time.monotonic())
                return api_error(429, retry_delay="0.3s")
            return None

        for max_attempts in (5, 1):  # a 429 on a prompt's last attempt pauses the others too
            with self.subTest(max_attempts=max_attempts):
                failed_at.clear()
                client = SpyClient(latency_s=0.01, fail=fail)
                status, _ = await self.run_pipeline(
                    client, workers=5, max_attempts=max_attempts, outputs=self.tmp / f"out-{max_attempts}"
                )
                self.assertEqual(status, 0 if max_attempts > 1 else 1)
                later = [t for t in client.started_at if t > failed_at[0]]
                self.assertGreaterEqual(min(later) - failed_at[0], 0.3 - 0.01)

    async def test_rpm_spaces_call_starts_evenly_with_no_burst(self) -> None:
        write_inputs(self.inputs, 1, 8)
        client = SpyClient()
        await self.run_pipeline(client, workers=8, rpm=1200)  # one start every 50 ms
        gaps = [b - a for a, b in itertools.pairwise(sorted(client.started_at))]
        self.assertEqual(len(gaps), 7)
        self.assertTrue(all(0.045 <= gap <= 0.1 for gap in gaps), gaps)

    async def test_a_fault_in_a_stage_ends_the_run_with_the_error_instead_of_hanging(self) -> None:
        write_inputs(self.inputs, 3, 20)
        with disk_full():
            status, summary = await self.run_pipeline(queue_size=1)
        self.assertEqual(status, 1)  # a disk error: one line after the summary
        self.assertIn("No space left", self.stderr)
        self.assertIn("Summary:", summary)
        bug = mock.patch.object(pipeline.Result, "json_line", side_effect=AttributeError("a bug of ours"))
        with bug, self.assertRaises(ExceptionGroup) as raised:  # anything else: the traceback
            await self.run_pipeline(queue_size=1, outputs=self.tmp / "other")
        self.assertIn("a bug of ours", str(pipeline.leaf_exceptions(raised.exception)))

    async def test_progress_line_shows_done_failed_rate_and_eta(self) -> None:
        write_inputs(self.inputs, 2, 10)
        stats = pipeline.Stats(succeeded=5, failed=1)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            progress = asyncio.create_task(pipeline.show_progress(stats, sorted(self.inputs.glob("*.txt")), tty=True))
            await asyncio.sleep(0.6)
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        redraws = err.getvalue().split("\r")[1:]
        self.assertIn(len(redraws), (2, 3))  # at most 4 a second
        self.assertRegex(redraws[-1], r"^6 done, 1 failed, 0 in flight, \d+/s, ETA \d+s")

    async def test_with_a_price_the_progress_line_adds_the_dollars_spent_and_the_tier(self) -> None:
        write_inputs(self.inputs, 1, 2)
        stats = pipeline.Stats(succeeded=1)
        stats.cost = pipeline.Cost((2.0, 10.0), half_price="Flex")
        stats.cost.pay(1_000_000, 100_000)  # $2 + $1, halved
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            progress = asyncio.create_task(pipeline.show_progress(stats, sorted(self.inputs.glob("*.txt")), tty=True))
            await asyncio.sleep(0.3)
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        self.assertIn(", $1.50 spent (Flex: half price)", err.getvalue().split("\r")[-1])

    def test_on_a_terminal_a_log_line_clears_the_progress_line_first(self) -> None:
        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        handler = pipeline.LineHandler(err := Terminal())
        handler.emit(
            logging.LogRecord("pipeline", logging.INFO, __file__, 1, "wrote a.txt:1 to shard_00000.jsonl", None, None)
        )
        self.assertEqual(err.getvalue(), "\r\x1b[Kwrote a.txt:1 to shard_00000.jsonl\n")
        handler = pipeline.LineHandler(plain := io.StringIO())
        handler.emit(logging.LogRecord("pipeline", logging.INFO, __file__, 1, "wrote", None, None))
        self.assertEqual(plain.getvalue(), "wrote\n")

    async def test_off_a_terminal_progress_is_a_plain_line_every_interval(self) -> None:
        write_inputs(self.inputs, 2, 10)
        stats = pipeline.Stats(succeeded=5, failed=1, in_flight=3)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), mock.patch.object(pipeline, "PROGRESS_EVERY_S", 0.2):
            progress = asyncio.create_task(pipeline.show_progress(stats, sorted(self.inputs.glob("*.txt")), tty=False))
            await asyncio.sleep(0.5)
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 2)  # at 0.2 s and 0.4 s
        self.assertRegex(lines[-1], r"^progress: 6 done, 1 failed, 3 in flight, \d+/s, ETA \d+s$")
        self.assertNotIn("\r", err.getvalue())

    async def test_a_resume_reads_its_inputs_twice_and_counts_the_progress_total_as_it_checks_them(self) -> None:
        write_inputs(self.inputs, 2, 10)
        await self.run_pipeline()
        write_inputs(self.inputs, 3, 10)  # the same two files, and a new one
        read: list[str] = []
        real_read_blocks = pipeline.read_blocks

        def read_blocks(path: Path) -> Any:
            read.append(path.name)
            return real_read_blocks(path)

        with (
            mock.patch.object(pipeline, "read_blocks", read_blocks),
            mock.patch.object(pipeline, "count_lines", side_effect=AssertionError("a third read")),
            mock.patch.object(pipeline, "show_progress", wraps=pipeline.show_progress) as progress,
        ):
            status, summary = await self.run_pipeline(quiet=False)
        self.assertEqual(status, 0, self.stderr)
        self.assertEqual(sorted(read), sorted(["shard_0.txt", "shard_1.txt", "shard_2.txt"] * 2))  # check, then run
        self.assertEqual(progress.call_args.args[2], 30)  # the ETA's total: prompts, counted by the check
        self.assertIn("30 prompts read, 20 skipped", summary)

    async def test_an_undecodable_line_is_recorded_and_the_rest_processed(self) -> None:
        self.inputs.mkdir()
        (self.inputs / "a.txt").write_bytes(b"What is two times 1?\nbad \xff\xfe line\nWhat is two times 3?\n")
        status, _ = await self.run_pipeline()
        self.assertEqual(status, 1)
        self.assertEqual(sorted(r["id"] for r in records(self.outputs)), ["a.txt:1", "a.txt:3"])
        [failure] = records(self.outputs, "errors.jsonl")
        self.assertEqual((failure["id"], failure["attempts"]), ("a.txt:2", 0))
        self.assertIn("undecodable", failure["error"])


class ResumeTest(PipelineTestCase):
    async def test_rerun_skips_done_ids_repairs_a_torn_line_and_continues_numbering(self) -> None:
        prompts = write_inputs(self.inputs, 4, 5)
        self.outputs.mkdir()
        first = [{"id": f"shard_0.txt:{i}", "prompt": prompts[i - 1], "response": "x"} for i in range(1, 4)]
        torn = json.dumps({"id": "shard_0.txt:4", "prompt": prompts[3], "response": "x"})[:25]
        (self.outputs / "shard_00003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first) + torn)
        client = SpyClient()
        status, summary = await self.run_pipeline(client)
        self.assertEqual(status, 0)
        self.assertNotIn(prompts[0], client.prompts)
        self.assertIn(prompts[3], client.prompts)  # the torn record was not a record
        self.assertEqual(len(client.prompts), 17)
        self.assertFalse((self.outputs / "shard_00000.jsonl").exists())
        self.assertTrue((self.outputs / "shard_00004.jsonl").exists())
        self.assertIn("3 skipped", summary)
        self.assert_exactly_once(prompts)

    async def test_interrupt_mid_run_then_resume_gives_exactly_once(self) -> None:
        prompts = write_inputs(self.inputs, 10, 20)
        shutdown = Shutdown(grace_s=0.05)
        client = SpyClient(latency_s=0.01, on_call=lambda n: shutdown.request() if n == 40 else None)
        status, _ = await self.run_pipeline(client, shutdown=shutdown, workers=8)
        self.assertEqual(status, 130)
        written = len(records(self.outputs))
        self.assertGreater(written, 20)
        self.assertLess(written, 200)
        status, summary = await self.run_pipeline(SpyClient(), workers=8)
        self.assertEqual(status, 0)
        self.assertIn(f"{written} skipped", summary)
        self.assert_exactly_once(prompts)

    async def test_a_stopped_run_counts_the_prompts_that_ran_its_calls_and_what_is_left(self) -> None:
        write_inputs(self.inputs, 1, 3000)  # one file, one block: the reader stops at a line, not a block
        shutdown = Shutdown(grace_s=0.05)
        client = SpyClient(latency_s=0.005, on_call=lambda n: shutdown.request() if n == 20 else None)
        status, summary = await self.run_pipeline(client, shutdown=shutdown, workers=4)
        self.assertEqual(status, 130)
        found = re.search(r"Summary: (\d+) prompts read, 0 skipped \(already done\), (\d+) succeeded", summary)
        assert found is not None, summary
        read, succeeded = int(found.group(1)), int(found.group(2))
        self.assertLessEqual(read, len(client.prompts) + 5 + 1)  # those called, those queued, and one
        self.assertIn(f"; {len(client.prompts)} calls, ", summary)
        self.assertIn(
            f"left for the next run: {read - succeeded} prompts read but not done, and those not read", summary
        )

    async def test_the_wall_time_counts_the_resume_scan(self) -> None:
        write_inputs(self.inputs, 1, 3)
        scan = pipeline.scan_outputs

        def slow_scan(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.3)
            return scan(*args, **kwargs)

        with mock.patch.object(pipeline, "scan_outputs", slow_scan):
            _, summary = await self.run_pipeline()
        found = re.search(r"wall time ([0-9.]+)s", summary)
        assert found is not None, summary
        self.assertGreaterEqual(float(found.group(1)), 0.3)

    async def test_retry_errors_retries_failed_prompts_and_clears_them(self) -> None:
        prompts = write_inputs(self.inputs, 2, 5)
        await self.run_pipeline(SpyClient(fail=lambda prompt, n: api_error(400) if "3" in prompt else None))
        self.assertEqual(len(records(self.outputs, "errors.jsonl")), 1)
        client = SpyClient()
        status, _ = await self.run_pipeline(client)  # without --retry-errors: nothing to do
        self.assertEqual((status, client.prompts), (1, []))
        status, _ = await self.run_pipeline(client, retry_errors=True)
        self.assertEqual((status, client.prompts), (0, ["What is two times 3?"]))
        self.assertEqual(records(self.outputs, "errors.jsonl"), [])
        self.assert_exactly_once(prompts)


class InputEdgeCaseTest(PipelineTestCase):
    """Files as real editors and tools leave them."""

    async def test_a_bom_is_dropped_from_txt_jsonl_and_setting_files(self) -> None:
        self.inputs.mkdir()
        bom = "\ufeff"
        (self.inputs / "a.txt").write_text(bom + "What is two times 3?\n", encoding="utf-8")
        (self.inputs / "b.jsonl").write_text(bom + '{"id": "r1", "prompt": "What is two times 4?"}\n', encoding="utf-8")
        (self.tmp / "system.txt").write_text(bom + "Be brief.", encoding="utf-8")
        args = pipeline.parse_args(["--system-instruction", f"@{self.tmp / 'system.txt'}"])
        config: Config = pipeline.config_from(Config, args)
        self.assertEqual(config.system_instruction, "Be brief.")
        client = SpyClient()
        status, _ = await self.run_pipeline(client)
        self.assertEqual(status, 0)
        self.assertEqual(sorted(client.prompts), ["What is two times 3?", "What is two times 4?"])
        self.assertEqual({r["id"] for r in records(self.outputs)}, {"a.txt:1", "r1"})

    async def test_cr_only_and_crlf_line_ends_are_line_ends_across_chunks(self) -> None:
        self.inputs.mkdir()
        (self.inputs / "mac.txt").write_bytes(b"one\rtwo\r\rthree\r")
        (self.inputs / "dos.txt").write_bytes(b"alpha\r\nbeta\r\n\r\ngamma delta\r\n")
        with mock.patch.object(pipeline, "CHUNK_BYTES", 5):  # "\r\n" falls across chunk boundaries
            client = SpyClient()
            status, _ = await self.run_pipeline(client)
        self.assertEqual(status, 0)
        got = {r["id"]: r["prompt"] for r in records(self.outputs)}
        expected = {"mac.txt:1": "one", "mac.txt:2": "two", "mac.txt:4": "three"}
        expected |= {"dos.txt:1": "alpha", "dos.txt:2": "beta", "dos.txt:4": "gamma delta"}
        self.assertEqual(got, expected)

    async def test_lines_of_only_invisible_characters_are_blank(self) -> None:
        self.inputs.mkdir()
        (self.inputs / "a.txt").write_text("\u200b\n\x00\x00\n\u00a0\u2060\nreal\tprompt\n", encoding="utf-8")
        client = SpyClient()
        status, summary = await self.run_pipeline(client)
        self.assertEqual((status, client.prompts), (0, ["real\tprompt"]))
        self.assertEqual([r["id"] for r in records(self.outputs)], ["a.txt:4"])
        self.assertIn("1 prompt read", summary)

    async def test_hidden_files_are_skipped_and_counted_and_suffixes_match_in_any_case(self) -> None:
        self.inputs.mkdir()
        (self.inputs / ".#notes.txt").write_text("What is two times 1?\n")
        (self.inputs / "._notes.txt").write_bytes(b"\x00\x05\x16\x07\xff\xfe binary resource fork")
        (self.inputs / "UPPER.TXT").write_text("What is two times 2?\n")
        (self.inputs / "rows.ndjson").write_text('{"prompt": "What is two times 3?"}\n')
        client = SpyClient()
        with self.assertLogs(pipeline.log, "WARNING") as logged:
            status, _ = await self.run_pipeline(client)
        self.assertEqual(status, 0)
        self.assertEqual(sorted(client.prompts), ["What is two times 2?", "What is two times 3?"])
        self.assertIn("skipping 2 hidden files (names starting with '.')", "\n".join(logged.output))

    async def test_a_json_array_file_gets_one_line_saying_jsonl_needs_an_object_per_line(self) -> None:
        self.inputs.mkdir()
        rows = [{"prompt": f"What is two times {i}?"} for i in range(10)]
        (self.inputs / "rows.jsonl").write_text(json.dumps(rows, indent=2) + "\n")
        client = SpyClient()
        status, _ = await self.run_pipeline(client)
        self.assertEqual((status, client.prompts), (1, []))
        [failed] = records(self.outputs, "errors.jsonl")
        self.assertEqual(failed["id"], "rows.jsonl:1")
        self.assertIn("JSON array; JSONL needs one JSON object per line", failed["error"])

    async def test_rows_nested_990_or_100000_deep_fail_alone(self) -> None:
        self.inputs.mkdir()
        rows = ['{"prompt": "p", "x": ' + "[" * depth + "]" * depth + "}" for depth in (990, 100_000)]
        (self.inputs / "rows.jsonl").write_text("\n".join(rows) + '\n{"prompt": "What is two times 2?"}\n')
        for _ in range(2):  # and a re-run is not stopped by them either
            status, _ = await self.run_pipeline()
            self.assertEqual(status, 1)
        failed = {r["id"]: r["error"] for r in records(self.outputs, "errors.jsonl")}
        self.assertEqual(set(failed), {"rows.jsonl:1", "rows.jsonl:2"})
        for error in failed.values():  # json.loads's RecursionError (at 990 on 3.11), or our own limit of 100
            self.assertRegex(error, "^bad JSONL line: (nested deeper than 100 levels|maximum recursion depth)")
        self.assertEqual([r["prompt"] for r in records(self.outputs)], ["What is two times 2?"])


def assert_help_shows_defaults(test: unittest.TestCase, parser: Any) -> None:
    """Each flag's help states the parser's default, and each flag that takes a value names it."""
    options = " ".join(parser.format_help().partition("options:")[2].split())
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:  # a flag: on or off
            continue
        flag = action.option_strings[0]
        expected = "none" if action.default is None else str(action.default)
        if "(default: " in (action.help or ""):  # stated in the help itself (it depends on another flag)
            expected = action.help.partition("(default: ")[2].rpartition(")")[0]
        # The flag, a readable metavar (SECONDS, N, PATH, or the choices), its help, and its default.
        found = re.search(rf"{flag} (\{{[a-z,]+\}}|[A-Z,]+) .*?\(default: (.*?)\)", options)
        test.assertIsNotNone(found, flag)
        assert found is not None
        test.assertEqual(found.group(2), expected, flag)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder, by name, as bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


class ResumeSafetyTest(PipelineTestCase):
    """A resume never mixes settings or prompts, loses records, or changes a file not its own."""

    async def test_changed_prompts_under_answered_ids_are_refused_and_the_outputs_left_alone(self) -> None:
        write_inputs(self.inputs, 10, 3)  # ./make_inputs.sh, then ./make_inputs.sh inputs 10 5
        self.assertEqual((await self.run_pipeline())[0], 0)
        before = snapshot(self.outputs)
        write_inputs(self.inputs, 10, 5)
        client = SpyClient()
        with self.assertRaises(pipeline.UsageError) as refused:
            await self.run_pipeline(client)
        self.assertEqual(
            str(refused.exception),
            'the input of shard_1.txt:1 changed since it was answered: "What is two times 3?" -> '
            '"What is two times 5?", and 26 more: use a new --outputs, or restore the inputs',
        )
        self.assertEqual((client.prompts, snapshot(self.outputs)), ([], before))

    async def test_a_changed_setting_is_refused_with_old_and_new_values_and_nothing_touched(self) -> None:
        write_inputs(self.inputs, 2, 3)
        await self.run_pipeline(temperature=0.5, system_instruction="Be brief.")
        with (self.outputs / "shard_00000.jsonl").open("a") as f:
            f.write('{"id": "torn')  # a kill mid-write: cut only by a run that goes ahead
        before = snapshot(self.outputs)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"model": "gemini-2.5-pro"}, '--model was "gemini-flash-latest" for the records in '),
            ({"temperature": 1.0}, "--temperature was 0.5 for the records in "),
            ({"system_instruction": None}, '--system-instruction was "Be brief." for the records in '),
            ({"json_schema": {"type": "string"}}, "--json-schema was (none) for the records in "),
            ({"thinking_budget": 0}, "--thinking-budget was (none) for the records in "),
        ]
        for changes, message in cases:
            settings: dict[str, Any] = {"temperature": 0.5, "system_instruction": "Be brief."} | changes
            with self.subTest(changes), self.assertRaises(pipeline.UsageError) as refused:
                await self.run_pipeline(SpyClient(), **settings)
            self.assertTrue(str(refused.exception).startswith(message), refused.exception)
            self.assertIn(", now ", str(refused.exception))
            self.assertEqual(snapshot(self.outputs), before)
        status, _ = await self.run_pipeline(SpyClient(), workers=9, shard_size=1, temperature=0.5,
                                            system_instruction="Be brief.")  # fmt: skip
        self.assertEqual(status, 0)  # settings of the run alone may change

    async def test_an_output_with_no_record_yet_takes_new_settings_and_runs_its_failures_again(self) -> None:
        prompts = write_inputs(self.inputs, 1, 3)
        rejected = SpyClient(fail=lambda prompt, n: api_error(400))  # "thinking budget not supported", say
        self.assertEqual((await self.run_pipeline(rejected, thinking_budget=0))[0], 1)
        client = SpyClient()
        status, _ = await self.run_pipeline(client)
        self.assertEqual((status, sorted(client.prompts)), (0, sorted(prompts)))
        self.assertEqual(records(self.outputs, "errors.jsonl"), [])
        manifest = json.loads((self.outputs / "manifest.json").read_text())
        self.assertEqual(manifest["settings"], Config().recorded())

    async def test_files_the_pipeline_did_not_write_are_refused_and_left_alone(self) -> None:
        write_inputs(self.inputs, 1, 3)
        foreign = {
            "errors.jsonl": b"2026-12-01 12:00:00 ERROR disk almost full\n",
            "shard_00007.jsonl": b'{"event": "login", "user": "ann"}\n',
            "manifest.json": b'{"name": "my-app", "version": "1.0"}\n',
        }
        for name, data in foreign.items():
            with self.subTest(name):
                self.outputs.mkdir(exist_ok=True)
                for path in self.outputs.iterdir():
                    path.unlink()
                (self.outputs / name).write_bytes(data)
                with self.assertRaisesRegex(
                    pipeline.UsageError, f"{name} (holds lines that pipeline.py did not|is not)"
                ):
                    await self.run_pipeline()
                self.assertEqual((self.outputs / name).read_bytes(), data)
                self.assertEqual(sorted(path.name for path in self.outputs.iterdir()), sorted([name, ".lock"]))

    async def test_a_folder_from_before_the_manifest_is_adopted_when_every_line_is_a_record(self) -> None:
        prompts = write_inputs(self.inputs, 1, 3)
        self.outputs.mkdir()
        old = {"id": "shard_0.txt:1", "prompt": prompts[0], "response": "0"}
        (self.outputs / "shard_00004.jsonl").write_text(json.dumps(old) + "\n")
        client = SpyClient()
        self.assertEqual((await self.run_pipeline(client))[0], 0)
        self.assertEqual(sorted(client.prompts), sorted(prompts[1:]))
        self.assertTrue((self.outputs / "shard_00005.jsonl").exists())  # numbering goes on
        self.assertEqual(json.loads((self.outputs / "manifest.json").read_text())["written_by"], "pipeline.py")

    async def test_one_id_one_record_across_txt_and_jsonl_with_several_readers(self) -> None:
        self.inputs.mkdir()
        (self.inputs / "a.txt").write_text("What is two times 1?\nWhat is two times 2?\n")
        (self.inputs / "b.jsonl").write_text(json.dumps({"id": "a.txt:2", "prompt": "What is two times 9?"}) + "\n")
        (self.inputs / "c.jsonl").write_text(json.dumps({"id": "c.jsonl:1", "prompt": "What is two times 8?"}) + "\n")
        status, _ = await self.run_pipeline(readers=3)
        self.assertEqual(status, 1)
        done = {r["id"]: r["prompt"] for r in records(self.outputs)}
        self.assertEqual(done, {"a.txt:1": "What is two times 1?", "a.txt:2": "What is two times 2?"})
        failed = {r["id"]: r["error"] for r in records(self.outputs, "errors.jsonl")}
        self.assertEqual(set(failed), {"b.jsonl:1", "c.jsonl:1"})
        self.assertIn("'a.txt:2' is the id of line 2 of a.txt", failed["b.jsonl:1"])

    async def test_errors_of_fixed_or_deleted_inputs_leave_errors_jsonl(self) -> None:
        self.inputs.mkdir()
        (self.inputs / "a.jsonl").write_text('{"prompt": 5}\n{"prompt": "What is two times 1?"}\n')
        (self.inputs / "b.jsonl").write_text("{not json\n")
        status, summary = await self.run_pipeline()
        self.assertEqual(status, 1)
        self.assertIn("2 failed prompts in errors.jsonl", summary)
        (self.inputs / "a.jsonl").write_text('{"prompt": "What is two times 5?"}\n{"prompt": "What is two times 1?"}\n')
        (self.inputs / "b.jsonl").unlink()
        client = SpyClient()
        status, summary = await self.run_pipeline(client)
        self.assertEqual((status, client.prompts), (0, ["What is two times 5?"]))
        self.assertIn("0 failed prompts in errors.jsonl", summary)
        self.assertEqual(records(self.outputs, "errors.jsonl"), [])

    async def test_nan_in_an_input_row_fails_that_row_and_every_record_is_strict_json(self) -> None:
        self.inputs.mkdir()
        rows = [
            '{"prompt": "p1", "score": NaN}',
            '{"prompt": "p2", "score": -Infinity}',
            '{"prompt": "a\u2028b\u2029c"}',
        ]
        (self.inputs / "a.jsonl").write_text("\n".join(rows) + "\n")
        status, _ = await self.run_pipeline()
        self.assertEqual(status, 1)
        failed = {r["id"]: r["error"] for r in records(self.outputs, "errors.jsonl")}
        self.assertIn("NaN is not valid JSON", failed["a.jsonl:1"])
        self.assertIn("-Infinity is not valid JSON", failed["a.jsonl:2"])
        for name in ("shard_00000.jsonl", "errors.jsonl"):
            data = (self.outputs / name).read_text()
            self.assertEqual(len(data.splitlines()), data.count("\n"), name)  # no line ends inside a record
            for line in data.splitlines():
                pipeline.strict_json(line)
        self.assertEqual(records(self.outputs)[0]["prompt"], "a\u2028b\u2029c")


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
    """A tiny stand-in for the Gemini API: generateContent answers "ok: <prompt>"; the first
    call gets a 429 with a RetryInfo delay."""

    paths: list[str]

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.paths.append(self.path)
        payload: dict[str, Any]
        if (refusal := refused_on_v1(self.path)) is not None:
            status, payload = 404, refusal
        elif len(self.paths) == 1:
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.1s"}]
            error: dict[str, Any] = {
                "code": 429,
                "message": "quota",
                "status": "RESOURCE_EXHAUSTED",
                "details": details,
            }
            status, payload = 429, {"error": error}
        else:
            text = "ok: " + body["contents"][0]["parts"][0]["text"]
            candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}
            status, payload = 200, {"candidates": [candidate]}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def stub_server() -> Iterator[tuple[str, list[str]]]:
    paths: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (StubHandler,), {"paths": paths}))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", paths
    finally:
        server.shutdown()
        server.server_close()


class ApiVersionTest(PipelineTestCase):
    async def test_the_default_model_is_called_on_v1beta_unless_google_genai_api_version_says_otherwise(self) -> None:
        prompts = write_inputs(self.inputs, 1, 3)
        for chosen, sent in (("", "v1beta"), ("v1alpha", "v1alpha")):
            with self.subTest(chosen=chosen), stub_server() as (base_url, paths):
                shutil.rmtree(self.outputs, ignore_errors=True)
                env = {"GEMINI_API_KEY": "k", "GOOGLE_API_KEY": "", "GOOGLE_GEMINI_BASE_URL": base_url,
                       "GOOGLE_GENAI_API_VERSION": chosen}  # fmt: skip
                with mock.patch.dict(os.environ, env):
                    client = pipeline.make_client(offline=False, fake_latency_s=0)
                try:
                    status, _ = await self.run_pipeline(client)  # the default model: gemini-flash-latest
                finally:
                    await client.aio.aclose()
                self.assertEqual(status, 0, self.stderr)
                self.assertEqual(set(paths), {f"/{sent}/models/gemini-flash-latest:generateContent"})
                self.assert_exactly_once(prompts)


class RealClientTest(PipelineTestCase):
    async def test_end_to_end_through_genai_client_against_a_local_stub(self) -> None:
        prompts = write_inputs(self.inputs, 2, 3)
        with stub_server() as (base_url, paths):
            env = {"GEMINI_API_KEY": "test-key", "GOOGLE_API_KEY": "", "GOOGLE_GEMINI_BASE_URL": base_url}
            with mock.patch.dict(os.environ, env):
                client = pipeline.make_client(offline=False, fake_latency_s=0, fake_failure_rate=0)
            self.assertIsInstance(client, genai.Client)
            status, summary = await self.run_pipeline(client)
        self.assertEqual(status, 0)
        self.assertEqual(sorted(r["response"] for r in records(self.outputs)), sorted("ok: " + p for p in prompts))
        self.assertIn("1 retry", summary)
        self.assertEqual(len(paths), 7)
        self.assertRegex(paths[0], r"^/v1(beta)?/models/gemini-flash-latest:generateContent$")

    async def test_each_record_names_the_model_that_answered(self) -> None:
        write_inputs(self.inputs, 1, 3)  # the default --model is an alias, gemini-flash-latest: it moves
        with scripted_client(lambda body, n: answer("ok")) as (client, _):
            self.assertEqual((await self.run_pipeline(client))[0], 0)
        self.assertEqual([r["model_version"] for r in records(self.outputs)], [STUB_MODEL] * 3)


class FaultyStubHandler(BaseHTTPRequestHandler):
    """generateContent on a bad day, by prompt: "hang" is never answered; "html" gets a proxy's
    HTML page and "drop" a dropped connection on its first call; "blocked" is blocked for
    SAFETY; "long" is cut short at MAX_TOKENS. Anything else is answered "ok: <prompt>"."""

    calls: dict[str, int]
    release: threading.Event

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if refused_on_v1(self.path) is not None:
            self.connection.shutdown(2)  # not served: the test fails loudly
            return
        prompt = body["contents"][0]["parts"][0]["text"]
        self.calls[prompt] = self.calls.get(prompt, 0) + 1
        first = self.calls[prompt] == 1
        if prompt == "hang":
            self.release.wait(10)
            return
        if prompt == "drop" and first:
            self.connection.shutdown(2)
            return
        if prompt == "html" and first:
            self.reply(b"<html><body>502 Bad Gateway</body></html>", "text/html")
            return
        if prompt == "blocked":
            payload: dict[str, Any] = {"promptFeedback": {"blockReason": "SAFETY"}}
        else:
            reason = "MAX_TOKENS" if prompt == "long" else "STOP"
            content = {"role": "model", "parts": [{"text": f"ok: {prompt}"}]}
            payload = {"candidates": [{"content": content, "finishReason": reason}]}
        self.reply(json.dumps(payload).encode(), "application/json")

    def reply(self, data: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def faulty_server() -> Iterator[tuple[str, dict[str, int]]]:
    calls: dict[str, int] = {}
    release = threading.Event()
    handler = type("Handler", (FaultyStubHandler,), {"calls": calls, "release": release})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", calls
    finally:
        release.set()
        server.shutdown()
        server.server_close()


class BadDayTest(PipelineTestCase):
    """The real genai.Client against a local server that fails the way real ones do."""

    async def run_against(self, prompts: list[str], **changes: Any) -> tuple[int, dict[str, int]]:
        self.inputs.mkdir()
        (self.inputs / "a.txt").write_text("".join(p + "\n" for p in prompts))
        with faulty_server() as (base_url, calls):
            env = {"GEMINI_API_KEY": "test-key", "GOOGLE_API_KEY": "", "GOOGLE_GEMINI_BASE_URL": base_url}
            with mock.patch.dict(os.environ, env):
                timeout_s = changes.get("request_timeout_s", pipeline.REQUEST_TIMEOUT_S)
                client = pipeline.make_client(
                    offline=False, fake_latency_s=0, fake_failure_rate=0, request_timeout_s=timeout_s
                )
            status, _ = await self.run_pipeline(client, **changes)
        return status, calls

    async def test_a_call_never_answered_times_out_is_retried_and_fails_with_the_reason(self) -> None:
        started = time.monotonic()
        status, calls = await self.run_against(["hang", "fine"], request_timeout_s=0.3, max_attempts=2)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((status, calls["hang"], calls["fine"]), (1, 2, 1))
        [failed] = records(self.outputs, "errors.jsonl")
        self.assertEqual((failed["id"], failed["error"], failed["attempts"]), ("a.txt:1", "timed out after 0.3 s", 2))
        self.assertEqual([r["response"] for r in records(self.outputs)], ["ok: fine"])

    async def test_a_stall_outside_the_http_call_is_bounded_too(self) -> None:
        write_inputs(self.inputs, 1, 2)
        status, _ = await self.run_pipeline(SpyClient(latency_s=60), request_timeout_s=0.1, max_attempts=2)
        self.assertEqual(status, 1)
        self.assertEqual({r["error"] for r in records(self.outputs, "errors.jsonl")}, {"timed out after 0.1 s"})

    async def test_an_html_body_and_a_dropped_connection_are_retried(self) -> None:
        status, calls = await self.run_against(["html", "drop"])
        self.assertEqual((status, calls), (0, {"html": 2, "drop": 2}))
        self.assertEqual(sorted(r["response"] for r in records(self.outputs)), ["ok: drop", "ok: html"])

    async def test_a_blocked_prompt_is_recorded_with_its_reason_and_not_retried(self) -> None:
        status, calls = await self.run_against(["blocked"])
        self.assertEqual((status, calls), (1, {"blocked": 1}))
        [failed] = records(self.outputs, "errors.jsonl")
        self.assertEqual((failed["error"], failed["attempts"]), ("blocked: SAFETY", 1))

    async def test_an_answer_cut_short_keeps_its_text_and_says_why(self) -> None:
        status, _ = await self.run_against(["long", "fine"])
        self.assertEqual(status, 0)
        by_prompt = {r["prompt"]: r for r in records(self.outputs)}
        self.assertEqual(
            (by_prompt["long"]["response"], by_prompt["long"]["finish_reason"]), ("ok: long", "MAX_TOKENS")
        )
        self.assertNotIn("finish_reason", by_prompt["fine"])

    async def test_a_reply_of_the_wrong_shape_is_retried_and_a_bug_surfaces(self) -> None:
        write_inputs(self.inputs, 1, 2)
        shapeless = types.GenerateContentResponse.model_validate({"candidates": [{}]})
        client = SpyClient(fail=lambda prompt, n: None)
        real = client.generate_content
        calls = itertools.count(1)

        async def first_shapeless(**kwargs: Any) -> types.GenerateContentResponse:
            return shapeless if next(calls) == 1 else await real(**kwargs)

        with mock.patch.object(client, "generate_content", first_shapeless):
            status, summary = await self.run_pipeline(client)
        self.assertEqual(status, 0)
        self.assertIn("1 retry", summary)

        async def bug(**kwargs: Any) -> types.GenerateContentResponse:
            raise AttributeError("a bug of ours")

        with mock.patch.object(client, "generate_content", bug), self.assertRaises(ExceptionGroup):
            await self.run_pipeline(client, outputs=self.tmp / "other")


class CancelledOpenTest(PipelineTestCase):
    """aiofiles opens files in a thread; a task cancelled at that moment must not leak the file."""

    def open_fds(self) -> int:
        return len(os.listdir("/proc/self/fd"))

    async def test_readers_and_writers_cancelled_at_the_open_leak_no_file(self) -> None:
        write_inputs(self.inputs, 1, 3)
        self.outputs.mkdir()
        files = pipeline.input_files(self.inputs)
        await asyncio.sleep(0.05)
        before = self.open_fds()
        rng = random.Random(5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for i in range(200):
                queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
                run = pipeline.Run(replace(self.config, shard_size=pipeline.SHARD_SIZE, quiet=False))
                stage: Coroutine[Any, Any, None]
                if i % 2:
                    stage = pipeline.read_inputs(run, files, queue, queue, consumers=1)
                else:
                    queue.put_nowait(pipeline.Result(f"x:{i}", "p", response="r"))
                    stage = pipeline.write_outputs(run, queue, shard_numbers=itertools.count(i * 10))
                task = asyncio.create_task(stage)
                for _ in range(rng.randrange(3)):  # 0 to 2 loop turns: at the open, or just after
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            gc.collect()
        self.assertEqual(self.open_fds(), before)
        self.assertEqual([w for w in caught if issubclass(w.category, ResourceWarning)], [])

    async def test_a_file_still_closes_when_cancelled_again_while_closing(self) -> None:
        # Two stages failing (a full disk fails every writer) cancel the others twice; a close
        # still queued for a worker thread must not be dropped by the second cancellation.
        write_inputs(self.inputs, 1, 3)
        busy, release = ThreadPoolExecutor(1), threading.Event()
        self.addCleanup(busy.shutdown)
        asyncio.get_running_loop().set_default_executor(busy)  # aiofiles' threads: one, soon busy
        before = self.open_fds()
        opened = asyncio.Event()

        async def read() -> None:
            async with pipeline.open_file(self.inputs / "shard_0.txt", "rb"):
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
        self.assertEqual(self.open_fds(), before)


class ScriptedHandler(BaseHTTPRequestHandler):
    """generateContent answered by a test's function: respond(body, call_number) -> (status,
    JSON payload). Records every request body."""

    bodies: list[dict[str, Any]]
    respond: Callable[[dict[str, Any], int], tuple[int, dict[str, Any]]]
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
            number = len(self.bodies)
        status, payload = type(self).respond(body, number)
        if (refusal := refused_on_v1(self.path)) is not None:
            status, payload = 404, refusal
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


STUB_MODEL = "gemini-3-flash-preview"  # what the API names as the model that answered (an alias resolved)


def answer(text: str, input_tokens: int = 10, output_tokens: int = 5, thinking: int = 0) -> tuple[int, dict[str, Any]]:
    usage = {"promptTokenCount": input_tokens, "candidatesTokenCount": output_tokens}
    if thinking:
        usage["thoughtsTokenCount"] = thinking
    candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}
    return 200, {"candidates": [candidate], "usageMetadata": usage, "modelVersion": STUB_MODEL}


def prompt_of(body: dict[str, Any]) -> str:
    return str(body["contents"][0]["parts"][0]["text"])


@contextlib.contextmanager
def scripted_client(
    respond: Callable[[dict[str, Any], int], tuple[int, dict[str, Any]]],
) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """The real genai.Client, made by pipeline.make_client, against a scripted stub."""
    bodies: list[dict[str, Any]] = []
    handler = type("Handler", (ScriptedHandler,), {"bodies": bodies, "respond": staticmethod(respond)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_port}"
    try:
        with mock.patch.dict(
            os.environ, {"GEMINI_API_KEY": "k", "GOOGLE_API_KEY": "", "GOOGLE_GEMINI_BASE_URL": base_url}
        ):
            yield pipeline.make_client(offline=False, fake_latency_s=0, fake_failure_rate=0), bodies
    finally:
        server.shutdown()
        server.server_close()


class BatchStub:
    """The Batch API's REST surface, as google-genai sends it (read from its files.py, batches.py
    and _api_client.py), for one test. Records every request as (method, path).

    - The resumable upload: POST /upload/v1beta/files (X-Goog-Upload-Protocol: resumable,
      Command: start) is answered with an absolute x-goog-upload-url; POSTs there carry the bytes
      (Command: upload, or "upload, finalize" last), answered x-goog-upload-status active / final,
      and the final one with {"file": {...}}.
    - POST /v1beta/models/{m}:batchGenerateContent ({"batch": {"inputConfig": {"fileName"},
      "displayName"}}) creates a job, answered as a long-running operation: name "batches/N", the
      state in metadata.state.
    - GET /v1beta/batches/N: BATCH_STATE_RUNNING for the first polls_to_end polls, then the job's
      end state (end_states[N-1], else BATCH_STATE_SUCCEEDED); once succeeded, metadata.output
      .responsesFile names a results file: "ok: <prompt>" for each key, usage 10 + 5 tokens,
      passed through results(rows) (a test may shuffle, drop or fail rows).
    - POST /v1beta/batches/N:cancel, and GET /v1beta/files/{name}:download?alt=media.
    """

    def __init__(self) -> None:
        self.changed = threading.Condition()  # notified after each request
        self.requests: list[tuple[str, str]] = []
        self.files: dict[str, bytes] = {}  # name -> content
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
            self.requests.append((method, path))
            try:
                return self._handle(method, path, headers, body)
            finally:
                self.changed.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Blocks (call it in a thread) until predicate() holds after a request."""
        with self.changed:
            assert self.changed.wait_for(predicate, timeout_s), "the stub waited in vain"

    def polled(self) -> bool:
        return any(method == "GET" and "/batches/" in path for method, path in self.requests)

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
        if method == "POST" and (m := re.fullmatch(r"/v1(beta)?/models/([^/:]+):batchGenerateContent", path)):
            batch = json.loads(body)["batch"]
            name = f"batches/{len(self.jobs) + 1}"
            self.jobs[name] = {"file": batch["inputConfig"]["fileName"], "model": m.group(2), "polls": 0,
                               "display_name": batch.get("displayName"), "state": "BATCH_STATE_PENDING"}  # fmt: skip
            if (late := self.fault("create")) is not None:
                return late  # made, but the answer says otherwise
            return 200, {}, json.dumps(self.operation(name)).encode()
        if method == "GET" and (m := re.fullmatch(r"/v1(beta)?/(batches/\d+)", path)):
            if (fault := self.fault("get")) is not None:
                return fault
            if (job := self.jobs.get(m.group(2))) is None:
                error = {"code": 404, "message": "not found", "status": "NOT_FOUND"}
                return 404, {}, json.dumps({"error": error}).encode()
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
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{job['model']}", "displayName": job["display_name"], "state": job["state"],
        }  # fmt: skip
        if job["state"] == "BATCH_STATE_SUCCEEDED":
            metadata["output"] = {"responsesFile": f"files/results-{name.split('/')[1]}"}
        return {
            "name": name,
            "metadata": metadata,
            "done": job["state"] not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"),
        }

    def answer(self, requests: bytes) -> bytes:
        rows = []
        for line in requests.decode().splitlines():
            row = json.loads(line)
            _, response = answer("ok: " + prompt_of(row["request"]))
            rows.append({"key": row["key"], "response": response})
        return "".join(json.dumps(row) + "\n" for row in self.results(rows)).encode()

    def created(self) -> int:
        return len(self.jobs)


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


def real_batch_client(base_url: str) -> Any:
    env = {"GEMINI_API_KEY": "k", "GOOGLE_API_KEY": "", "GOOGLE_GEMINI_BASE_URL": base_url}
    with mock.patch.dict(os.environ, env):
        return pipeline.make_client(offline=False, fake_latency_s=0, fake_failure_rate=0)


class BatchApiTest(PipelineTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = replace(self.config, batch_api=True, poll_interval_s=0.01, batch_job_size=4)

    async def run_batch(self, stub_url: str, shutdown: Shutdown | None = None, **changes: Any) -> tuple[int, str]:
        client = real_batch_client(stub_url)
        try:
            return await self.run_pipeline(client, shutdown, **changes)
        finally:
            await client.aio.aclose()

    async def test_jobs_go_through_upload_create_poll_download_and_end_exactly_once(self) -> None:
        prompts = write_inputs(self.inputs, 3, 3)  # 9 prompts: jobs of 4, 4 and 1
        with batch_server() as (url, stub):
            status, summary = await self.run_batch(url, system_instruction="Be brief.", temperature=0.5,
                                                   thinking_level="low", json_schema=None)  # fmt: skip
        self.assertEqual(status, 0, self.stderr)
        self.assertEqual(sorted(r["response"] for r in records(self.outputs)), sorted("ok: " + p for p in prompts))
        self.assertTrue(all(r["usage"] == {"input_tokens": 10, "output_tokens": 5} for r in records(self.outputs)))
        self.assertEqual({r["model_version"] for r in records(self.outputs)}, {STUB_MODEL})  # the model that answered
        self.assertEqual(stub.created(), 3)
        self.assertRegex(stub.jobs["batches/1"]["display_name"], r"^pipeline\.py outputs job_00001 \d+$")
        uploaded = [json.loads(line) for data in stub.files.values() if b'"request"' in data
                    for line in data.decode().splitlines()]  # fmt: skip
        self.assertEqual(sorted(row["key"] for row in uploaded), sorted(r["id"] for r in records(self.outputs)))
        request = uploaded[0]["request"]
        self.assertEqual(request["systemInstruction"], {"parts": [{"text": "Be brief."}]})
        self.assertEqual(request["generationConfig"], {"temperature": 0.5, "thinkingConfig": {"thinkingLevel": "LOW"}})
        self.assertIn("3 Batch API jobs created", summary)
        self.assertIn("billed at the batch price", summary)
        self.assertEqual(json.loads((self.outputs / "manifest.json").read_text())["jobs"], [])
        self.assertFalse((self.outputs / "batch").exists())  # each job's files go once collected, then the folder
        self.assert_exactly_once(prompts)

    async def test_shuffled_results_a_missing_key_and_a_row_error_are_matched_by_key(self) -> None:
        prompts = write_inputs(self.inputs, 2, 4)

        def results(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            rows = rows[::-1]  # out of order
            dropped = rows.pop(1)["key"]  # a key with no result
            rows[0] = {"key": rows[0]["key"], "error": {"code": 400, "message": "bad request", "status": "INVALID"}}
            rows[1]["response"]["candidates"][0]["finishReason"] = "SAFETY"  # blocked: no record
            rows[2]["response"]["candidates"][0]["finishReason"] = "MAX_TOKENS"  # cut short: kept, and said
            self.lost.append(dropped)
            self.failed.append(rows[0]["key"])
            self.blocked.append(rows[1]["key"])
            self.cut.append(rows[2]["key"])
            return rows

        self.lost: list[str] = []
        self.failed: list[str] = []
        self.blocked: list[str] = []
        self.cut: list[str] = []
        with batch_server() as (url, stub):
            stub.results = results
            status, _ = await self.run_batch(url)
        self.assertEqual(status, 1)
        written = {r["id"]: r["response"] for r in records(self.outputs)}
        by_id = {f"shard_{s}.txt:{n}": p for s in range(2) for n, p in enumerate(prompts[s * 4 : s * 4 + 4], 1)}
        self.assertTrue(all(response == "ok: " + by_id[i] for i, response in written.items()))  # never by position
        errors_by_id = {r["id"]: r["error"] for r in records(self.outputs, "errors.jsonl")}
        self.assertEqual(sorted(errors_by_id), sorted(self.lost + self.failed + self.blocked))
        self.assertTrue(all("no result for this prompt in batch job batches/" in errors_by_id[i] for i in self.lost))
        self.assertTrue(all(errors_by_id[i] == "batch: 400 INVALID: bad request" for i in self.failed))
        self.assertEqual([errors_by_id[i] for i in self.blocked], ["blocked: SAFETY"] * 2)  # one in each job of 4
        self.assertEqual([r["finish_reason"] for r in records(self.outputs) if r["id"] in self.cut], ["MAX_TOKENS"] * 2)
        self.assert_exactly_once(prompts)
        with batch_server() as (url, stub):  # --retry-errors sends the failed ones again, in a job of their own
            self.assertEqual((await self.run_batch(url, retry_errors=True))[0], 0)
            self.assertEqual(stub.created(), 2)  # 6 failed prompts: jobs of 4 and 2
        self.assertEqual(records(self.outputs, "errors.jsonl"), [])
        self.assertEqual(sorted(r["prompt"] for r in records(self.outputs)), sorted(prompts))

    async def interrupted_while_waiting(self, url: str, stub: BatchStub, **changes: Any) -> None:
        """Runs until a job is polled, then Ctrl-C: the jobs stay live at the stub."""
        stub.polls_to_end = 10**9
        shutdown = Shutdown()
        with stub.changed:
            stub.requests.clear()  # polled: by this run

        async def interrupt() -> None:
            await asyncio.to_thread(stub.wait_until, stub.polled)
            shutdown.request(signal.SIGINT)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(interrupt())
            self.assertEqual((await self.run_batch(url, shutdown=shutdown, **changes))[0], 130)
        stub.polls_to_end = 0

    async def test_a_missing_key_retried_then_interrupted_is_never_lost(self) -> None:
        prompts = write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            first = "shard_0.txt:1"
            stub.results = lambda rows: [row for row in rows if row["key"] != first]  # no result: errors.jsonl
            self.assertEqual((await self.run_batch(url))[0], 1)
            await self.interrupted_while_waiting(url, stub, retry_errors=True)  # sent again: its job is live
            self.assertEqual((await self.run_batch(url))[0], 1, self.stderr)  # a plain run collects it: no result
            self.assertEqual(stub.created(), 2)
            self.assert_exactly_once(prompts)
            self.assertEqual([r["id"] for r in records(self.outputs, "errors.jsonl")], [first])
            stub.results = lambda rows: rows
            self.assertEqual((await self.run_batch(url, retry_errors=True))[0], 0)
        self.assert_exactly_once(prompts)
        self.assertEqual(records(self.outputs, "errors.jsonl"), [])

    async def test_a_live_job_keeps_its_settings(self) -> None:
        write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            await self.interrupted_while_waiting(url, stub)
            with self.assertRaisesRegex(pipeline.UsageError, "--system-instruction was"):
                await self.run_batch(url, system_instruction="Be brief.")
            self.assertEqual(stub.created(), 1)

    async def test_a_403_on_get_stops_the_run_and_keeps_the_job(self) -> None:
        prompts = write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            stub.faults["get"] = [403]
            self.assertEqual((await self.run_batch(url))[0], 2)
            self.assertIn("cannot look at batch job batches/1 (403 PERMISSION_DENIED", self.stderr)
            self.assertEqual((await self.run_batch(url))[0], 0)
            self.assertEqual(stub.created(), 1)  # never paid twice
        self.assert_exactly_once(prompts)

    async def test_a_create_that_made_its_job_then_failed_is_adopted_not_repeated(self) -> None:
        prompts = write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            stub.faults["create"] = [503]
            self.assertEqual((await self.run_batch(url, max_attempts=3))[0], 0, self.stderr)
            self.assertEqual(stub.created(), 1)
        self.assert_exactly_once(prompts)

    async def test_a_failing_download_is_retried_and_a_gone_results_file_resends_its_prompts(self) -> None:
        prompts = write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            stub.faults["download"] = [503, 404]
            self.assertEqual((await self.run_batch(url, max_attempts=3))[0], 0, self.stderr)
            self.assertEqual(stub.created(), 2)
        self.assert_exactly_once(prompts)
        self.assertFalse((self.outputs / "batch").exists())  # no results file left behind

    async def test_ctrl_c_during_a_hung_upload_exits_130_within_the_grace_and_leaves_no_file(self) -> None:
        write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            stub.hold_uploads.set()
            self.addCleanup(stub.released.set)
            shutdown = Shutdown(grace_s=0.5)

            async def interrupt() -> None:
                await asyncio.to_thread(stub.wait_until, lambda: bool(stub.requests))
                shutdown.request(signal.SIGINT)

            started = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(interrupt())
                status, _ = await self.run_batch(url, shutdown=shutdown, request_timeout_s=60)
            self.assertEqual(status, 130)
            self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(list((self.outputs / "batch").glob("*")), [])

    async def test_an_orphan_job_file_is_removed_when_the_folder_opens(self) -> None:
        prompts = write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            await self.interrupted_while_waiting(url, stub)
            orphan = self.outputs / "batch" / "job_00042.jsonl"  # written, never recorded (kill -9 between)
            orphan.write_text("{}\n")
            self.assertEqual((await self.run_batch(url))[0], 0)
            self.assertFalse(orphan.exists())
        self.assert_exactly_once(prompts)

    async def test_batch_cancel_retries_and_keeps_a_job_it_could_not_reach(self) -> None:
        write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            await self.interrupted_while_waiting(url, stub)
            stub.faults["cancel"] = [503, 503, 503, 503]  # max_attempts 3: one call short of the fourth
            status, out = await self.run_batch(url, batch_cancel=True, max_attempts=3)
            self.assertEqual(status, 1)
            self.assertIn("batches/1: 503 UNAVAILABLE: cancel fault; still recorded", out)
            self.assertEqual(len(pipeline.read_manifest(self.outputs)["jobs"]), 1)  # type: ignore[index]
            self.assertEqual((await self.run_batch(url, batch_cancel=True, max_attempts=3))[0], 0)  # 503, then done
            self.assertEqual(pipeline.read_manifest(self.outputs)["jobs"], [])  # type: ignore[index]
            self.assertEqual(stub.jobs["batches/1"]["state"], "BATCH_STATE_CANCELLED")

    async def test_rpm_and_tpm_do_not_pace_the_batch_apis_own_calls(self) -> None:
        prompts = write_inputs(self.inputs, 1, 4)
        with batch_server() as (url, stub):
            started = time.monotonic()
            status, _ = await self.run_batch(url, rpm=6, tpm=6)  # paced, 10 s between calls: 7 calls, a minute
            self.assertEqual(status, 0, self.stderr)
            self.assertLess(time.monotonic() - started, 5)
            self.assertGreaterEqual(len(stub.requests), 5)  # upload (2), create, get, download
        self.assert_exactly_once(prompts)

    async def test_a_row_with_a_lone_surrogate_fails_alone_in_both_modes(self) -> None:
        self.inputs.mkdir()
        (self.inputs / "rows.jsonl").write_text(
            '{"prompt": "What is two times 1?"}\n{"id": "\\ud800", "prompt": "x"}\n{"prompt": "bad \\udc00"}\n'
        )
        for batch_api in (True, False):
            with self.subTest(batch_api=batch_api), batch_server() as (url, _):
                shutil.rmtree(self.outputs, ignore_errors=True)
                run = self.run_batch(url, batch_api=True) if batch_api else self.run_pipeline(batch_api=False)
                status, _ = await run
                self.assertEqual(status, 1, self.stderr)
                self.assertEqual([r["id"] for r in records(self.outputs)], ["rows.jsonl:1"])
                errors = records(self.outputs, "errors.jsonl")
                self.assertEqual([r["id"] for r in errors], ["rows.jsonl:2", "rows.jsonl:3"])
                self.assertTrue(all("lone surrogate" in r["error"] for r in errors))
                shards = len(list(self.outputs.glob("shard_*.jsonl")))
                again = self.run_batch(url, batch_api=True) if batch_api else self.run_pipeline(batch_api=False)
                self.assertEqual((await again)[0], 1)
                self.assertEqual(len(list(self.outputs.glob("shard_*.jsonl"))), shards)  # no empty shard added

    async def test_an_expired_job_is_resubmitted_then_fails_with_its_state_after_max_attempts(self) -> None:
        prompts = write_inputs(self.inputs, 1, 3)
        with batch_server() as (url, stub):
            stub.end_states = ["BATCH_STATE_EXPIRED", "BATCH_STATE_SUCCEEDED"]
            status, _ = await self.run_batch(url)
            self.assertEqual((status, stub.created()), (0, 2))  # the second job answered them
        self.assert_exactly_once(prompts)
        self.assertEqual(len(records(self.outputs)), 3)
        with batch_server() as (url, stub):
            stub.end_states = ["BATCH_STATE_EXPIRED"] * 3
            status, _ = await self.run_batch(url, outputs=self.tmp / "again", max_attempts=3)
            self.assertEqual((status, stub.created()), (1, 3))
        errors_ = records(self.tmp / "again", "errors.jsonl")
        self.assertEqual(len(errors_), 3)
        self.assertTrue(all(e["error"] == "batch job batches/3 ended EXPIRED (attempt 3)" for e in errors_), errors_)

    async def test_ctrl_c_while_waiting_stops_at_once_and_a_rerun_collects_without_a_new_job(self) -> None:
        prompts = write_inputs(self.inputs, 2, 3)
        with batch_server() as (url, stub):
            stub.polls_to_end = 10**9  # never ends, until the test lets it
            shutdown = Shutdown()

            async def interrupt() -> None:
                await asyncio.to_thread(stub.wait_until, lambda: stub.created() == 2 and stub.polled())
                shutdown.request(signal.SIGINT)

            started = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(interrupt())
                status, _ = await self.run_batch(url, poll_interval_s=30, shutdown=shutdown)
            self.assertLess(time.monotonic() - started, 5)  # not a 30 s poll, nor a 5 s grace
            self.assertEqual(status, 130)
            self.assertIn("2 Batch API jobs still running at Google: run the same command again", self.stderr)
            self.assertEqual(records(self.outputs), [])
            self.assertEqual(len(json.loads((self.outputs / "manifest.json").read_text())["jobs"]), 2)
            with self.assertRaisesRegex(pipeline.UsageError, "run with --batch-api to collect them"):
                await self.run_pipeline(SpyClient(), batch_api=False)
            stub.polls_to_end = 0
            status, _ = await self.run_batch(url)
            self.assertEqual((status, stub.created()), (0, 2))  # no new job
        self.assert_exactly_once(prompts)

    async def test_offline_the_simulated_batch_api_answers_as_the_simulated_model_even_across_processes(self) -> None:
        prompts = write_inputs(self.inputs, 2, 3)
        shutdown = Shutdown()

        def recorded() -> None:  # a job in the manifest, named by the API: the run waits on it
            deadline = time.monotonic() + 10
            manifest = self.outputs / "manifest.json"
            while not (
                manifest.exists() and any(job["name"] for job in json.loads(manifest.read_text()).get("jobs", []))
            ):
                assert time.monotonic() < deadline, "no job was recorded"
                time.sleep(0.005)

        async def interrupt() -> None:
            await asyncio.to_thread(recorded)
            shutdown.request(signal.SIGINT)

        with mock.patch.object(pipeline, "SIMULATED_JOB_S", 0.3):
            async with asyncio.TaskGroup() as tg:
                tg.create_task(interrupt())
                status, _ = await self.run_pipeline(pipeline.SimulatedClient(), shutdown=shutdown, poll_interval_s=0.01)
            self.assertEqual(status, 130)
            status, summary = await self.run_pipeline(pipeline.SimulatedClient(), poll_interval_s=0.01)  # a new client
        self.assertEqual(status, 0)
        answers = {r["prompt"]: r["response"] for r in records(self.outputs)}
        self.assertEqual(answers, {p: str(2 * int(p.split()[-1].rstrip("?"))) for p in prompts})
        # The first run's job (4 prompts: jobs of 4) collected by the second, which sent the other 2 in one
        # job: read and sent, or (if the first run had recorded it before its create) sent from its file.
        self.assertRegex(summary, r" [46] skipped")
        self.assertIn("1 Batch API job created", summary)

    async def test_offline_a_kill_between_create_and_its_record_is_adopted_from_the_simulated_list(self) -> None:
        prompts = write_inputs(self.inputs, 1, 3)
        record = pipeline.Ledger.record

        async def killed_once_created(ledger: pipeline.Ledger, job: pipeline.Job, *, replacing: Any = None) -> None:
            if job.name and replacing is not None and not replacing.name:
                raise Killed
            await record(ledger, job, replacing=replacing)

        with mock.patch.object(pipeline, "SIMULATED_JOB_S", 0.0):
            with mock.patch.object(pipeline.Ledger, "record", killed_once_created), self.assertRaises(KILLED):
                await self.run_pipeline(pipeline.SimulatedClient(), poll_interval_s=0.01)
            status, summary = await self.run_pipeline(pipeline.SimulatedClient(), poll_interval_s=0.01)
        self.assertEqual(status, 0, summary)
        self.assertIn("0 Batch API jobs created", summary)  # the first run's, adopted
        self.assertEqual(sorted(r["prompt"] for r in records(self.outputs)), sorted(prompts))

    async def test_off_a_terminal_the_progress_line_shows_the_jobs_by_state_and_the_time_elapsed(self) -> None:
        write_inputs(self.inputs, 1, 2)
        jobs = pipeline.Ledger(self.outputs)
        jobs.states = {
            "batches/1": "JOB_STATE_RUNNING",
            "batches/2": "JOB_STATE_RUNNING",
            "batches/3": "JOB_STATE_PENDING",
        }
        stats = pipeline.Stats(succeeded=4, failed=1)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), mock.patch.object(pipeline, "PROGRESS_EVERY_S", 0.2):
            files = sorted(self.inputs.glob("*.txt"))
            progress = asyncio.create_task(pipeline.show_progress(stats, files, tty=False, jobs=jobs))
            await asyncio.sleep(0.3)
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        self.assertRegex(
            err.getvalue(), r"^progress: batch jobs: 1 pending, 2 running; \d+s elapsed; 5 done, 1 failed\n$"
        )

    async def test_batch_cancel_cancels_the_recorded_jobs_whatever_the_flags_and_forgets_them(self) -> None:
        write_inputs(self.inputs, 1, 2)
        with batch_server() as (url, stub):
            stub.polls_to_end = 10**9
            shutdown = Shutdown()

            async def interrupt() -> None:
                await asyncio.to_thread(stub.wait_until, lambda: stub.created() == 1)
                shutdown.request(signal.SIGTERM)

            async with asyncio.TaskGroup() as tg:
                tg.create_task(interrupt())
                self.assertEqual((await self.run_batch(url, shutdown=shutdown))[0], 143)
            (self.outputs / "batch" / "job_00042.jsonl").write_text("{}\n")  # an orphan (kill -9 before its record)
            settings = json.loads((self.outputs / "manifest.json").read_text())["settings"]
            status, _ = await self.run_batch(url, batch_cancel=True, model="another-model", temperature=1.0)
            self.assertEqual(status, 0, self.stderr)  # the flags of the run it cancels are not needed
            self.assertEqual(json.loads((self.outputs / "manifest.json").read_text())["settings"], settings)
            self.assertTrue(
                any(m == "POST" and re.fullmatch(r"/v1(beta)?/batches/1:cancel", p) for m, p in stub.requests)
            )
        self.assertEqual(json.loads((self.outputs / "manifest.json").read_text())["jobs"], [])
        self.assertFalse((self.outputs / "batch").exists())  # its files and the orphan gone with it
        self.assertEqual((await self.run_pipeline(SpyClient(), batch_api=False))[0], 0)  # the prompts, done now

    async def test_a_kill_between_create_and_its_record_leaves_a_job_batch_cancel_finds_and_cancels(self) -> None:
        write_inputs(self.inputs, 1, 2)
        record = pipeline.Ledger.record

        async def killed_once_created(ledger: pipeline.Ledger, job: pipeline.Job, *, replacing: Any = None) -> None:
            if job.name and replacing is not None and not replacing.name:  # create returned: kill -9 now
                raise Killed
            await record(ledger, job, replacing=replacing)

        with batch_server() as (url, stub):
            stub.polls_to_end = 10**9
            with mock.patch.object(pipeline.Ledger, "record", killed_once_created), self.assertRaises(KILLED):
                await self.run_batch(url)
            [pending] = pipeline.read_manifest(self.outputs)["jobs"]  # type: ignore[index]
            self.assertEqual((pending["name"], stub.created()), ("", 1))
            status, out = await self.run_batch(url, batch_cancel=True)
            self.assertEqual(status, 0, out)
            self.assertIn("cancelled batches/1", out)  # found by its display name
        self.assertEqual(json.loads((self.outputs / "manifest.json").read_text())["jobs"], [])
        self.assertEqual((await self.run_pipeline(SpyClient(), batch_api=False))[0], 0)  # the prompts, done now
        self.assertEqual(len(records(self.outputs)), 2)


class JsonlInputTest(PipelineTestCase):
    async def test_txt_and_jsonl_together_with_ids_metadata_duplicates_and_bad_lines(self) -> None:
        self.inputs.mkdir()
        (self.inputs / "a.txt").write_text("What is two times 1?\n")
        rows = [
            {"id": "r1", "prompt": "What is two times 2?", "label": "x", "tags": [1, 2]},
            {"prompt": "What is two times 3?"},
            "not an object",
            {"id": "r1", "prompt": "What is two times 4?"},
            {"id": 7, "prompt": "bad id"},
            {"id": "r5"},
        ]
        lines = [json.dumps(row) for row in rows] + ["{not json"]
        (self.inputs / "b.jsonl").write_text("\n".join(lines) + "\n")
        status, _ = await self.run_pipeline()
        self.assertEqual(status, 1)
        done = {r["id"]: r for r in records(self.outputs)}
        self.assertEqual(set(done), {"a.txt:1", "r1", "b.jsonl:2"})
        self.assertEqual(done["r1"]["metadata"], {"label": "x", "tags": [1, 2]})
        self.assertEqual(done["r1"]["response"], "4")
        self.assertNotIn("metadata", done["b.jsonl:2"])
        failed = {r["id"]: r["error"] for r in records(self.outputs, "errors.jsonl")}
        self.assertEqual(set(failed), {"b.jsonl:3", "b.jsonl:4", "b.jsonl:5", "b.jsonl:6", "b.jsonl:7"})
        self.assertIn("not a JSON object", failed["b.jsonl:3"])
        self.assertIn("duplicate id 'r1'", failed["b.jsonl:4"])
        self.assertIn('"id" must be a non-empty string', failed["b.jsonl:5"])
        self.assertIn('"prompt" must be a non-empty string', failed["b.jsonl:6"])
        self.assertIn("bad JSONL line", failed["b.jsonl:7"])

    async def test_interrupt_resume_and_retry_errors_keep_exactly_once_with_jsonl_ids_and_several_readers(
        self,
    ) -> None:
        self.inputs.mkdir()
        rows = [{"id": f"row-{i}", "prompt": f"What is two times {i}?"} for i in range(300)]
        for part in range(3):
            lines = [json.dumps(row) + "\n" for row in rows[part * 100 : (part + 1) * 100]]
            (self.inputs / f"rows-{part}.jsonl").write_text("".join(lines))
        all_ids = sorted(row["id"] for row in rows)
        shutdown = Shutdown(grace_s=0.05)
        client = SpyClient(
            latency_s=0.002,
            on_call=lambda n: shutdown.request() if n == 90 else None,
            fail=lambda prompt, n: api_error(400) if prompt == "What is two times 7?" else None,
        )
        status, _ = await self.run_pipeline(client, shutdown=shutdown, workers=4, readers=3)
        self.assertEqual(status, 130)
        self.assertLess(len(records(self.outputs)), 299)
        status, _ = await self.run_pipeline(SpyClient(), workers=4, readers=3)  # resume: the rest, not the failure
        self.assertEqual(status, 1)
        self.assertEqual(sorted(r["id"] for r in records(self.outputs)), [i for i in all_ids if i != "row-7"])
        self.assertEqual([r["id"] for r in records(self.outputs, "errors.jsonl")], ["row-7"])
        retry = SpyClient()
        status, _ = await self.run_pipeline(retry, workers=4, readers=3, retry_errors=True)
        self.assertEqual((status, retry.prompts), (0, ["What is two times 7?"]))
        self.assertEqual(sorted(r["id"] for r in records(self.outputs)), all_ids)
        self.assertEqual(records(self.outputs, "errors.jsonl"), [])


class CostTest(PipelineTestCase):
    """--price and --max-cost, with the stub's usage metadata as the exact token counts."""

    def test_dollars_show_cents_and_below_a_cent_two_significant_digits(self) -> None:
        shown = [pipeline.dollars(usd) for usd in (1234.5, 0.1 + 0.2, 0.01 - 1e-15, 0.0042, 0.000051, 0.001, -1e-12)]
        self.assertEqual(shown, ["$1,234.50", "$0.30", "$0.01", "$0.0042", "$0.000051", "$0.0010", "$0.00"])

    async def test_the_summary_names_the_cost_to_the_cent_interactive_flex_and_batch_api(self) -> None:
        write_inputs(self.inputs, 1, 10)  # 10 answers of 100,000 input, 20,000 output, 30,000 thinking tokens
        big = lambda body, n: answer("ok", input_tokens=100_000, output_tokens=20_000, thinking=30_000)  # noqa: E731
        for tier, shown in ((None, "$7.00 at --price 2,10\n"), ("flex", "$3.50 at --price 2,10 (Flex: half the")):
            shutil.rmtree(self.outputs, ignore_errors=True)
            with self.subTest(tier=tier), scripted_client(big) as (client, _):
                status, summary = await self.run_pipeline(client, price=(2.0, 10.0), service_tier=tier)
                self.assertEqual(status, 0, self.stderr)
                self.assertIn(f"  cost: {shown}", summary)  # 1M x $2 + (200k + 300k) x $10, per 1M
        shutil.rmtree(self.outputs)
        with batch_server() as (url, _):  # each result: 10 input and 5 output tokens
            client = real_batch_client(url)
            self.addAsyncCleanup(client.aio.aclose)
            status, summary = await self.run_pipeline(client, price=(20_000.0, 100_000.0), batch_api=True,
                                                      poll_interval_s=0.01, batch_job_size=4)  # fmt: skip
        self.assertEqual(status, 0, self.stderr)
        self.assertIn("  cost: $3.50 at --price 20000,100000 (Batch API: half the given price)", summary)
        status, summary = await self.run_pipeline(SpyClient(), outputs=self.tmp / "other")
        self.assertIn("cost: give --price", summary)  # without it: a hint

    async def test_max_cost_stops_within_the_budget_and_a_rerun_without_it_answers_each_prompt_once(self) -> None:
        prompts = write_inputs(self.inputs, 2, 20)  # each answer: 1,000 input and 1,000 output tokens, $0.011
        with scripted_client(lambda body, n: answer("ok", input_tokens=1000, output_tokens=1000)) as (client, bodies):
            with contextlib.redirect_stderr(io.StringIO()):
                status, summary = await self.run_pipeline(client, workers=4, price=(1.0, 10.0), max_cost_usd=0.1,
                                                          max_output_tokens=1000)  # fmt: skip
            self.assertEqual(status, 2, summary)
            self.assertIn("the budget of $0.10 is reached", self.stderr)
            # The estimate of a call counts its prompt's characters, not the 1,000 tokens the stub bills: a
            # call starts while spent + in flight stays within the budget, so at most 4 more can land.
            self.assertLessEqual(len(bodies), 0.1 // 0.01 + 4)
            self.assertGreaterEqual(len(bodies), 8)
        status, _ = await self.run_pipeline(SpyClient(), max_output_tokens=1000)  # the same command, no --max-cost
        self.assertEqual(status, 0, self.stderr)
        self.assert_exactly_once(prompts)

    async def test_past_the_budget_jobs_already_submitted_are_still_collected(self) -> None:
        prompts = write_inputs(self.inputs, 2, 4)  # jobs of 4: each held at $0.010, each costs $0.020
        with batch_server() as (url, stub):  # (its results bill 10 input tokens, twice the estimate)
            client = real_batch_client(url)
            self.addAsyncCleanup(client.aio.aclose)
            stub.polls_to_end = 10**9  # no job ends before both are submitted: none is paid for yet

            async def end_jobs_once_both_are_created() -> None:
                await asyncio.to_thread(stub.wait_until, lambda: stub.created() == 2)
                stub.polls_to_end = 0

            async with asyncio.TaskGroup() as tg:
                tg.create_task(end_jobs_once_both_are_created())
                status, summary = await self.run_pipeline(
                    client, price=(1000.0, 1.0), max_cost_usd=0.025, batch_api=True, poll_interval_s=0.01,
                    batch_job_size=4,
                )  # fmt: skip
            self.assertEqual(stub.created(), 2)
        self.assertEqual(status, 0, self.stderr)  # looking at a job and downloading it cost nothing
        self.assertIn("cost: $0.04 of a budget of $0.03", summary)  # (the estimates fell short: see README)
        self.assert_exactly_once(prompts)


class DryRunTest(PipelineTestCase):
    async def test_a_dry_run_calls_nothing_writes_nothing_and_counts_only_what_is_left(self) -> None:
        write_inputs(self.inputs, 1, 4)
        self.assertEqual((await self.run_pipeline(SpyClient(), max_output_tokens=50))[0], 0)
        (self.inputs / "more.txt").write_text("".join(f"{'x' * 36} {i:03d}\n" for i in range(6)))  # 10 tokens each
        before = snapshot(self.outputs)
        with scripted_client(lambda body, n: answer("ok")) as (client, bodies):
            status, out = await self.run_pipeline(client, dry_run=True, price=(2.0, 10.0), max_output_tokens=50,
                                                  rpm=60)  # fmt: skip
        self.assertEqual((status, bodies), (0, []))
        self.assertEqual(snapshot(self.outputs), before)
        self.assertEqual(out.splitlines(), [
            "Dry run: 6 prompts to send, 4 skipped (done, or waiting in a recorded Batch API job); nothing was called "
            "or written",
            "  input tokens: about 60 (characters / 4); output tokens: at most 300 (--max-output-tokens)",
            "  cost: $0.0031 interactive, $0.0016 with Flex or the Batch API (half price)",  # 60 x $2 + 300 x $10
            "  the quota (--rpm, --tpm) makes it take at least 6 s (0.0 h)",
        ])  # fmt: skip

    async def test_a_dry_run_refuses_what_a_run_refuses_and_makes_no_folder(self) -> None:
        write_inputs(self.inputs, 1, 2)
        status, out = await self.run_pipeline(SpyClient(), dry_run=True)
        self.assertEqual(status, 0)
        self.assertIn("2 prompts to send, 0 skipped", out)
        self.assertFalse(self.outputs.exists())  # not even the folder, nor a lock file
        self.assertEqual((await self.run_pipeline(SpyClient()))[0], 0)
        before = snapshot(self.outputs)
        with self.assertRaisesRegex(pipeline.UsageError, "--temperature was .none. for the records"):
            await self.run_pipeline(SpyClient(), dry_run=True, temperature=0.5)
        self.assertEqual(snapshot(self.outputs), before)


class GenerationSettingsTest(PipelineTestCase):
    async def test_every_setting_reaches_the_request_body(self) -> None:
        write_inputs(self.inputs, 1, 1)
        schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
        with scripted_client(lambda body, n: answer('{"label": "pos"}')) as (client, bodies):
            status, _ = await self.run_pipeline(
                client, system_instruction="Be brief.", temperature=0.2, max_output_tokens=64, thinking_budget=0,
                json_schema=schema,
            )  # fmt: skip
        self.assertEqual(status, 0)
        [body] = bodies
        self.assertEqual(body["systemInstruction"]["parts"][0]["text"], "Be brief.")
        config = body["generationConfig"]
        self.assertEqual(config["temperature"], 0.2)
        self.assertEqual(config["maxOutputTokens"], 64)
        self.assertEqual(list(config["thinkingConfig"].values()), [0])  # either spelling of thinkingBudget
        self.assertEqual(config["responseMimeType"], "application/json")
        self.assertEqual(config["responseJsonSchema"], schema)
        [record] = records(self.outputs)
        self.assertEqual(record["response"], {"label": "pos"})  # parsed, not a string

    async def test_a_thinking_level_and_a_service_tier_reach_the_request_body(self) -> None:
        write_inputs(self.inputs, 1, 1)
        with scripted_client(lambda body, n: answer("ok")) as (client, bodies):
            status, _ = await self.run_pipeline(client, thinking_level="low", service_tier="flex")
        self.assertEqual(status, 0)
        self.assertEqual(bodies[0]["serviceTier"], "flex")
        self.assertEqual(list(bodies[0]["generationConfig"]["thinkingConfig"].values()), ["LOW"])  # either spelling

    async def test_a_value_error_raised_before_sending_is_a_bug_not_a_malformed_reply(self) -> None:
        write_inputs(self.inputs, 1, 3)
        client = SpyClient(fail=lambda prompt, n: ValueError("model is required."))
        with self.assertRaises(ExceptionGroup) as raised:
            await self.run_pipeline(client, workers=1)
        self.assertEqual(len(client.prompts), 1)  # not retried 5 times per prompt
        self.assertIn("model is required.", str(pipeline.leaf_exceptions(raised.exception)))

    async def test_a_cut_off_json_answer_is_retried_and_usage_is_counted_for_every_answer(self) -> None:
        write_inputs(self.inputs, 1, 2)

        def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, Any]]:
            if prompt_of(body).endswith("1?") and n <= 2:
                return answer('{"label": "po', input_tokens=7, output_tokens=3)  # cut off
            return answer('{"label": "neg"}', input_tokens=7, output_tokens=4, thinking=2)

        with scripted_client(respond) as (client, bodies):
            status, summary = await self.run_pipeline(client, json_schema={"type": "object"}, workers=1)
        self.assertEqual(status, 0)
        self.assertEqual(len(bodies), 3)
        self.assertEqual(
            [r["usage"] for r in records(self.outputs)],
            [{"input_tokens": 7, "output_tokens": 4, "thinking_tokens": 2}] * 2,
        )
        self.assertIn("tokens: 21 input, 11 output, 4 thinking; 3 calls, 3 answered", summary)

    async def test_a_json_answer_that_never_parses_fails_with_the_reason(self) -> None:
        write_inputs(self.inputs, 1, 1)
        with scripted_client(lambda body, n: answer("not json")) as (client, bodies):
            status, _ = await self.run_pipeline(client, json_schema={"type": "object"}, max_attempts=3)
        self.assertEqual((status, len(bodies)), (1, 3))
        [failed] = records(self.outputs, "errors.jsonl")
        self.assertEqual((failed["error"], failed["attempts"]), ("response is not valid JSON", 3))

    async def test_the_simulated_model_answers_json_and_reports_usage(self) -> None:
        write_inputs(self.inputs, 1, 1)
        schema = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}, "n": {"type": "integer"}}}
        status, _ = await self.run_pipeline(json_schema=schema)
        self.assertEqual(status, 0)
        [record] = records(self.outputs)
        self.assertEqual(record["response"], {"label": "pos", "n": 0})
        self.assertGreater(record["usage"]["input_tokens"], 0)

    async def test_tpm_paces_tokens_evenly_and_uses_most_of_the_budget(self) -> None:
        write_inputs(self.inputs, 1, 15)
        tokens_of: dict[str, int] = {}  # by prompt, as the stub counted them

        def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, Any]]:
            input_tokens = -(-len(prompt_of(body)) // 4)  # 5 or 6, as the estimate reckons
            tokens_of[prompt_of(body)] = input_tokens + 95
            return answer("x", input_tokens=input_tokens, output_tokens=95)

        sent_at: list[tuple[float, str]] = []  # when each call left the gate, and its prompt

        class Recording:  # client.aio.models.generate_content, timed as the call starts
            def __init__(self, client: Any) -> None:
                self.aio = self.models = self
                self.client = client

            async def generate_content(self, **kwargs: Any) -> types.GenerateContentResponse:
                sent_at.append((time.monotonic(), kwargs["contents"]))
                response: types.GenerateContentResponse = await self.client.aio.models.generate_content(**kwargs)
                return response

        tpm = 120_000  # 2,000 tokens a second: 15 calls of about 100 take about 0.75 s
        with scripted_client(respond) as (client, _):
            started = time.monotonic()
            status, _ = await self.run_pipeline(Recording(client), tpm=tpm, workers=10, max_output_tokens=95)
            wall_s = time.monotonic() - started
        self.assertEqual(status, 0)
        self.assertLessEqual(wall_s, 1.5 * sum(tokens_of.values()) / (tpm / 60))
        # Any 1 s window holds at most tpm / 60 tokens plus one call's worth (and 2%: a call's estimate,
        # chars / 4, is corrected only once the call returns).
        for start, _ in sent_at:
            in_window = sum(tokens_of[prompt] for t, prompt in sent_at if start <= t < start + 1.0)
            self.assertLessEqual(in_window, 1.02 * tpm / 60 + max(tokens_of.values()), sent_at)


class KeepAliveTest(PipelineTestCase):
    async def test_the_keep_alive_pool_holds_a_connection_per_worker_across_pauses(self) -> None:
        write_inputs(self.inputs, 1, 200)
        connections = itertools.count()

        class KeepAliveHandler(ScriptedHandler):
            protocol_version = "HTTP/1.1"  # keeps connections open, as the real API does

            def setup(self) -> None:
                next(connections)  # one handler per connection
                super().setup()

        def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, Any]]:
            if n % 25:
                return answer("ok")
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.05s"}]
            return 429, {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": details}}

        bodies: list[dict[str, Any]] = []
        handler = type("Handler", (KeepAliveHandler,), {"bodies": bodies, "respond": staticmethod(respond)})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        env = {
            "GEMINI_API_KEY": "k",
            "GOOGLE_API_KEY": "",
            "GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{server.server_port}",
        }
        with mock.patch.dict(os.environ, env):
            client = pipeline.make_client(offline=False, fake_latency_s=0, fake_failure_rate=0, connections=32)
        self.addAsyncCleanup(client.aio.aclose)
        status, _ = await self.run_pipeline(client, workers=32)
        self.assertEqual(status, 0)
        self.assertGreaterEqual(len(bodies), 200 + 8)  # every prompt, and the retries after 8 pauses
        self.assertLessEqual(next(connections), 32 + 4)  # with 20 kept, each pause would reopen 12


class GateTest(AsyncTestCase):
    async def test_a_smaller_usage_than_estimated_lets_a_waiting_worker_start_at_once(self) -> None:
        gate = pipeline.Gate(rpm=None, tpm=6000)  # 100 tokens a second
        await gate.wait_turn(50)  # owes 0.5 s
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = asyncio.create_task(gate.wait_turn(50))
        await asyncio.sleep(0.05)
        self.assertFalse(waiting.done())
        gate.settle(50, 5)  # the answer was short: 5 tokens, paid for 0.05 s after the start
        await asyncio.wait_for(waiting, 0.2)
        self.assertLess(loop.time() - started, 0.15)  # not the 0.5 s booked at first

    async def test_no_budget_is_saved_up_for_a_burst(self) -> None:
        gate = pipeline.Gate(rpm=None, tpm=6000)
        await gate.wait_turn(10)
        gate.settle(10, 0)  # a failed call: nothing used
        await asyncio.sleep(0.2)  # idle: 20 tokens' worth of time passes unused
        loop = asyncio.get_running_loop()
        await gate.wait_turn(10)
        started = loop.time()
        await gate.wait_turn(10)  # the one before is paid for only 0.1 s later
        self.assertGreaterEqual(loop.time() - started, 0.09)


class RequestWideErrorTest(PipelineTestCase):
    async def test_a_bad_key_stops_the_run_records_nothing_and_a_rerun_does_everything(self) -> None:
        prompts = write_inputs(self.inputs, 10, 30)
        info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        bad_key = errors.ClientError(
            400,
            {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT", "details": [info]}},
        )
        client = SpyClient(fail=lambda prompt, n: bad_key)
        status, _ = await self.run_pipeline(client, workers=5)
        self.assertEqual(status, 2)
        self.assertLessEqual(len(client.prompts), 5 + 5)  # the calls in flight, not 300
        self.assertEqual(records(self.outputs, "errors.jsonl"), [])
        [line] = [line for line in self.stderr.splitlines() if "error" in line]
        self.assertIn("API key not valid", line)
        status, _ = await self.run_pipeline(SpyClient())
        self.assertEqual(status, 0)
        self.assert_exactly_once(prompts)

    async def test_a_spent_daily_quota_stops_the_run_records_nothing_and_names_the_quota(self) -> None:
        prompts = write_inputs(self.inputs, 10, 10)
        quota = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        details = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": quota}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "40s"},
        ]
        error = {"code": 429, "message": "You exceeded your current quota.", "status": "RESOURCE_EXHAUSTED"}
        started = time.monotonic()
        with scripted_client(lambda body, n: (429, {"error": error | {"details": details}})) as (client, bodies):
            status, _ = await self.run_pipeline(client, workers=4)
        self.assertEqual(status, 2)
        self.assertLess(time.monotonic() - started, 5)  # neither retried nor paused for the 40 s
        self.assertLessEqual(len(bodies), 4)  # the calls in flight, not 100 x 5 attempts
        self.assertEqual(records(self.outputs, "errors.jsonl"), [])
        [line] = [line for line in self.stderr.splitlines() if "error" in line]
        self.assertIn(f"the daily quota for gemini-flash-latest is spent ({quota})", line)
        status, _ = await self.run_pipeline(SpyClient())  # the next day
        self.assertEqual(status, 0)
        self.assert_exactly_once(prompts)

    async def test_a_per_minute_quota_is_still_retried(self) -> None:
        write_inputs(self.inputs, 1, 2)
        minute = {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel", "quotaValue": "15"}
        details = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [minute]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.05s"},
        ]
        error = {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": details}
        with scripted_client(lambda body, n: (429, {"error": error}) if n == 1 else answer("ok")) as (client, _):
            status, summary = await self.run_pipeline(client)
        self.assertEqual(status, 0)
        self.assertIn("1 retry", summary)

    async def test_a_setting_every_call_rejects_stops_the_run_and_a_fixed_rerun_does_everything(self) -> None:
        prompts = write_inputs(self.inputs, 10, 5)
        message = "Thinking budget is not supported for this model."
        rejected = {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}

        def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, Any]]:
            return (400, rejected) if "thinkingConfig" in body.get("generationConfig", {}) else answer("ok")

        with scripted_client(respond) as (client, bodies):
            status, _ = await self.run_pipeline(client, workers=5, thinking_budget=0)
            self.assertEqual(status, 2)
            self.assertLessEqual(len(bodies), 2 * 5 + 5)  # the first 2 x workers, and those in flight
            self.assertEqual(records(self.outputs, "errors.jsonl"), [])  # left for the next run
            [line] = [line for line in self.stderr.splitlines() if "error" in line]
            self.assertIn(f"the first 10 calls all failed alike: 400 INVALID_ARGUMENT: {message}", line)
            status, _ = await self.run_pipeline(client, workers=5)  # the flag fixed: no record yet, new settings
        self.assertEqual(status, 0)
        self.assert_exactly_once(prompts)

    async def test_failures_after_a_success_are_recorded_per_prompt(self) -> None:
        prompts = write_inputs(self.inputs, 1, 30)
        client = SpyClient(fail=lambda prompt, n: api_error(400) if n > 1 else None)
        status, _ = await self.run_pipeline(client, workers=1)
        self.assertEqual(status, 1)
        self.assertEqual(len(records(self.outputs, "errors.jsonl")), 29)
        self.assert_exactly_once(prompts)

    async def test_an_unknown_model_stops_the_run(self) -> None:
        write_inputs(self.inputs, 3, 10)
        client = SpyClient(fail=lambda prompt, n: api_error(404))
        status, _ = await self.run_pipeline(client, workers=2)
        self.assertEqual(status, 2)
        self.assertLessEqual(len(client.prompts), 4)


class CommandLineTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", str(self.tmp)], check=True))
        self.env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}

    def run_script(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_forked([sys.executable, str(HERE / "pipeline.py"), *args], cwd=self.tmp, env=self.env)

    def test_config_rejects_bad_settings_naming_the_value(self) -> None:
        with self.assertRaisesRegex(ValueError, "workers must be >= 1, got 0"):
            Config(workers=0)
        with self.assertRaisesRegex(ValueError, "shard_size must be >= 1, got 0"):
            Config(shard_size=0)
        with self.assertRaisesRegex(ValueError, "rpm must be > 0, got -5"):
            Config(rpm=-5)

    def test_make_inputs_twice_gives_the_same_files(self) -> None:
        for _ in range(2):
            subprocess.run([str(HERE / "make_inputs.sh")], cwd=self.tmp, check=True, capture_output=True)
        files = sorted((self.tmp / "inputs").iterdir())
        self.assertEqual(len(files), 10)
        self.assertEqual(
            (self.tmp / "inputs" / "shard_4.txt").read_text(),
            "What is two times 12?\nWhat is two times 13?\nWhat is two times 14?\n",
        )
        subprocess.run([str(HERE / "make_inputs.sh"), "more", "2", "4"], cwd=self.tmp, check=True, capture_output=True)
        self.assertEqual((self.tmp / "more" / "shard_1.txt").read_text().splitlines()[-1], "What is two times 7?")

    def test_default_run_offline_writes_outputs_and_a_summary(self) -> None:
        subprocess.run([str(HERE / "make_inputs.sh")], cwd=self.tmp, check=True, capture_output=True)
        result = self.run_script("--fake-latency", "0.01")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("simulated model", result.stderr)
        self.assertIn("30 succeeded", result.stdout)
        self.assertEqual(len(list((self.tmp / "outputs").glob("shard_*.jsonl"))), 1)  # 2,000 to a shard, not 5

    def test_bad_input_gets_one_line_and_exit_2(self) -> None:
        (self.tmp / "empty").mkdir()
        write_inputs(self.tmp / "inputs", 1, 1)
        (self.tmp / "afile").write_text("")
        (self.tmp / "list.json").write_text("[1, 2]")
        (self.tmp / "dangling").symlink_to(self.tmp / "gone" / "outputs")
        cases = [
            (["--inputs", "nope"], "input folder not found: nope"),
            (["--inputs", "empty"], "no .txt, .jsonl or .ndjson files in the input folder: empty"),
            (["--inputs", "afile"], "input folder is a file: afile"),
            (["--workers", "two"], "argument --workers: expected an integer, got 'two'"),
            (["--temperature", "warm"], "argument --temperature: expected a number, got 'warm'"),
            (["--outputs", "afile"], "output folder is not a writable folder: afile"),
            (["--outputs", "afile/sub"], "output folder is not a writable folder: afile/sub"),
            (["--outputs", "dangling"], "output folder is not a writable folder: dangling"),
            (["--outputs", "inputs"], "the output folder is inside the input folder: inputs"),
            (["--outputs", "inputs/out"], "the output folder is inside the input folder: inputs/out"),
            (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
            (["--shard-size", "0"], "argument --shard-size: must be >= 1, got 0"),
            (["--temperature", "3"], "argument --temperature: must be 0..2, got 3"),
            (["--tpm", "0"], "argument --tpm: must be > 0, got 0"),
            (["--model", ""], "argument --model: a model name is required, got ''"),
            (["--thinking-level", "low", "--thinking-budget", "0"], "--thinking-level and --thinking-budget cannot"),
            (["--thinking-level", "max"], "argument --thinking-level: invalid choice: 'max'"),
            (["--request-timeout", "-1"], "argument --request-timeout: must be > 0, got -1"),
            (["--price", "-1"], "argument --price: must be >= 0, got -1"),
            (["--price", "abc"], "argument --price: expected a number, got 'abc'"),
            (["--price", "1"], "--price takes IN,OUT for the pipeline"),
            (["--max-cost", "5"], "--max-cost needs --price"),
            (["--system-instruction", "@missing.txt"], "--system-instruction: cannot read missing.txt"),
            (["--json-schema", "missing.json"], "--json-schema: cannot read missing.json"),
            (["--json-schema", "afile"], "--json-schema: afile is not JSON"),
            (["--json-schema", "list.json"], "--json-schema: list.json is not a JSON Schema object"),
        ]
        for args, message in cases:
            err = io.StringIO()
            with contextlib.chdir(self.tmp), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    status = pipeline.run_cli([*args, "--offline", "--quiet"])
                except SystemExit as exit_:
                    status = int(exit_.code or 0)
            self.assertEqual(status, 2, args)
            lines = [line for line in err.getvalue().splitlines() if "simulated" not in line]
            self.assertEqual(len(lines), 1, err.getvalue())
            self.assertIn(message, lines[0])
        command = [sys.executable, str(HERE / "pipeline.py"), "--inputs", "nope"]  # the real command: no traceback
        result = subprocess.run(command, cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr), (2, "pipeline.py: error: input folder not found: nope\n"))

    def test_help_shows_every_default_with_readable_metavars(self) -> None:
        assert_help_shows_defaults(self, pipeline.make_parser())

    def test_flex_waits_longer_for_an_answer_unless_told(self) -> None:
        def timeout_of(*argv: str) -> float:
            config: Config = pipeline.config_from(Config, pipeline.parse_args(list(argv)))
            return config.attempt_timeout_s

        self.assertEqual(timeout_of(), pipeline.REQUEST_TIMEOUT_S)
        self.assertEqual(timeout_of("--service-tier", "flex"), pipeline.FLEX_REQUEST_TIMEOUT_S)
        self.assertEqual(timeout_of("--service-tier", "flex", "--request-timeout", "5"), 5)

    def interrupt_then_resume(self, signum: int, *extra: str, group: bool = False) -> None:
        """Starts a run, sends signum once it is well under way (to the whole process group,
        as a terminal does, with group=True), checks the drain, then resumes: exactly once."""
        prompts = write_inputs(self.tmp / "inputs", 10, 100)
        args = ["--fake-latency", "0.02", "--workers", "20", "--shard-size", "50", *extra]
        proc = Forked(
            [sys.executable, str(HERE / "pipeline.py"), *args], cwd=self.tmp, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=group,
        )  # fmt: skip
        assert proc.stderr is not None
        for line in proc.stderr:
            if "wrote shard_2.txt" in line:
                break  # well under way
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 128 + signum, err)
        self.assertIn(f"interrupted ({signal.Signals(signum).name})", err)
        self.assertNotIn("Traceback", err)
        self.assertIn("Summary:", out)
        self.assertLess(len(records(self.tmp / "outputs")), len(prompts))  # stopped part way
        status, err = self.run_in_process("--quiet", "--workers", "20")  # the resume: in this process, no pool
        self.assertEqual(status, 0, err)
        self.assertEqual(sorted(r["prompt"] for r in records(self.tmp / "outputs")), sorted(prompts))

    def test_sigterm_drains_writes_exits_143_and_a_resume_finishes_exactly_once(self) -> None:
        self.interrupt_then_resume(signal.SIGTERM)

    def test_ctrl_c_from_a_terminal_with_word_count_drains_exits_130_and_resumes_exactly_once(self) -> None:
        # A terminal sends SIGINT to the whole process group: the pool's processes get it too.
        # (SIGINT to the parent alone takes the same path, minus the pool.)
        self.interrupt_then_resume(signal.SIGINT, "--word-count", group=True)

    def test_a_second_run_on_the_same_output_folder_is_refused_until_the_first_is_killed(self) -> None:
        prompts = write_inputs(self.tmp / "inputs", 1, 10)
        command = [sys.executable, str(HERE / "pipeline.py"), "--fake-latency", "60", "--quiet"]
        first = Forked(command, cwd=self.tmp, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(first.communicate)
        self.addCleanup(first.kill)
        wait_until_locked(self.tmp / "outputs" / pipeline.LOCK_NAME)
        started = time.monotonic()
        status, err = self.run_in_process()
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(status, 2)
        self.assertIn("pipeline.py: error: another run is using the output folder outputs", err)
        self.assertEqual(list((self.tmp / "outputs").glob("shard_*")), [])
        first.kill()  # kill -9: the OS releases the lock, and nothing stale refuses the next run
        first.communicate()
        status, err = self.run_in_process()
        self.assertEqual(status, 0, err)
        self.assertEqual(len(records(self.tmp / "outputs")), len(prompts))

    def run_in_process(self, *args: str) -> tuple[int, str]:
        """run_cli in this process, in the temp folder; returns the status and stderr."""
        err = io.StringIO()
        with contextlib.chdir(self.tmp), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = pipeline.run_cli([*args, "--offline", "--fake-latency", "0"])
            except SystemExit as exit_:
                status = int(exit_.code or 0)
        return status, err.getvalue()

    def test_vertex_ai_uses_the_real_client_and_missing_credentials_get_one_line(self) -> None:
        write_inputs(self.tmp / "inputs", 1, 3)
        no_credentials = str(self.tmp / "no-such-key.json")  # (a missing file: google.auth asks no server)
        vertex = {"GOOGLE_GENAI_USE_VERTEXAI": "true", "GEMINI_API_KEY": "", "GOOGLE_API_KEY": ""}
        vertex |= {"GOOGLE_CLOUD_LOCATION": "us-central1", "GOOGLE_APPLICATION_CREDENTIALS": no_credentials}
        for project in ("my-project", ""):  # credentials needed at the first call, or to make the client
            err = io.StringIO()
            with (
                self.subTest(project=project),
                mock.patch.dict(os.environ, vertex | {"GOOGLE_CLOUD_PROJECT": project}),
                contextlib.chdir(self.tmp),
                contextlib.redirect_stderr(err),
                contextlib.redirect_stdout(io.StringIO()),
            ):
                if project:
                    client = pipeline.make_client(offline=False, fake_latency_s=0, fake_failure_rate=0)
                    self.assertIsInstance(client, genai.Client)  # not the simulation
                    self.assertTrue(client.vertexai)
                status = pipeline.run_cli(["--quiet", "--workers", "1"])
            self.assertEqual(status, 2)
            [line] = err.getvalue().splitlines()
            self.assertIn("no-such-key.json was not found", line)
            self.assertTrue(line.startswith("pipeline.py: error: "), line)
        self.assertEqual(records(self.tmp / "outputs", "errors.jsonl"), [])

    def test_batch_api_on_vertex_ai_gets_one_line_and_exit_2_before_any_file(self) -> None:
        write_inputs(self.tmp / "inputs", 1, 3)
        vertex = {"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_API_KEY": "express-mode-key", "GEMINI_API_KEY": ""}
        for flag in ("--batch-api", "--batch-cancel"):
            err = io.StringIO()
            with mock.patch.dict(os.environ, vertex), contextlib.chdir(self.tmp), contextlib.redirect_stderr(err):
                self.assertEqual(pipeline.run_cli([flag]), 2)
            self.assertRegex(err.getvalue(), r"^pipeline\.py: error: --batch-api and --batch-cancel use the Gemini "
                             r"Developer API's Batch API; Vertex AI .*\n$")  # fmt: skip
        self.assertFalse((self.tmp / "outputs").exists())

    def test_a_folder_named_like_a_shard_gets_one_line_and_exit_2(self) -> None:
        write_inputs(self.tmp / "inputs", 1, 3)
        (self.tmp / "outputs" / "shard_00000.jsonl").mkdir(parents=True)
        status, err = self.run_in_process("--quiet")
        self.assertEqual(status, 2)
        lines = [line for line in err.splitlines() if "simulated" not in line]
        self.assertEqual(
            lines, ["pipeline.py: error: not a file, where the run keeps its records: outputs/shard_00000.jsonl"]
        )

    def test_unreadable_lines_in_shards_and_errors_jsonl_are_skipped_with_a_warning(self) -> None:
        prompts = write_inputs(self.tmp / "inputs", 1, 3)
        outputs = self.tmp / "outputs"
        outputs.mkdir()  # a folder of ours (it has the manifest) where lines went bad
        pipeline.write_manifest(outputs, {"written_by": "pipeline.py", "settings": Config().recorded()})
        good = json.dumps({"id": "shard_0.txt:1", "prompt": prompts[0], "response": "0"})
        (outputs / "shard_00000.jsonl").write_bytes(b"\xff\xfe not utf-8\n" + good.encode() + b"\n{not json\n")
        (outputs / "errors.jsonl").write_bytes(b"\xff bad\n[1, 2]\n")
        status, err = self.run_in_process()
        self.assertEqual(status, 0, err)
        self.assertIn("skipping an unreadable line", err)
        self.assertNotIn("Traceback", err)
        ids = [r["id"] for r in [json.loads(line) for line in (outputs / "shard_00001.jsonl").read_text().splitlines()]]
        self.assertEqual(sorted(ids), ["shard_0.txt:2", "shard_0.txt:3"])  # :1 was done already

    def test_quiet_leaves_only_the_summary_and_run_level_lines(self) -> None:
        write_inputs(self.tmp / "inputs", 4, 30)
        (self.tmp / "inputs" / "bad.txt").write_bytes(b"not \xff utf-8\n")
        status, err = self.run_in_process("--quiet", "--fake-failure-rate", "1", "--max-attempts", "1")
        self.assertEqual(status, 1)
        self.assertEqual([line for line in err.splitlines() if "simulated" not in line], [])
        self.assertEqual(len(records(self.tmp / "outputs", "errors.jsonl")), 121)
        _, loud = self.run_in_process("--retry-errors", "--outputs", "loud")
        self.assertGreater(len(loud.splitlines()), 120)  # without --quiet: a line per item

    def test_the_command_with_a_key_uses_the_real_client_and_never_prints_the_key(self) -> None:
        write_inputs(self.tmp / "inputs", 1, 3)
        with stub_server() as (base_url, paths):
            self.env |= {"GEMINI_API_KEY": "secret-test-key", "GOOGLE_GEMINI_BASE_URL": base_url}
            result = self.run_script("--max-attempts", "3")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(paths), 4)  # a 429, then three answers
        self.assertNotIn("simulated", result.stderr)
        self.assertNotIn("secret-test-key", result.stdout + result.stderr)
        self.assertIn("3 succeeded", result.stdout)

    def test_a_disk_error_mid_run_gets_one_line_and_exit_1(self) -> None:
        write_inputs(self.tmp / "inputs", 2, 5)
        err = io.StringIO()
        with (
            contextlib.chdir(self.tmp),
            disk_full(),
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(out := io.StringIO()),
        ):
            status = pipeline.run_cli(["--offline", "--quiet", "--fake-latency", "0"])
        self.assertEqual(status, 1)
        lines = [line for line in err.getvalue().splitlines() if "simulated" not in line]
        self.assertEqual(lines, ["pipeline.py: error: [Errno 28] No space left on device: 'outputs/shard_00000.jsonl'"])
        self.assertIn("Summary: ", out.getvalue())  # what was done, and what is left
        self.assertIn("left for the next run", out.getvalue())
        self.assertEqual([p.name for p in (self.tmp / "outputs").glob("shard_*")], [])  # no empty shard

    def test_an_output_folder_on_a_read_only_file_system_gets_one_line_and_exit_2(self) -> None:
        write_inputs(self.tmp / "inputs", 1, 3)
        with mock.patch.object(Path, "touch", side_effect=OSError(30, "Read-only file system")):
            status, err = self.run_in_process("--quiet")
        self.assertEqual(status, 2)
        lines = [line for line in err.splitlines() if "simulated" not in line]
        self.assertEqual(
            lines, ["pipeline.py: error: output folder is not a writable folder: outputs (Read-only file system)"]
        )

    def test_a_second_ctrl_c_exits_at_once(self) -> None:
        write_inputs(self.tmp / "inputs", 1, 10)
        command = [sys.executable, str(HERE / "pipeline.py"), "--fake-latency", "60", "--quiet"]
        proc = Forked(command, cwd=self.tmp, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        self.assertIn("simulated model", proc.stderr.readline())  # started; calls now in flight for 60 s
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        self.assertIn("interrupted", proc.stderr.readline())
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 130)
        self.assertLess(time.monotonic() - started, 2.0)  # not the 5 s grace, nor the 60 s calls

    def test_batch_api_kill_9_while_waiting_then_a_rerun_creates_no_job_and_ends_exactly_once(self) -> None:
        prompts = write_inputs(self.tmp / "inputs", 3, 5)
        with batch_server() as (url, stub):
            env = self.env | {"GEMINI_API_KEY": "k", "GOOGLE_GEMINI_BASE_URL": url}
            command = [sys.executable, str(HERE / "pipeline.py"), "--batch-api", "--batch-job-size", "4",
                       "--poll-interval", "0.05", "--quiet"]  # fmt: skip
            stub.polls_to_end = 10**9
            proc = Forked(command, cwd=self.tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            last_polled = lambda: any(path.endswith("/batches/4") for _, path in stub.requests)  # noqa: E731
            stub.wait_until(last_polled, timeout_s=30)  # all 4 created and recorded: the 4th is waited on
            proc.kill()
            proc.communicate()
            self.assertEqual(len(json.loads((self.tmp / "outputs" / "manifest.json").read_text())["jobs"]), 4)
            stub.polls_to_end = 0
            result = run_forked(command, cwd=self.tmp, env=env)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(stub.created(), 4)  # waited on the recorded jobs: none submitted again
        written = [r["prompt"] for r in records(self.tmp / "outputs")]
        self.assertEqual(sorted(written), sorted(prompts))  # each once
        self.assertNotIn("k", [line.strip() for line in result.stderr.splitlines()])

    def test_sigkill_at_any_moment_then_resume_gives_exactly_once(self) -> None:
        prompts = write_inputs(self.tmp / "inputs", 10, 200)
        rng = random.Random(2)
        for _ in range(2):
            args = [
                "--quiet",
                "--fake-latency",
                "0.002",
                "--fake-failure-rate",
                "0.2",
                "--workers",
                "16",
                "--shard-size",
                "7",
            ]
            proc = Forked(
                [sys.executable, str(HERE / "pipeline.py"), *args],
                cwd=self.tmp,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            outputs = self.tmp / "outputs"
            wanted = len(records(outputs)) + rng.randint(1, 300)  # kill at a random point, once under way
            deadline = time.monotonic() + 20
            while (
                time.monotonic() < deadline
                and sum(path.stat().st_size for path in outputs.glob("*.jsonl")) < wanted * 60
            ):  # about 60 bytes a record
                time.sleep(0.005)
            proc.kill()
            proc.wait()
        status, err = self.run_in_process("--quiet", "--workers", "16")
        self.assertIn(status, (0, 1), err)
        outputs = self.tmp / "outputs"
        done = [r["id"] for r in records(outputs)] + [r["id"] for r in records(outputs, "errors.jsonl")]
        self.assertEqual(len(done), len(set(done)))
        self.assertEqual(len(done), len(prompts))


if __name__ == "__main__":
    unittest.main()
