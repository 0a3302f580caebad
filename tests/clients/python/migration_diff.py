#!/usr/bin/env python3
"""What drivers see across a migration, as one line of JSON.

Usage: migration_diff.py URL ADMIN_URL TABLE

Through URL (tidepool, or PostgreSQL itself), asyncpg (statement cache) and
psycopg 3 (prepare_threshold=0: every query a server-side prepared
statement) run the same queries before and after ADMIN_URL alters TABLE
(ADD COLUMN, then ALTER COLUMN TYPE, then DROP COLUMN), then replaces a view
(a column added) and a function (another body) that both drivers also read,
inside and outside transactions, and record each outcome: the row, or the error's SQLSTATE.
The caller runs it directly and through tidepool and compares the lines.
With ADMIN_URL equal to URL, the migrations go the same way as the queries
(through tidepool, when URL is tidepool's).
"""

import asyncio
import json
import sys

import asyncpg
import psycopg

MIGRATIONS = [
    "alter table {t} add column extra int not null default 7",
    "alter table {t} alter column v type varchar(20)",
    "alter table {t} drop column extra",
    "create or replace view {t}_v as select id, 'x'::text as label, 'new'::text as tag from {t}",
    "create or replace function {t}_f(i int) returns int language sql as 'select i * 3'",
]


def outcome(fn):
    try:
        return ["ok", fn()]
    except psycopg.Error as e:
        return ["error", e.sqlstate]


async def aoutcome(coro):
    try:
        return ["ok", await coro]
    except asyncpg.PostgresError as e:
        return ["error", e.sqlstate]


async def main(url, admin_url, table):
    admin = await asyncpg.connect(admin_url)
    await admin.execute(
        f"drop table if exists {table}; "
        f"create table {table} (id int primary key, v text); "
        f"insert into {table} values (1, 'a'); "
        f"create view {table}_v as select id, 'x'::text as label from {table}; "
        f"create function {table}_f(i int) returns int language sql as 'select i * 2'"
    )
    query = f"select * from {table} where id = $1"
    pquery = f"select * from {table} where id = %s"
    a = [await asyncpg.connect(url) for _ in range(3)]
    p = [psycopg.connect(url, prepare_threshold=0, autocommit=True) for _ in range(3)]
    log = []

    others = [
        ("view", f"select * from {table}_v where id = $1", f"select * from {table}_v where id = %s"),
        ("function", f"select {table}_f($1) as f", f"select {table}_f(%s) as f"),
    ]

    async def round(label):
        for i, c in enumerate(a):
            r = await aoutcome(c.fetch(query, 1))
            log.append([label, "asyncpg", i, r[0], [dict(x) for x in r[1]] if r[0] == "ok" else r[1]])
            for what, q, _ in others:
                r = await aoutcome(c.fetch(q, 1))
                log.append([label, "asyncpg", i, what, r[0], [dict(x) for x in r[1]] if r[0] == "ok" else r[1]])
        # asyncpg inside a transaction: no retry there.
        async def in_tx():
            async with a[0].transaction():
                return await a[0].fetch(query, 1)
        r = await aoutcome(in_tx())
        log.append([label, "asyncpg-tx", 0, r[0], [dict(x) for x in r[1]] if r[0] == "ok" else r[1]])
        for i, c in enumerate(p):
            for attempt in range(2):
                r = outcome(lambda: c.execute(pquery, (1,)).fetchall())
                log.append([label, "psycopg", i, attempt, r[0], [list(x) for x in r[1]] if r[0] == "ok" else r[1]])
                for what, _, pq in others:
                    r = outcome(lambda: c.execute(pq, (1,)).fetchall())
                    log.append([label, "psycopg", i, attempt, what, r[0], [list(x) for x in r[1]] if r[0] == "ok" else r[1]])

    await round("before")
    for m in MIGRATIONS:
        await admin.execute(m.format(t=table))
        await round(" ".join(m.split()[:5]).replace("{t}", "t"))
    for c in a:
        await c.close()
    for c in p:
        c.close()
    await admin.close()
    print(json.dumps(log, default=str))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:4]), 120))
