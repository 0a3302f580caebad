#!/usr/bin/env python3
"""Issue 24's scenario with SQLAlchemy, as one line of JSON.

Usage: sqlalchemy_migration.py URL DDL_URL TABLE

Through URL, 50 async tasks share SQLAlchemy's async engine at its defaults
(asyncpg, its statement cache, a pool of 5 plus 10 overflow) and 10 tasks a
psycopg engine (10 connections, psycopg's default prepare_threshold: a query
becomes a server-side statement on its 5th run). Every task reads TABLE a
few times; then DDL_URL adds a column, every task reads again; then DDL_URL
changes a column's type and every task reads again. A failed read is tried
once more, as applications do. The line counts, per engine and phase: reads,
first attempts that failed (by SQLSTATE), retries that failed, and rows whose
column count is not the table's. The caller runs it directly and through
tidepool and compares.
"""

import asyncio
import json
import sys

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

ASYNC_TASKS = 50
PSYCOPG_TASKS = 10
READS = 6


def sqlstate(e):
    """The SQLSTATE behind SQLAlchemy's wrapper (asyncpg's adapter keeps the
    driver's exception as the cause)."""
    orig = getattr(e, "orig", None)
    for err in (orig, getattr(orig, "__cause__", None)):
        code = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
        if code:
            return code
    return type(orig).__name__


async def main(url, ddl_url, table):
    base = url.split("://", 1)[1]
    engines = {
        "asyncpg": create_async_engine("postgresql+asyncpg://" + base),
        "psycopg": create_async_engine(
            "postgresql+psycopg://" + base, pool_size=PSYCOPG_TASKS, max_overflow=0
        ),
    }
    ddl = await asyncpg.connect(ddl_url)
    await ddl.execute(
        f"drop table if exists {table}; "
        f"create table {table} (id int primary key, v text); "
        f"insert into {table} select g, 'v' || g from generate_series(1, 50) g"
    )
    query = text(f"select * from {table} where id = :id")
    columns = 2
    report = {}

    async def reader(engine_name, n, phase, barrier):
        counts = report.setdefault(f"{phase} {engine_name}", {
            "reads": 0, "first_failed": {}, "retries_failed": 0, "wrong_shape": 0,
        })
        engine = engines[engine_name]
        async with engine.connect() as conn:
            # Every task holds its connection through the phase, so every
            # connection of the pool takes part.
            await barrier.wait()
            for i in range(READS):
                for attempt in range(2):
                    try:
                        rows = (await conn.execute(query, {"id": 1 + (n + i) % 50})).all()
                        counts["reads"] += 1
                        if any(len(r) != columns for r in rows):
                            counts["wrong_shape"] += 1
                        await conn.commit()
                        break
                    except DBAPIError as e:
                        await conn.rollback()
                        if attempt == 0:
                            code = sqlstate(e)
                            counts["first_failed"][code] = counts["first_failed"].get(code, 0) + 1
                        else:
                            counts["retries_failed"] += 1

    async def phase(name):
        tasks = [("asyncpg", n) for n in range(ASYNC_TASKS)]
        tasks += [("psycopg", n) for n in range(PSYCOPG_TASKS)]
        # The asyncpg engine has 15 connections for 50 tasks: tasks wait for
        # one in turn; the barrier only counts those holding one at once.
        barriers = {
            "asyncpg": asyncio.Barrier(1),
            "psycopg": asyncio.Barrier(PSYCOPG_TASKS),
        }
        await asyncio.gather(*(reader(e, n, name, barriers[e]) for e, n in tasks))

    await phase("before")
    await ddl.execute(f"alter table {table} add column extra int not null default 7")
    columns = 3
    await phase("added")
    await ddl.execute(f"alter table {table} alter column v type varchar(20)")
    await phase("retyped")
    await ddl.close()
    for e in engines.values():
        await e.dispose()
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:4]), 180))
