"""Bounded JetStream buckets: a full data store refuses an upload with 507, and keeps nothing.

Each test runs its own embedded ``nats-server`` (127.0.0.1, with credentials)
and opens :class:`fdrtd_server.bus.Bus` on it directly, with limits small
enough to fill in a moment.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from nats.js import api as js_api

from fdrtd_server._embedded_nats import EmbeddedNats, find_nats_server, free_port
from fdrtd_server.bus import (
    CHUNK_SIZE,
    DATA_BUCKET,
    MIN_STORE_BYTES,
    Bus,
    InsufficientStorage,
    JobRecord,
    StoreLimits,
    new_handle,
)
from fdrtd_server.errors import PayloadTooLarge, ServiceUnavailable

MiB = 1024 * 1024
SMALL = StoreLimits.of_total(64 * MiB, explicit=True)  # data: 40 MiB
DEADLINE = 60.0


async def body(total: int, piece: int = 256 * 1024) -> AsyncIterator[bytes]:
    """``total`` bytes in pieces, as an HTTP body arrives."""
    sent = 0
    while sent < total:
        size = min(piece, total - sent)
        yield b"\x5a" * size
        sent += size


async def stream_config(bus: Bus, stream: str) -> Any:
    return await bus.js.stream_info(stream)


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(DEADLINE):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def embedded(tmp_path: Path) -> Any:
    with EmbeddedNats(tmp_path / "jetstream") as running:
        yield running


def test_every_bucket_is_created_bounded(embedded: EmbeddedNats) -> None:
    async def check() -> dict[str, int]:
        bus = await Bus.connect(embedded.url, limits=SMALL)
        try:
            found = {}
            for stream in ("OBJ_fdrtd_data", "OBJ_fdrtd_results"):
                info = await stream_config(bus, stream)
                assert info.config.discard == js_api.DiscardPolicy.NEW
                found[stream] = info.config.max_bytes
            for stream in ("KV_fdrtd_sets", "KV_fdrtd_jobs", "KV_fdrtd_sessions"):
                info = await stream_config(bus, stream)
                assert info.config.discard == js_api.DiscardPolicy.NEW
                found[stream] = info.config.max_bytes
            return found
        finally:
            await bus.close()

    found = run(check())
    assert found == {
        "OBJ_fdrtd_data": SMALL.data,
        "OBJ_fdrtd_results": SMALL.results,
        "KV_fdrtd_sets": SMALL.records,
        "KV_fdrtd_jobs": SMALL.jobs,
        "KV_fdrtd_sessions": SMALL.records,
    }


def test_a_full_data_store_refuses_with_507_and_keeps_nothing(embedded: EmbeddedNats) -> None:
    async def fill() -> None:
        bus = await Bus.connect(embedded.url, limits=SMALL)
        try:
            kept = new_handle("data")
            assert await bus.put_stream(kept, body(8 * MiB), limit=1 << 40) == 8 * MiB
            before = (await stream_config(bus, f"OBJ_{DATA_BUCKET}")).state.bytes
            with pytest.raises(InsufficientStorage) as caught:
                await bus.put_stream(new_handle("data"), body(64 * MiB), limit=1 << 40)
            assert caught.value.status == 507
            assert "max_store_bytes" in caught.value.message
            after = (await stream_config(bus, f"OBJ_{DATA_BUCKET}")).state.bytes
            assert after == before  # the refused upload's chunks are purged
            # the store still serves what it holds, and takes what fits
            assert len(await bus.read_object(kept)) == 8 * MiB
            assert await bus.put_stream(new_handle("data"), body(CHUNK_SIZE + 1), 1 << 40) > 0
            # a whole-object write is refused the same way
            with pytest.raises(InsufficientStorage):
                await bus.put_object(new_handle("data"), b"\0" * (48 * MiB))
        finally:
            await bus.close()

    run(fill())


def test_the_upload_limit_still_answers_413(embedded: EmbeddedNats) -> None:
    async def too_large() -> None:
        bus = await Bus.connect(embedded.url, limits=SMALL)
        try:
            with pytest.raises(PayloadTooLarge):
                await bus.put_stream(new_handle("data"), body(3 * MiB), limit=2 * MiB)
            assert (await stream_config(bus, f"OBJ_{DATA_BUCKET}")).state.bytes == 0
        finally:
            await bus.close()

    run(too_large())


def test_a_full_results_store_is_insufficient_storage(embedded: EmbeddedNats) -> None:
    tiny = StoreLimits(data=8 * MiB, results=1 * MiB, jobs=1 * MiB, records=1 * MiB)

    async def fill() -> None:
        bus = await Bus.connect(embedded.url, limits=tiny)
        try:
            record = JobRecord(owner="a", microservice="m", function="f", status="done")
            record.result = b"\1" * (2 * MiB)  # too large for the job's entry and the store
            with pytest.raises(InsufficientStorage):
                await bus.put_job(new_handle("result"), record)
        finally:
            await bus.close()

    run(fill())


def test_an_unbounded_bucket_of_an_earlier_version_gets_bounded(embedded: EmbeddedNats) -> None:
    async def legacy() -> tuple[int, int]:
        nc = await nats.connect(embedded.url)
        js = nc.jetstream()
        await js.create_object_store(
            DATA_BUCKET,
            config=js_api.ObjectStoreConfig(bucket=DATA_BUCKET, storage=js_api.StorageType.FILE),
        )
        unbounded = (await js.stream_info(f"OBJ_{DATA_BUCKET}")).config.max_bytes or 0
        await nc.close()
        # derived (not explicit) limits bound a bucket that has no bound ...
        derived = StoreLimits.of_total(64 * MiB)
        bus = await Bus.connect(embedded.url, limits=derived)
        bounded = (await stream_config(bus, f"OBJ_{DATA_BUCKET}")).config.max_bytes
        await bus.close()
        # ... but never change one that has
        bus = await Bus.connect(embedded.url, limits=StoreLimits.of_total(128 * MiB))
        kept = (await stream_config(bus, f"OBJ_{DATA_BUCKET}")).config.max_bytes
        await bus.close()
        assert kept == bounded
        return unbounded, bounded

    unbounded, bounded = run(legacy())
    assert unbounded == -1
    assert bounded == StoreLimits.of_total(64 * MiB).data


def test_a_bound_jetstream_cannot_reserve_is_reduced_until_it_fits(
    embedded: EmbeddedNats,
) -> None:
    async def huge() -> int:
        # far more than the disk: JetStream refuses to reserve it (err_code 10047)
        bus = await Bus.connect(embedded.url, limits=StoreLimits.of_total(1 << 62))
        try:
            size: int = (await stream_config(bus, f"OBJ_{DATA_BUCKET}")).config.max_bytes
            return size
        finally:
            await bus.close()

    size = run(huge())
    assert 0 < size < 1 << 62


def test_a_connection_without_credentials_is_a_clear_503(embedded: EmbeddedNats) -> None:
    password = embedded.url.split(":")[2].split("@")[0]

    async def refused() -> None:
        with pytest.raises(ServiceUnavailable) as caught:
            await Bus.connect(embedded.address)
        assert "authorization" in caught.value.message
        wrong = embedded.url.replace(password, password[::-1])
        with pytest.raises(ServiceUnavailable) as caught:
            await Bus.connect(wrong)
        assert password[::-1] not in caught.value.message
        assert password not in caught.value.message

    run(refused())


@pytest.mark.slow
def test_an_upload_into_a_full_store_answers_507_over_http(tmp_path: Path) -> None:
    """Through the real controller: the store's bound follows from ``max_upload_bytes``."""
    from fdrtd_client.errors import ServerError
    from fdrtd_server.local import LocalFederation

    upload_limit = 128 * MiB  # -> a 1 GiB store (the minimum), 640 MiB for datasets
    data_bytes = StoreLimits.of_total(max(8 * upload_limit, MIN_STORE_BYTES)).data
    env = {"FDRTD_MAX_UPLOAD_BYTES": str(upload_limit)}
    with LocalFederation(tmp_path, names=("full",), env=env) as federation:
        server = federation.servers["full"]
        client = server.client(timeout=60)
        piece = np.zeros((120 * MiB) // 8)
        stored = 0
        with pytest.raises(ServerError) as caught:
            for _ in range(data_bytes // piece.nbytes + 1):
                client.upload(piece)
                stored += piece.nbytes
        assert stored <= data_bytes < stored + piece.nbytes
        assert caught.value.status == 507
        assert "storage" in caught.value.detail and "full" in caught.value.detail
        # the server is still healthy, and small uploads still fit
        assert len(str(client.upload(np.arange(10.0)))) > 0


@pytest.fixture
def small_jetstream(tmp_path: Path) -> Iterator[str]:
    """A standalone nats-server whose JetStream may reserve 64 MiB in all (a small disk)."""
    port = free_port()
    config = tmp_path / "small.conf"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}", max_file_store: 64MB }}\n'
    )
    process = subprocess.Popen(
        [find_nats_server(), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"

    async def ready() -> None:
        for _ in range(200):
            try:
                nc = await nats.connect(url, max_reconnect_attempts=0, connect_timeout=1)
            except Exception:
                await asyncio.sleep(0.05)
                continue
            await nc.close()
            return
        raise AssertionError("the nats-server did not start")

    try:
        run(ready())
        yield url
    finally:
        process.kill()
        process.wait(timeout=15)


def test_derived_limits_beyond_what_jetstream_reserves_are_shared_out(
    small_jetstream: str,
) -> None:
    """64 GiB derived for a JetStream that reserves 64 MiB: every bucket gets its part.

    Halving one bucket at a time, in turn, let the datasets take nearly all of
    it, and a record bucket found no room at all: the server could not start.
    """

    async def share() -> dict[str, int]:
        bus = await Bus.connect(small_jetstream, limits=StoreLimits.of_total(64 * 1024 * MiB))
        try:
            return {
                info.config.name: int(info.config.max_bytes or 0)
                for info in await bus.js.streams_info()
            }
        finally:
            await bus.close()

    bounds = run(share())
    assert len(bounds) == 9, bounds  # seven buckets, the versions and the privacy budgets
    assert all(bound >= MiB for bound in bounds.values()), bounds
    assert sum(bounds.values()) <= 64 * MiB
    assert bounds[f"OBJ_{DATA_BUCKET}"] == max(bounds.values())
