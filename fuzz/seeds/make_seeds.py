#!/usr/bin/env python3
"""Writes the hand-made seed inputs of each fuzz target into fuzz/corpus/<target>/.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. Seeds are named seed-*,
so they survive alongside what the fuzzer adds (and `cargo fuzz cmin` may
drop or keep them like any other input).
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def msg(tag, body=b""):
    return tag + struct.pack(">i", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


def scan_input(stream, flags=0, setup=b"", cuts=()):
    """flags | n | setup | k | cuts (u16 LE) | stream (see fuzz/src/lib.rs)."""
    out = bytes([flags, len(setup)]) + setup + bytes([len(cuts)])
    for c in cuts:
        out += struct.pack("<H", c)
    return out + stream


# --- startup_packet ---------------------------------------------------------
def startup(params, version=196608):
    body = struct.pack(">i", version)
    for k, v in params:
        body += cstr(k) + cstr(v)
    body += b"\0"
    return struct.pack(">i", len(body) + 4) + body


write("startup_packet", "psql", startup([("user", "app"), ("database", "appdb"),
                                         ("application_name", "psql"),
                                         ("client_encoding", "UTF8")]))
write("startup_packet", "options", startup([("user", "u"), ("options", "-c search_path=a -c statement_timeout=5s"),
                                            ("replication", "false")]))
write("startup_packet", "ssl", struct.pack(">ii", 8, 80877103))
write("startup_packet", "gssenc", struct.pack(">ii", 8, 80877104))
write("startup_packet", "cancel", struct.pack(">iiii", 16, 80877102, 4242, -123456))
write("startup_packet", "v2", startup([("user", "u")], version=0x00020000))
write("startup_packet", "v3_2", startup([("user", "u")], version=0x00030002))

# --- frontend_scan ----------------------------------------------------------
def parse(name, sql, types=()):
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack(">h", len(types))
               + b"".join(struct.pack(">i", t) for t in types))


def bind(portal, stmt, params=()):
    body = cstr(portal) + cstr(stmt) + struct.pack(">h", 0) + struct.pack(">h", len(params))
    for p in params:
        body += struct.pack(">i", len(p)) + p
    return msg(b"B", body + struct.pack(">h", 0))


def q(sql):
    return msg(b"Q", cstr(sql))


S = msg(b"S")
extended = (parse("", "select * from pgbench_accounts where aid = $1", [23])
            + bind("", "", [b"42"]) + msg(b"D", b"P\0") + msg(b"E", b"\0\0\0\0\0") + S)
write("frontend_scan", "simple", scan_input(q("select 1") + q("SELECT abalance FROM t WHERE aid = 1;"), cuts=(3, 14)))
write("frontend_scan", "extended", scan_input(extended, cuts=(1, 40, 41)))
write("frontend_scan", "named", scan_input(parse("s1", "select $1::int", [23]) + msg(b"D", b"Ss1\0")
                                           + bind("p1", "s1", [b"7"]) + msg(b"E", b"p1\0\0\0\0\0")
                                           + msg(b"C", b"Ss1\0") + S, flags=0x04, cuts=(20,)))
write("frontend_scan", "session", scan_input(q("SET search_path = a") + q("set app.tenant = 'x'") + q("LISTEN chan")
                                             + q("PREPARE p (int) AS select $1") + q("EXECUTE p(1)")
                                             + q("DEALLOCATE p") + q("DISCARD ALL")
                                             + q("select set_config('app.user', 'u', false)"), flags=0x08))
write("frontend_scan", "txn", scan_input(q("BEGIN") + q("insert into t values (1)") + q("COMMIT")
                                         + q("select pg_advisory_lock(1)"), setup=b"\x03", cuts=(7, 8, 9)))
write("frontend_scan", "copy", scan_input(msg(b"d", b"1\t2\n") + msg(b"d", b"3\t4\n") + msg(b"c"), flags=0x10))
write("frontend_scan", "misc", scan_input(msg(b"F", b"\0\0\0\x10\0\0\0\0\0\0") + msg(b"H") + q("") + msg(b"X")))
write("frontend_scan", "skip", scan_input(extended + extended, flags=0x40))
write("frontend_scan", "psql_d", scan_input(q(
    "SELECT n.nspname as \"Schema\", c.relname as \"Name\", CASE c.relkind WHEN 'r' THEN 'table' END as \"Type\" "
    "FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r','p','v','m','S','f','') AND n.nspname <> 'pg_catalog' "
    "AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 1,2;"), setup=b"\x01"))

# --- backend_scan -----------------------------------------------------------
def rowdesc(cols):
    body = struct.pack(">h", len(cols))
    for c in cols:
        body += cstr(c) + struct.pack(">ihihih", 0, 0, 23, 4, -1, 0)
    return msg(b"T", body)


def datarow(vals):
    body = struct.pack(">h", len(vals))
    for v in vals:
        body += struct.pack(">i", -1) if v is None else struct.pack(">i", len(v)) + v
    return msg(b"D", body)


def z(s=b"I"):
    return msg(b"Z", s)


def cc(tag):
    return msg(b"C", cstr(tag))


def err(sev, code, text):
    return msg(b"E", b"S" + cstr(sev) + b"V" + cstr(sev) + b"C" + cstr(code) + b"M" + cstr(text) + b"\0")


SYNC, UNTIL_READY, INTERNAL, SYNTH, PARSE_SWALLOW, CLOSE_SWALLOW, PARSE, BIND, EXEC, DESC_P = (
    6, 7, 8, 9, 0x40 | 0, 0x40 | 5, 0x10 | 0, 1, 4, 3)
write("backend_scan", "simple", scan_input(rowdesc(["a", "b"]) + datarow([b"1", None]) + datarow([b"2", b"x"])
                                           + cc("SELECT 2") + z(), setup=bytes([UNTIL_READY]), cuts=(10, 30)))
write("backend_scan", "extended", scan_input(msg(b"1") + msg(b"2") + rowdesc(["aid"]) + datarow([b"42"])
                                             + cc("SELECT 1") + z(),
                                             setup=bytes([PARSE, BIND, DESC_P, EXEC, SYNC]), cuts=(5, 6)))
write("backend_scan", "swallow", scan_input(msg(b"1") + msg(b"1") + msg(b"2") + msg(b"3") + cc("SELECT 0") + z(),
                                            setup=bytes([PARSE_SWALLOW, PARSE, BIND, CLOSE_SWALLOW, EXEC, SYNC])))
write("backend_scan", "synthetic", scan_input(msg(b"2") + cc("SELECT 1") + z(),
                                              setup=bytes([SYNTH, BIND, EXEC, SYNC])))
write("backend_scan", "internal", scan_input(cc("PREPARE") + z() + rowdesc(["x"]) + cc("SELECT 0") + z(b"T"),
                                             setup=bytes([INTERNAL, UNTIL_READY]), cuts=(3,)))
write("backend_scan", "error", scan_input(msg(b"1") + err("ERROR", "42601", "syntax error") + z(b"E"),
                                          setup=bytes([PARSE, BIND, EXEC, SYNC]), flags=0x01))
write("backend_scan", "status", scan_input(msg(b"S", cstr("TimeZone") + cstr("UTC"))
                                           + msg(b"N", b"SNOTICE\0C00000\0Mhi\0\0")
                                           + msg(b"A", struct.pack(">i", 7) + cstr("chan") + cstr("payload"))
                                           + cc("SET") + z(), setup=bytes([UNTIL_READY])))
write("backend_scan", "copy", scan_input(msg(b"H", b"\0\0\x01\0\0") + msg(b"d", b"1\t2\n") + msg(b"c")
                                         + cc("COPY 1") + msg(b"G", b"\0\0\0") + z(),
                                         setup=bytes([UNTIL_READY])))
write("backend_scan", "abort", scan_input(msg(b"1") + err("ERROR", "26000", "prepared statement does not exist")
                                          + z(b"E"), setup=bytes([PARSE, 10, BIND, EXEC, SYNC]), cuts=(9,)))
write("backend_scan", "fatal", scan_input(err("FATAL", "57P01", "terminating connection") + z(),
                                          setup=bytes([UNTIL_READY])))

# --- sql_effects and classify -----------------------------------------------
SQL = {
    "select": "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
    "psql_d": "SELECT n.nspname as \"Schema\", c.relname as \"Name\" FROM pg_catalog.pg_class c "
              "LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p','') "
              "AND n.nspname !~ '^pg_toast' AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 1,2;",
    "psql_dt": "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n "
               "ON n.oid = c.relnamespace WHERE c.relname OPERATOR(pg_catalog.~) '^(t)$' COLLATE pg_catalog.default "
               "AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 2, 3;",
    "set": "SET search_path = a, public; set local statement_timeout = '5s'; RESET app.tenant",
    "set_config": "select set_config('app.user', 'x', false), pg_advisory_lock(1)",
    "prepare": "PREPARE q1 (int, numeric(10,2)) AS SELECT $1, $2",
    "execute": "EXECUTE q1(1, 'a')",
    "listen": "LISTEN chan; NOTIFY chan, 'x'",
    "deallocate": "DEALLOCATE PREPARE \"Q1\"",
    "discard": "DISCARD ALL",
    "temp": "CREATE TEMP TABLE t (a int); declare c cursor with hold for select 1",
    "begin": "BEGIN READ ONLY; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; COMMIT",
    "literals": "select E'a\\'b', U&'d\\0061t', B'101', X'1F', N'x', $q$it's$q$, 1.5e-3, .5, 0x1F, 1_000 -- c\n/* x /* y */ */",
    "cte": "WITH w AS (DELETE FROM t RETURNING *) SELECT nextval('s'), * FROM w FOR UPDATE",
    "do": "do $$ begin perform 1; end $$; load 'auto_explain'",
}
for name, sql in SQL.items():
    write("sql_effects", name, sql.encode())
    write("classify", name, sql.encode())
write("classify", "template", b"select * from t where a = 1 and b = 'x'\0select * from t where a = 22 and b = 'yy'")
