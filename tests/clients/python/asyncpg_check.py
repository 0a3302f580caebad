#!/usr/bin/env python3
"""asyncpg through tidepool (transaction mode).

Usage: asyncpg_check.py URL

Uses asyncpg's connection pool (min 5, max 20 connections) with its default
statement cache, so every query runs as a *named* prepared statement that is
re-used in later transactions, possibly on another server connection.

Checks:
  * 50 concurrent tasks x 200 parameterised fetches, every result compared;
  * executemany insert of 1,000 rows;
  * copy_records_to_table of 10,000 rows;
  * a transaction that is rolled back leaves no rows behind;
  * final row counts and sums.

Prints "asyncpg: OK ..." and exits 0 on success; prints a diagnostic and
exits 1 on any error or wrong result. The whole run is bounded by
TIDEPOOL_CLIENT_TIMEOUT seconds (default 120).
"""

import asyncio
import os
import sys
import traceback

import asyncpg

TASKS = 50
FETCHES = 200
MANY_ROWS = 1_000
COPY_ROWS = 10_000


class Mismatch(Exception):
    pass


def expect(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, want {want!r}")


async def worker(pool, task_no):
    for i in range(FETCHES):
        a = task_no * 1000 + i
        b = -i * 7
        s = f"t{task_no}-{i}"
        # Alternate between a few statements so the cache holds several.
        kind = i % 3
        if kind == 0:
            row = await pool.fetchrow("select $1::int + $2::int, $3::text", a, b, s)
            expect(f"task {task_no} fetch {i}", (row[0], row[1]), (a + b, s))
        elif kind == 1:
            row = await pool.fetchrow(
                "select $1::text || ':' || $2::int, $2::int * 2", s, a
            )
            expect(f"task {task_no} fetch {i}", (row[0], row[1]), (f"{s}:{a}", a * 2))
        else:
            val = await pool.fetchval(
                "select count(*) from generate_series(1, $1::int)", i + 1
            )
            expect(f"task {task_no} fetch {i}", val, i + 1)


async def run(url):
    pool = await asyncpg.create_pool(
        url, min_size=5, max_size=20, command_timeout=60
    )
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "drop table if exists ap_many, ap_copy, ap_rollback;"
                "create table ap_many (id int primary key, label text not null);"
                "create table ap_copy (id int primary key, label text not null, n bigint);"
                "create table ap_rollback (id int primary key)"
            )

        # 1. Concurrent parameterised fetches.
        await asyncio.gather(*(worker(pool, t) for t in range(TASKS)))
        print(f"asyncpg: {TASKS * FETCHES} concurrent fetches ok", flush=True)

        # 2. executemany.
        async with pool.acquire() as conn:
            await conn.executemany(
                "insert into ap_many (id, label) values ($1, $2)",
                [(i, f"row-{i}") for i in range(MANY_ROWS)],
            )
        print(f"asyncpg: executemany of {MANY_ROWS} rows ok", flush=True)

        # 3. COPY.
        async with pool.acquire() as conn:
            res = await conn.copy_records_to_table(
                "ap_copy",
                records=[(i, f"c{i}", i * 3) for i in range(COPY_ROWS)],
                columns=["id", "label", "n"],
            )
            expect("copy status", res, f"COPY {COPY_ROWS}")
        print(f"asyncpg: copy_records_to_table of {COPY_ROWS} rows ok", flush=True)

        # 4. Rolled-back transaction.
        class Rollback(Exception):
            pass

        async with pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.executemany(
                        "insert into ap_rollback (id) values ($1)",
                        [(i,) for i in range(10)],
                    )
                    inside = await conn.fetchval("select count(*) from ap_rollback")
                    expect("rows inside the transaction", inside, 10)
                    raise Rollback()
            except Rollback:
                pass
            # Same connection, new transaction: nothing left.
            after = await conn.fetchval("select count(*) from ap_rollback")
            expect("rows after rollback (same connection)", after, 0)
        after = await pool.fetchval("select count(*) from ap_rollback")
        expect("rows after rollback (pool)", after, 0)
        print("asyncpg: rollback ok", flush=True)

        # 5. Final counts, from fresh transactions.
        row = await pool.fetchrow(
            "select count(*), sum(id), min(label), max(id) from ap_many"
        )
        expect(
            "ap_many totals",
            tuple(row),
            (MANY_ROWS, MANY_ROWS * (MANY_ROWS - 1) // 2, "row-0", MANY_ROWS - 1),
        )
        row = await pool.fetchrow("select count(*), sum(n) from ap_copy")
        expect(
            "ap_copy totals",
            tuple(row),
            (COPY_ROWS, 3 * COPY_ROWS * (COPY_ROWS - 1) // 2),
        )
        label = await pool.fetchval("select label from ap_copy where id = $1", 4321)
        expect("ap_copy row 4321", label, "c4321")
    finally:
        await asyncio.wait_for(pool.close(), 30)
    print(
        f"asyncpg: OK fetches={TASKS * FETCHES} many={MANY_ROWS} copy={COPY_ROWS}",
        flush=True,
    )


def main():
    if len(sys.argv) != 2:
        print("usage: asyncpg_check.py URL", file=sys.stderr)
        return 2
    timeout = float(os.environ.get("TIDEPOOL_CLIENT_TIMEOUT", "120"))
    try:
        asyncio.run(asyncio.wait_for(run(sys.argv[1]), timeout))
    except asyncio.TimeoutError:
        print(f"asyncpg: FAILED: timed out after {timeout}s", file=sys.stderr)
        return 1
    except Mismatch as e:
        print(f"asyncpg: FAILED: wrong result: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - report anything
        traceback.print_exc()
        print(f"asyncpg: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
