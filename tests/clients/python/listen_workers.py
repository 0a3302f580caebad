#!/usr/bin/env python3
"""LISTEN/NOTIFY workers through tidepool (transaction mode, listen_mode shared).

Usage: listen_workers.py URL

Runs, unchanged, the two ways Python job queues wait for notifications:
  * psycopg 3: an autocommit connection runs LISTEN and iterates
    conn.notifies(); between batches of notifications it also runs
    ordinary queries;
  * asyncpg: conn.add_listener(channel, callback) on a connection that keeps
    running queries meanwhile.
Another connection (also through tidepool) sends NOTIFY and pg_notify() in
its own transactions. Each worker must receive every notification of its
channel, in order, with the payload sent and the sending backend's pid.

Prints "listen workers: OK ..." and exits 0 on success; prints a diagnostic
and exits 1 otherwise. Bounded by TIDEPOOL_CLIENT_TIMEOUT seconds.
"""

import asyncio
import os
import sys
import threading
import traceback

import asyncpg
import psycopg

N = 50
TIMEOUT = int(os.environ.get("TIDEPOOL_CLIENT_TIMEOUT", "120"))


def psycopg_worker(url):
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("LISTEN psy_jobs")
    ready = threading.Event()
    errors = []

    def send():
        try:
            ready.wait(TIMEOUT)
            with psycopg.connect(url, autocommit=True) as s:
                for i in range(N):
                    if i % 2:
                        s.execute("NOTIFY psy_jobs, '%s'" % i)
                    else:
                        with s.transaction():
                            s.execute("select pg_notify('psy_jobs', %s)", (str(i),))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=send)
    t.start()
    ready.set()
    got = []
    pids = set()
    while len(got) < N:
        # Ten at a time; between batches the worker does other work on
        # the same connection (psycopg queues what arrives meanwhile).
        for n in conn.notifies(timeout=TIMEOUT, stop_after=min(10, N - len(got))):
            assert n.channel == "psy_jobs", n
            got.append(n.payload)
            pids.add(n.pid)
        assert conn.execute("select %s::int + 1", (len(got),)).fetchone()[0] == len(got) + 1
    t.join()
    if errors:
        raise errors[0]
    want = [str(i) for i in range(N)]
    assert got == want, f"psycopg notifies(): got {got}, want {want}"
    assert all(p > 0 for p in pids), pids
    conn.execute("UNLISTEN psy_jobs")
    conn.close()
    return len(got)


async def asyncpg_worker(url):
    conn = await asyncpg.connect(url)
    got = []
    done = asyncio.Event()

    def on_notify(_conn, pid, channel, payload):
        assert channel == "apg_jobs", channel
        assert pid > 0, pid
        got.append(payload)
        if len(got) == N:
            done.set()

    await conn.add_listener("apg_jobs", on_notify)
    sender = await asyncpg.connect(url)
    for i in range(N):
        async with sender.transaction():
            await sender.execute("select pg_notify('apg_jobs', $1)", str(i))
        # The listening connection keeps being used meanwhile.
        assert await conn.fetchval("select $1::int * 2", i) == i * 2
    await asyncio.wait_for(done.wait(), TIMEOUT)
    want = [str(i) for i in range(N)]
    assert got == want, f"asyncpg add_listener: got {got}, want {want}"
    await conn.remove_listener("apg_jobs", on_notify)
    await sender.close()
    await conn.close()
    return len(got)


def main():
    url = sys.argv[1]
    a = psycopg_worker(url)
    b = asyncio.run(asyncio.wait_for(asyncpg_worker(url), TIMEOUT))
    print(f"listen workers: OK psycopg {a} notifications, asyncpg {b} notifications")


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
