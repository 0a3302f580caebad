#!/usr/bin/env node
// node-postgres named queries through tidepool (transaction mode).
//
// Usage: node named_queries.js URL
//
// A query config with a `name` makes node-postgres Parse the statement once
// per connection and afterwards send only Bind/Execute for that name, in
// whatever later transaction (and so, behind tidepool, on whatever server).
//
// 30 concurrent callers share a pg.Pool({max: 30}); each runs many
// iterations of a few distinct named queries (autocommit), plus named
// statements inside explicit transactions (committed and rolled back).
// All results are checked; final counts are checked.
//
// Prints "node-postgres: OK ..." and exits 0 on success; prints a diagnostic
// and exits 1 on any error or wrong result. Bounded by
// TIDEPOOL_CLIENT_TIMEOUT seconds (default 120).
'use strict';

const pg = require('pg');

const CALLERS = 30;
const ITERATIONS = 100;
const TX_EVERY = 10;

const timeoutSecs = Number(process.env.TIDEPOOL_CLIENT_TIMEOUT || '120');
const watchdog = setTimeout(() => {
  console.error(`node-postgres: FAILED: timed out after ${timeoutSecs}s`);
  process.exit(1);
}, timeoutSecs * 1000);

class Mismatch extends Error {}

function expect(what, got, want) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) {
    throw new Mismatch(`${what}: got ${g}, want ${w}`);
  }
}

const Q_ADD = 'select $1::int + $2::int as sum, $3::text as label';
const Q_CONCAT = "select $1::text || '/' || $2::int as joined, length($1::text) as len";
const Q_SERIES = 'select count(*)::int as n, sum(g)::int as total from generate_series(1, $1::int) g';
const Q_INSERT = 'insert into node_items (caller, iter, label) values ($1, $2, $3)';
const Q_COUNT = 'select count(*)::int as n from node_items where caller = $1';

async function caller(pool, c) {
  let committed = 0;
  for (let i = 0; i < ITERATIONS; i++) {
    const a = c * 1000 + i;
    const b = i * 11;
    const s = `c${c}-i${i}`;

    let r = await pool.query({ name: 'q_add', text: Q_ADD, values: [a, b, s] });
    expect(`caller ${c} iter ${i} q_add`, r.rows, [{ sum: a + b, label: s }]);

    r = await pool.query({ name: 'q_concat', text: Q_CONCAT, values: [s, a] });
    expect(`caller ${c} iter ${i} q_concat`, r.rows, [{ joined: `${s}/${a}`, len: s.length }]);

    const n = (i % 17) + 1;
    r = await pool.query({ name: 'q_series', text: Q_SERIES, values: [n] });
    expect(`caller ${c} iter ${i} q_series`, r.rows, [{ n, total: (n * (n + 1)) / 2 }]);

    if (i % TX_EVERY === 0) {
      const client = await pool.connect();
      let release = true;
      try {
        // Committed transaction.
        await client.query('begin');
        await client.query({ name: 'q_insert', text: Q_INSERT, values: [c, i, s] });
        r = await client.query({ name: 'q_count', text: Q_COUNT, values: [c] });
        expect(`caller ${c} iter ${i} count inside transaction`, r.rows, [{ n: committed + 1 }]);
        await client.query('commit');
        committed += 1;

        // Rolled-back transaction.
        await client.query('begin');
        await client.query({ name: 'q_insert', text: Q_INSERT, values: [c, 100000 + i, 'gone'] });
        await client.query('rollback');
        r = await client.query({ name: 'q_count', text: Q_COUNT, values: [c] });
        expect(`caller ${c} iter ${i} count after rollback`, r.rows, [{ n: committed }]);
      } catch (e) {
        release = e; // destroy the connection rather than reuse it
        throw e;
      } finally {
        client.release(release === true ? undefined : release);
      }
    }
  }
  return committed;
}

async function main(url) {
  const pool = new pg.Pool({
    connectionString: url,
    max: CALLERS,
    connectionTimeoutMillis: 30000,
    query_timeout: 60000,
  });
  pool.on('error', (e) => console.error(`node-postgres: idle client error: ${e.message}`));
  try {
    await pool.query('drop table if exists node_items');
    await pool.query(
      'create table node_items (caller int, iter int, label text, primary key (caller, iter))',
    );

    const results = await Promise.allSettled(
      Array.from({ length: CALLERS }, (_, c) => caller(pool, c)),
    );
    const failed = results
      .map((r, c) => [r, c])
      .filter(([r]) => r.status === 'rejected');
    for (const [r, c] of failed) {
      console.error(`node-postgres: caller ${c} failed: ${r.reason && r.reason.stack}`);
    }
    if (failed.length > 0) {
      throw failed[0][0].reason;
    }
    const perCaller = Math.ceil(ITERATIONS / TX_EVERY);
    for (const [c, r] of results.entries()) {
      expect(`caller ${c} committed`, r.value, perCaller);
    }
    console.log(`node-postgres: ${CALLERS} callers x ${ITERATIONS} iterations ok`);

    const r = await pool.query({
      name: 'q_totals',
      text: 'select count(*)::int as n, count(distinct caller)::int as callers from node_items',
    });
    expect('final totals', r.rows, [{ n: CALLERS * perCaller, callers: CALLERS }]);
    console.log(`node-postgres: OK callers=${CALLERS} iterations=${ITERATIONS}`);
  } finally {
    await pool.end();
  }
}

if (process.argv.length !== 3) {
  console.error('usage: node named_queries.js URL');
  process.exit(2);
}

main(process.argv[2]).then(
  () => {
    clearTimeout(watchdog);
    process.exit(0);
  },
  (e) => {
    const kind = e instanceof Mismatch ? 'wrong result' : 'error';
    const code = e && e.code ? ` (SQLSTATE ${e.code})` : '';
    console.error(`node-postgres: FAILED: ${kind}: ${e && e.message}${code}`);
    process.exit(1);
  },
);
