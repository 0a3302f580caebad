#!/usr/bin/env python3
"""psycopg 3 through tidepool (transaction mode).

Usage: psycopg_check.py URL

Every connection uses prepare_threshold=0, so psycopg prepares every
statement (named, server-side) on first use and re-uses it in later
transactions, possibly on another server connection.

Checks:
  * 16 threads, each with its own connection, mixing autocommit queries and
    explicit transactions (`with conn.transaction():`, committed and rolled
    back), all parameterised, all results compared;
  * SQL-level PREPARE / EXECUTE in each thread (extended-protocol statements);
  * pipeline mode (`with conn.pipeline():`) with several executes in flight;
  * the statement cache evicting in pipeline mode (DEALLOCATE name), with
    psycopg's bundled libpq and with the system's (PSYCOPG_IMPL=python);
  * final row counts.

Prints "psycopg: OK ..." and exits 0 on success; prints a diagnostic and
exits 1 on any error or wrong result. The whole run is bounded by
TIDEPOOL_CLIENT_TIMEOUT seconds (default 120).
"""

import os
import subprocess
import sys
import threading
import time
import traceback

import psycopg

THREADS = 16
ROUNDS = 60


class Mismatch(Exception):
    pass


class Rollback(Exception):
    pass


def expect(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, want {want!r}")


def connect(url):
    return psycopg.connect(url, prepare_threshold=0, autocommit=True, connect_timeout=10)


def worker(url, t, errors):
    try:
        with connect(url) as conn:
            for i in range(ROUNDS):
                a, b, s = t * 10_000 + i, i * 3, f"th{t}-{i}"
                # Autocommit queries.
                row = conn.execute("select %s::int + %s::int, %s::text", (a, b, s)).fetchone()
                expect(f"thread {t} round {i} sum", row, (a + b, s))
                row = conn.execute(
                    "select count(*)::int, max(g) from generate_series(1, %s::int) g", (i + 1,)
                ).fetchone()
                expect(f"thread {t} round {i} series", row, (i + 1, i + 1))

                # A committed transaction.
                with conn.transaction():
                    conn.execute(
                        "insert into pg_items (thread, round, label) values (%s, %s, %s)",
                        (t, i, s),
                    )
                    n = conn.execute(
                        "select count(*) from pg_items where thread = %s", (t,)
                    ).fetchone()[0]
                    expect(f"thread {t} round {i} rows inside transaction", n, i + 1)

                # A rolled-back transaction, every fifth round.
                if i % 5 == 0:
                    try:
                        with conn.transaction():
                            conn.execute(
                                "insert into pg_items (thread, round, label) values (%s, %s, %s)",
                                (t, 1000 + i, "gone"),
                            )
                            raise Rollback()
                    except Rollback:
                        pass
                    n = conn.execute(
                        "select count(*) from pg_items where thread = %s and round = %s",
                        (t, 1000 + i),
                    ).fetchone()[0]
                    expect(f"thread {t} round {i} rolled-back rows", n, 0)

                got = conn.execute(
                    "select label from pg_items where thread = %s and round = %s", (t, i)
                ).fetchone()
                expect(f"thread {t} round {i} committed row", got, (s,))
    except Exception as e:  # noqa: BLE001 - report anything
        errors.append((t, e, traceback.format_exc()))


def pipeline_check(url):
    with connect(url) as conn:
        for rep in range(20):
            with conn.pipeline():
                curs = []
                for k in range(10):
                    cur = conn.cursor()
                    cur.execute("select %s::int * %s::int, %s::text", (rep, k, f"p{rep}-{k}"))
                    curs.append(cur)
                ins = conn.cursor()
                ins.execute(
                    "insert into pg_pipeline (rep, k) values (%s, %s)", (rep, 0)
                )
                with conn.transaction():
                    conn.execute("insert into pg_pipeline (rep, k) values (%s, %s)", (rep, 1))
                    conn.execute("insert into pg_pipeline (rep, k) values (%s, %s)", (rep, 2))
                cnt = conn.cursor()
                cnt.execute("select count(*) from pg_pipeline where rep = %s", (rep,))
            for k, cur in enumerate(curs):
                expect(f"pipeline rep {rep} result {k}", cur.fetchone(), (rep * k, f"p{rep}-{k}"))
            expect(f"pipeline rep {rep} count", cnt.fetchone(), (3,))
        n = conn.execute("select count(*) from pg_pipeline").fetchone()[0]
        expect("pipeline total rows", n, 60)


def sql_prepare_worker(url, t, errors):
    """SQL-level PREPARE and EXECUTE, sent as extended-protocol statements
    (EXECUTE then prepared by psycopg itself): the statement follows the
    client to whichever server it gets. (No ROLLBACK here: psycopg answers
    one with DEALLOCATE ALL, which drops SQL-level statements too.)"""
    try:
        with connect(url) as conn:
            conn.execute(f"prepare sq{t}(int) as select $1 * 3 + {t}")
            for i in range(ROUNDS):
                row = conn.execute(f"execute sq{t}({i % 7})").fetchone()
                expect(f"thread {t} round {i} execute", row, ((i % 7) * 3 + t,))
                row = conn.execute("select %s::int", (i,)).fetchone()
                expect(f"thread {t} round {i} select", row, (i,))
            conn.execute(f"deallocate sq{t}")
    except Exception as e:  # noqa: BLE001 - report anything
        errors.append((t, e, traceback.format_exc()))


def sql_prepare_check(url):
    errors = []
    threads = [
        threading.Thread(target=sql_prepare_worker, args=(url, t, errors), daemon=True)
        for t in range(8)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        t, e, tb = errors[0]
        print(f"psycopg: sql prepare thread {t} failed:\n{tb}", file=sys.stderr)
        raise e


def eviction_check(url):
    """psycopg's prepared-statement cache evicting in pipeline mode. With
    libpq < 17 (PSYCOPG_IMPL=python on Debian's libpq) it sends `DEALLOCATE
    name` as an extended-protocol statement; with 17+ a protocol Close."""
    with connect(url) as conn:
        conn.prepared_max = 3
        for rep in range(4):
            with conn.pipeline():
                curs = []
                for k in range(12):
                    cur = conn.cursor()
                    cur.execute(f"select %s::int + {k}", (rep,))
                    curs.append(cur)
            for k, cur in enumerate(curs):
                expect(f"eviction rep {rep} result {k}", cur.fetchone(), (rep + k,))
        # Outside a pipeline too, and the statements re-prepared after.
        for rep in range(2):
            for k in range(12):
                row = conn.execute(f"select %s::int + {k}", (rep,)).fetchone()
                expect(f"eviction (no pipeline) rep {rep} result {k}", row, (rep + k,))


def run(url, deadline):
    with connect(url) as conn:
        # One statement per execute: prepared statements cannot hold several.
        conn.execute("drop table if exists pg_items, pg_pipeline")
        conn.execute(
            "create table pg_items (thread int, round int, label text, primary key (thread, round))"
        )
        conn.execute("create table pg_pipeline (rep int, k int)")

    errors = []
    threads = [
        threading.Thread(target=worker, args=(url, t, errors), daemon=True)
        for t in range(THREADS)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
        if th.is_alive():
            raise TimeoutError("worker threads did not finish in time")
    if errors:
        for t, e, tb in errors:
            print(f"psycopg: thread {t} failed:\n{tb}", file=sys.stderr)
        t, e, _ = errors[0]
        raise e
    print(f"psycopg: {THREADS} threads x {ROUNDS} rounds ok", flush=True)

    sql_prepare_check(url)
    print("psycopg: sql prepare ok", flush=True)

    pipeline_check(url)
    print("psycopg: pipeline ok", flush=True)

    eviction_check(url)
    # Again with the libpq psycopg finds on the system (Debian's: 15, which
    # has no protocol Close), in a process of its own (the implementation is
    # chosen at import).
    env = dict(os.environ, PSYCOPG_IMPL="python")
    out = subprocess.run(
        [sys.executable, __file__, "--evict", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=max(5.0, deadline - time.monotonic()),
    )
    if out.returncode != 0:
        raise Mismatch(f"eviction with the system libpq: {out.stderr.strip()}")
    print(f"psycopg: eviction ok ({out.stdout.strip()})", flush=True)

    with connect(url) as conn:
        row = conn.execute("select count(*), count(distinct thread) from pg_items").fetchone()
        expect("pg_items totals", row, (THREADS * ROUNDS, THREADS))
    print(f"psycopg: OK threads={THREADS} rounds={ROUNDS} pipeline=20", flush=True)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--evict":
        eviction_check(sys.argv[2])
        print(f"libpq {psycopg.pq.version()} ({psycopg.pq.__impl__})")
        return 0
    if len(sys.argv) != 2:
        print("usage: psycopg_check.py URL", file=sys.stderr)
        return 2
    timeout = float(os.environ.get("TIDEPOOL_CLIENT_TIMEOUT", "120"))
    deadline = time.monotonic() + timeout

    # Hard bound: a hung socket read cannot be interrupted from Python.
    def watchdog():
        time.sleep(timeout + 5)
        print(f"psycopg: FAILED: timed out after {timeout}s", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        run(sys.argv[1], deadline)
    except Mismatch as e:
        print(f"psycopg: FAILED: wrong result: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - report anything
        traceback.print_exc()
        print(f"psycopg: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
