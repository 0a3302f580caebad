#!/usr/bin/env node
// A LISTEN/NOTIFY worker through tidepool (transaction mode, listen_mode
// shared), written the way node-postgres documents it: client.query('LISTEN
// ...') and client.on('notification'). Another client sends NOTIFY and
// pg_notify() in its own transactions; the worker must get every one, in
// order, while it keeps running queries.
//
// Usage: node listen_worker.js URL
//
// Prints "node listen: OK ..." and exits 0 on success; prints a diagnostic
// and exits 1 otherwise. Bounded by TIDEPOOL_CLIENT_TIMEOUT seconds.
'use strict';

const pg = require('pg');

const N = 50;
const TIMEOUT = Number(process.env.TIDEPOOL_CLIENT_TIMEOUT || 120) * 1000;

async function main(url) {
  const worker = new pg.Client({ connectionString: url });
  await worker.connect();
  const got = [];
  let resolveAll;
  const all = new Promise((r) => { resolveAll = r; });
  worker.on('notification', (msg) => {
    if (msg.channel !== 'node_jobs') throw new Error(`channel ${msg.channel}`);
    if (!(msg.processId > 0)) throw new Error(`pid ${msg.processId}`);
    got.push(msg.payload);
    if (got.length === N) resolveAll();
  });
  await worker.query('LISTEN node_jobs');
  const sender = new pg.Client({ connectionString: url });
  await sender.connect();
  for (let i = 0; i < N; i++) {
    if (i % 2) {
      await sender.query(`NOTIFY node_jobs, '${i}'`);
    } else {
      await sender.query('BEGIN');
      await sender.query("select pg_notify('node_jobs', $1)", [String(i)]);
      await sender.query('COMMIT');
    }
    const r = await worker.query('select $1::int + 1 as v', [i]);
    if (r.rows[0].v !== i + 1) throw new Error(`worker query: ${JSON.stringify(r.rows)}`);
  }
  let timer;
  await Promise.race([
    all,
    new Promise((_, rej) => {
      timer = setTimeout(() => rej(new Error(`only ${got.length} of ${N} notifications`)), TIMEOUT);
    }),
  ]);
  clearTimeout(timer);
  const want = Array.from({ length: N }, (_, i) => String(i));
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    throw new Error(`got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
  await worker.query('UNLISTEN *');
  await sender.end();
  await worker.end();
  console.log(`node listen: OK ${got.length} notifications`);
}

main(process.argv[2]).catch((e) => {
  console.error(e);
  process.exit(1);
});
