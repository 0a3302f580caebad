#!/usr/bin/env python3
"""asyncpg's prepared statements survive a migration (issue 24's report).

Usage: asyncpg_heal.py URL DIRECT_URL

Through URL (tidepool, or PostgreSQL itself for comparison), five
connections fetch with asyncpg's statement cache (named server-side
statements); then DIRECT_URL adds a column. asyncpg re-prepares after
PostgreSQL's `cached plan must not change result type`, so every next fetch
must return the new row, on every connection, and on a new one.

Prints "asyncpg heal: OK" and exits 0 on success; a diagnostic and exit 1
otherwise. Bounded by TIDEPOOL_CLIENT_TIMEOUT seconds (default 120).
"""

import asyncio
import os
import sys
import traceback

import asyncpg

QUERY = "select * from heal where id = $1"


async def main(url, direct_url):
    setup = await asyncpg.connect(direct_url)
    await setup.execute(
        "drop table if exists heal; "
        "create table heal (id int primary key, v text); "
        "insert into heal values (1, 'a')"
    )
    conns = [await asyncpg.connect(url) for _ in range(5)]
    for _ in range(3):
        for c in conns:
            rows = await c.fetch(QUERY, 1)
            assert dict(rows[0]) == {"id": 1, "v": "a"}, dict(rows[0])
    await setup.execute("alter table heal add column extra int not null default 7")
    want = {"id": 1, "v": "a", "extra": 7}
    for _ in range(3):
        for i, c in enumerate(conns):
            rows = await c.fetch(QUERY, 1)
            assert dict(rows[0]) == want, (i, dict(rows[0]))
    late = await asyncpg.connect(url)
    rows = await late.fetch(QUERY, 1)
    assert dict(rows[0]) == want, dict(rows[0])
    for c in conns + [late, setup]:
        await c.close()
    print("asyncpg heal: OK")


if __name__ == "__main__":
    timeout = float(os.environ.get("TIDEPOOL_CLIENT_TIMEOUT", "120"))
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), timeout))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
