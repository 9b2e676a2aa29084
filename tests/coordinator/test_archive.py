"""Audit archive: every lifecycle event of a multi-agent run lands in the archive exactly once
(filesystem and PostgreSQL), across an archive outage and an archiver that was not running;
Redis retention trims while the archive keeps everything; a session's messages replay.

PostgreSQL: a private server started in a temp dir with initdb/pg_ctl when the binaries exist
(as the ``postgres`` user when running as root), or ``KIKI_TEST_POSTGRES_URL``; skipped with
the reason otherwise. Never the system server on :5432.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from coordinator import AgentEventType
from coordinator.agent import Context, Message
from coordinator.archive import (REPLAY_HEADER, ArchiveStore, ArchiveUnavailable, Archiver,
                                 FileArchive, archived_events, archiving, open_store,
                                 replay_session, session_messages)
from coordinator.config import CoordinatorConfig, DeliveryConfig, PersistenceConfig
from coordinator.coordinator import MultiAgentCoordinator
from coordinator.embedded import free_port
from coordinator.envelope import AgentEvent
from coordinator.events import make_event, read_events

pytestmark = pytest.mark.anyio

SYNC = str(AgentEventType.MULTI_AGENT_SYNC)


# -- a private PostgreSQL ---------------------------------------------------------------------


def _pg_bin() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


class PrivatePostgres:
    """initdb + pg_ctl in a temp dir on a free loopback port; stop/start for outages."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="kiki-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root without runuser")
            import pwd

            entry = pwd.getpwnam("postgres")  # KeyError: no such user
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True,
                                timeout=60)
        if result.returncode:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip() or result.stdout}")

    def init(self) -> PrivatePostgres:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "-A", "trust", "--no-sync", "-E", "UTF8")
        self.start()
        return self

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "log"), "-o", options, "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class PgServer:
    def __init__(self, url: str, private: PrivatePostgres | None) -> None:
        self.url = url
        self.private = private


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e '.[postgres]')")
    url = os.environ.get("KIKI_TEST_POSTGRES_URL")
    if url:
        yield PgServer(url, None)
        return
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) and no KIKI_TEST_POSTGRES_URL")
    try:
        server = PrivatePostgres(bin_dir).init()
    except (RuntimeError, KeyError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot start a private PostgreSQL: {exc}")
    try:
        yield PgServer(server.url, server)
    finally:
        server.close()


async def _fresh_database(server_url: str) -> str:
    """A new empty database on the server; its URL."""
    import psycopg

    name = "t" + uuid.uuid4().hex[:12]
    async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
        await conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


# -- stores under test ------------------------------------------------------------------------


class Target:
    """One archive configuration and a way to list what it holds (duplicates included)."""

    def __init__(self, kind: str, persistence: PersistenceConfig,
                 pg: PgServer | None = None) -> None:
        self.kind = kind
        self.persistence = persistence
        self.pg = pg

    async def ids(self) -> list[str]:
        if self.kind == "filesystem":
            found = []
            for path in sorted(Path(self.persistence.directory or "").glob("events-*.jsonl")):
                # The archiver may be mid-append: only whole lines count.
                *whole, _partial = path.read_bytes().split(b"\n")
                found.extend(json.loads(line)["id"] for line in whole if line)
            return found
        import psycopg

        try:
            async with await psycopg.AsyncConnection.connect(
                    self.persistence.postgres_url or "") as conn:
                rows = await (await conn.execute("SELECT id FROM kiki_events")).fetchall()
        except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
            return []
        return [r[0] for r in rows]

    def outage(self) -> Any:
        return self.pg.private if self.pg is not None else None


@pytest.fixture(params=["filesystem", "postgres"])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "filesystem":
        return Target("filesystem", PersistenceConfig(storage="filesystem",
                                                      directory=str(tmp_path / "archive")))
    pg: PgServer = request.getfixturevalue("pg_server")
    url = await _fresh_database(pg.url)
    return Target("postgres", PersistenceConfig(storage="postgres", postgres_url=url), pg)


def make_config(url: str, prefix: str, node_id: str, persistence: PersistenceConfig,
                **overrides: Any) -> CoordinatorConfig:
    delivery = DeliveryConfig(heartbeat_ttl_ms=2000, block_ms=100, grace_ms=1000,
                              max_deliveries=3, backoff_base_ms=5, backoff_max_ms=20,
                              claim_interval_ms=100,
                              retention_interval_ms=overrides.pop("retention_interval_ms",
                                                                  60_000))
    return CoordinatorConfig.from_url(url, prefix=prefix, node_id=node_id, delivery=delivery,
                                      persistence=persistence, **overrides)


# -- a multi-agent run --------------------------------------------------------------------------


class Team:
    """planner -> two workers per message (via context.send); workers fail their first
    delivery now and then, and emit a tool call."""

    def __init__(self) -> None:
        self.received: list[Message] = []

    async def planner(self, message: Message, context: Context) -> None:
        self.received.append(message)
        if REPLAY_HEADER in message.headers:
            return
        for part in range(2):
            await context.send("worker", {"task": message.payload, "part": part})

    async def worker(self, message: Message, context: Context) -> None:
        self.received.append(message)
        context.emit(AgentEventType.TOOL_CALL, {"tool": "search", "args": message.payload})
        if message.payload.get("part") == 1 and message.deliveries == 1 and \
                REPLAY_HEADER not in message.headers:
            raise RuntimeError("flaky tool")


@asynccontextmanager
async def node(config: CoordinatorConfig, team: Team | None, *, archive: bool = True,
               **archiver: Any) -> AsyncIterator[MultiAgentCoordinator]:
    coordinator = MultiAgentCoordinator(config)
    if team is not None:
        coordinator.register("planner", team.planner)
        coordinator.register("worker", team.worker)
    async with archiving(coordinator, enabled=archive, **archiver), coordinator:
        yield coordinator


async def redis_events(client: MultiAgentCoordinator) -> list[AgentEvent]:
    return [e async for e in read_events(client.transport, client.keys.events(),
                                         after=b"0-0", follow=False)]


def run_finished(events: list[AgentEvent], messages: int) -> bool:
    done = Counter(e.agent_id for e in events if e.type == AgentEventType.COMPLETED)
    return done["planner"] >= messages and done["worker"] >= 2 * messages


async def converge(client: MultiAgentCoordinator, target: Target, messages: int,
                   timeout_s: float = 30, *, trimmed: bool = False
                   ) -> tuple[list[AgentEvent], list[str]]:
    """Wait until the run finished and the archive holds what Redis holds (with ``trimmed``,
    the run is judged on Redis and the archive together: retention removes events)."""

    async def seen() -> list[AgentEvent]:
        events = {e.id: e for e in await redis_events(client)}
        if trimmed:
            store = open_store(target.persistence)
            try:
                async for event in store.read():
                    events.setdefault(event.id, event)
            finally:
                await store.close()
        return list(events.values())

    with anyio.fail_after(timeout_s):
        while True:
            events = await seen()
            archived = await target.ids()
            if run_finished(events, messages) and set(archived) >= {e.id for e in events}:
                await anyio.sleep(0.3)  # late duplicates would show up now
                return await seen(), await target.ids()
            await anyio.sleep(0.1)


async def send_work(client: MultiAgentCoordinator, start: int, count: int) -> None:
    for i in range(start, start + count):
        await client.send("planner", {"n": i}, session_id=f"s{i % 3}")


def assert_exactly_once(events: list[AgentEvent], archived: list[str]) -> None:
    duplicates = [i for i, n in Counter(archived).items() if n > 1]
    assert not duplicates, f"archived twice: {duplicates[:5]}"
    assert set(archived) == {e.id for e in events}
    types = Counter(e.type for e in events)
    for kind in (AgentEventType.STARTED, AgentEventType.COMPLETED, AgentEventType.FAILED,
                 AgentEventType.MESSAGE, AgentEventType.TOOL_CALL, SYNC):
        assert types[kind], f"the run produced no {kind} event"


async def test_multi_agent_run_archived_exactly_once(real_server: Any, prefix: str,
                                                     target: Target) -> None:
    url, messages = real_server.url, 30
    config = lambda n: make_config(url, prefix, n, target.persistence)  # noqa: E731
    team = Team()
    async with node(config("n1"), team), node(config("n2"), team), \
            MultiAgentCoordinator(config("client")) as client:
        assert client.record_messages
        await send_work(client, 0, messages)
        events, archived = await converge(client, target, messages)
        dead = await client.transport.length(client.keys.event_group("archiver").dead_letters)
    assert_exactly_once(events, archived)
    assert dead == 0


async def test_archive_outage_and_stopped_archiver_lose_nothing(
        real_server: Any, prefix: str, target: Target) -> None:
    url, messages = real_server.url, 20
    config = lambda n: make_config(url, prefix, n, target.persistence)  # noqa: E731
    team = Team()
    private = target.outage()
    flaky = Flaky(open_store(target.persistence))
    async with node(config("agents"), team, archive=False), \
            MultiAgentCoordinator(config("client")) as client:
        # 1. No archiver yet: the group catches up from the start when it appears.
        await send_work(client, 0, messages)
        async with AsyncExitStack() as stack:
            archiver_node = await stack.enter_async_context(node(config("archiver1"), None,
                                                                 archive=False))
            archiver = Archiver(flaky, hold_s=0.3, retry_delay_s=0.2)
            archiver.attach(archiver_node)
            await converge(client, target, messages)
            # 2. The store goes away mid-run (PostgreSQL stopped, or the disk failing).
            if private is not None:
                await anyio.to_thread.run_sync(private.stop)
            else:
                flaky.down = True
            await send_work(client, messages, messages)
            await anyio.sleep(2.0)  # several held batches and Retry rounds (> max_deliveries)
            if private is not None:
                await anyio.to_thread.run_sync(private.start)
            flaky.down = False
            events, archived = await converge(client, target, 2 * messages)
            assert archiver.failed_writes > 0  # the outage was seen, and waited out
        # 3. The archiver stops; work goes on; a new archiver process catches up.
        await send_work(client, 2 * messages, messages)
        async with node(config("archiver2"), None):
            events, archived = await converge(client, target, 3 * messages)
        dead = await client.transport.length(client.keys.event_group("archiver").dead_letters)
    await flaky.close()
    assert_exactly_once(events, archived)
    assert dead == 0, "an outage must never dead-letter events"


class Flaky:
    """A store that is unavailable while ``down``."""

    def __init__(self, store: ArchiveStore) -> None:
        self.store = store
        self.down = False
        self.refused = 0

    async def write(self, events: list[AgentEvent]) -> int:
        if self.down:
            self.refused += 1
            raise ArchiveUnavailable("simulated outage")
        return await self.store.write(events)

    def read(self, **filters: Any) -> AsyncIterator[AgentEvent]:
        return self.store.read(**filters)

    async def close(self) -> None:
        await self.store.close()


async def test_retention_trims_redis_while_the_archive_keeps_everything(
        real_server: Any, prefix: str, target: Target, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    url, messages = real_server.url, 10
    config = lambda n: make_config(url, prefix, n, target.persistence,  # noqa: E731
                                   events_retention_ms=500, retention_interval_ms=100)
    team = Team()
    async with node(config("n1"), team), MultiAgentCoordinator(config("client")) as client:
        await send_work(client, 0, messages)
        events, archived = await converge(client, target, messages, trimmed=True)
        first_ms = min(e.created_ms for e in events)
        with anyio.fail_after(10):  # all acknowledged by the archiver, older than 500 ms
            # Events, not stream entries: an entry holds a batch of them.
            while len(await redis_events(client)) >= len(events) // 2:
                await anyio.sleep(0.1)
        assert set(await target.ids()) >= {e.id for e in events}
        # Reading from a time older than Redis retains goes to the archive first.
        seen: set[str] = set()
        old = [e async for e in archived_events(client.config, client.transport, first_ms,
                                                seen)]
        rest = [e for e in await redis_events(client) if e.id not in seen]
        assert {e.id for e in old} | {e.id for e in rest} >= {e.id for e in events}
        assert len(old) + len(rest) == len({e.id for e in old} | {e.id for e in rest})
        session = [e async for e in archived_events(client.config, client.transport,
                                                    first_ms, set(), session_id="s1")]
        assert session and all(e.session_id == "s1" for e in session)
    if target.kind == "filesystem":
        await _check_events_command(url, prefix, target, first_ms, events, tmp_path, capsys)


async def _check_events_command(url: str, prefix: str, target: Target, first_ms: int,
                                events: list[AgentEvent], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator import commands

    config_file = tmp_path / "eventbus.yaml"
    config_file.write_text(
        "eventbus:\n  persistence:\n    enabled: true\n    storage: filesystem\n"
        f"    directory: {target.persistence.directory}\n")
    capsys.readouterr()
    args = argparse.Namespace(config=str(config_file), redis_url=url, prefix=prefix,
                              since=str(first_ms), follow=False, type=None, agent=None,
                              session=None, limit=None, json=True)
    assert await commands.events(args) == 0
    printed = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == len(set(printed))
    assert set(printed) >= {e.id for e in events}


async def test_replay_resends_a_sessions_messages_marked_as_replays(
        real_server: Any, prefix: str, target: Target) -> None:
    url, messages = real_server.url, 6
    config = lambda n: make_config(url, prefix, n, target.persistence)  # noqa: E731
    team = Team()
    async with node(config("n1"), team), MultiAgentCoordinator(config("client")) as client:
        await send_work(client, 0, messages)
        await converge(client, target, messages)
        recorded = await session_messages(client.config, client.transport, "s1")
        originals = {e.message_id: e for e in recorded}
        sent_to = Counter(e.data["target"] for e in recorded)
        assert sent_to == {"planner": 2, "worker": 4}  # n = 1, 4; two parts each
        team.received.clear()
        replayed = await replay_session(client, recorded)
        assert len(replayed) == 6
        with anyio.fail_after(10):
            while len([m for m in team.received if REPLAY_HEADER in m.headers]) < 6:
                await anyio.sleep(0.05)
        replays = [m for m in team.received if REPLAY_HEADER in m.headers]
        for message in replays:
            original = originals[message.headers[REPLAY_HEADER]]
            assert message.session_id == "s1"
            assert message.payload == original.data["payload"]
            assert message.sender == original.data["sender"]
        # --to: only what was sent to that agent; replays are not replayed again
        again = await replay_session(client, await session_messages(
            client.config, client.transport, "s1"), to="worker", dry_run=True)
        assert [r.target for r in again] == ["worker"] * 4
        assert {r.original_id for r in again} <= set(originals)


# -- the stores alone ---------------------------------------------------------------------------


async def test_file_archive_is_idempotent_across_restarts_and_torn_lines(
        tmp_path: Path) -> None:
    events = [make_event("agent:started", "a", "n", None, {"i": i}) for i in range(5)]
    store = FileArchive(tmp_path)
    assert await store.write(events) == 5
    assert await store.write(events[:3]) == 0  # redelivered
    (path,) = [p for _, p in store.day_files()]
    with open(path, "ab") as file:  # a crash mid-append
        file.write(b'{"id": "torn", "type": "agent:sta')
    restarted = FileArchive(tmp_path)  # index rebuilt from the file
    more = [make_event("agent:completed", "a", "n", None) for _ in range(2)]
    assert await restarted.write(events + more) == 2
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line)["id"] != "torn" for line in lines)
    read = [e async for e in restarted.read()]
    assert [e.id for e in read] == [e.id for e in events + more]
    assert read[0].data == {"i": 0} and read[0].agent_id == "a"


async def test_postgres_archive_is_idempotent(pg_server: PgServer) -> None:
    url = await _fresh_database(pg_server.url)
    store = open_store(PersistenceConfig(storage="postgres", postgres_url=url))
    try:
        events = [make_event("agent:message", "a", "n", None, {"text": "x\x00y", "i": i})
                  for i in range(50)]
        assert await store.write(events) == 50
        assert await store.write(events[10:20]) == 0
        read = [e async for e in store.read(types=["agent:message"])]
        assert sorted(e.id for e in read) == sorted(e.id for e in events)
        assert {e.created_ms for e in read} == {e.created_ms for e in events}
    finally:
        await store.close()


async def test_postgres_unreachable_is_an_outage_not_a_failure() -> None:
    pytest.importorskip("psycopg")
    store = open_store(PersistenceConfig(
        storage="postgres", postgres_url=f"postgresql://nobody@127.0.0.1:{free_port()}/x"))
    with pytest.raises(ArchiveUnavailable):
        await store.write([make_event("agent:started", "a", "n", None)])
    await store.close()



async def test_replay_and_archive_commands(real_server: Any, prefix: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator import commands
    from coordinator.errors import ConfigError

    directory = tmp_path / "archive"
    config_file = tmp_path / "eventbus.yaml"
    config_file.write_text(
        "eventbus:\n  persistence:\n    enabled: true\n    storage: filesystem\n"
        f"    directory: {directory}\n")
    persistence = PersistenceConfig(storage="filesystem", directory=str(directory))
    target = Target("filesystem", persistence)
    team = Team()
    async with node(make_config(real_server.url, prefix, "n1", persistence), team), \
            MultiAgentCoordinator(make_config(real_server.url, prefix, "c",
                                              persistence)) as client:
        await send_work(client, 0, 3)
        await converge(client, target, 3)
        team.received.clear()
        capsys.readouterr()
        args = argparse.Namespace(config=str(config_file), redis_url=real_server.url,
                                  prefix=prefix, session="s2", to="planner", dry_run=False,
                                  json=True)
        assert await commands.replay(args) == 0
        (done,) = json.loads(capsys.readouterr().out)
        assert done["target"] == "planner" and done["message_id"]
        with anyio.fail_after(10):
            while not team.received:
                await anyio.sleep(0.05)
        assert team.received[0].headers[REPLAY_HEADER] == done["original_id"]
        assert team.received[0].payload == {"n": 2}
    redis_only = tmp_path / "redis.yaml"
    redis_only.write_text("eventbus:\n  persistence:\n    storage: redis\n")
    with pytest.raises(ConfigError, match="nothing to archive"):
        await commands.archive(argparse.Namespace(config=str(redis_only),
                                                  redis_url=real_server.url, prefix=prefix,
                                                  node_id=None))
