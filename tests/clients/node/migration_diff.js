#!/usr/bin/env node
// What node-postgres named queries see across a migration, as one line of
// JSON.
//
// Usage: node migration_diff.js URL DDL_URL TABLE
//
// Three connections through URL run the named query `by_id` (prepared once
// per connection, then only bound and executed) twice per round, and once
// inside a transaction, before and after DDL_URL alters TABLE (ADD COLUMN,
// ALTER COLUMN TYPE, DROP COLUMN); each outcome is recorded: the column
// count and rows, or the error's SQLSTATE. The caller runs it directly and
// through tidepool and compares the lines.
'use strict';

const pg = require('pg');

const [url, ddlUrl, table] = process.argv.slice(2);
const MIGRATIONS = [
  `alter table ${table} add column extra int not null default 7`,
  `alter table ${table} alter column v type varchar(20)`,
  `alter table ${table} drop column extra`,
];

async function outcome(promise) {
  try {
    const r = await promise;
    return ['ok', r.fields.length, r.rows];
  } catch (e) {
    return ['error', e.code || String(e)];
  }
}

async function main() {
  const ddl = new pg.Client({ connectionString: ddlUrl });
  await ddl.connect();
  await ddl.query(`drop table if exists ${table}`);
  await ddl.query(`create table ${table} (id int primary key, v text)`);
  await ddl.query(`insert into ${table} values (1, 'a')`);
  const clients = [];
  for (let i = 0; i < 3; i++) {
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    clients.push(c);
  }
  const query = { name: 'by_id', text: `select * from ${table} where id = $1`, values: [1] };
  const log = [];
  const round = async (label) => {
    for (const [i, c] of clients.entries()) {
      for (let attempt = 0; attempt < 2; attempt++) {
        log.push([label, i, attempt, await outcome(c.query(query))]);
      }
      await c.query('begin');
      log.push([label, i, 'tx', await outcome(c.query(query))]);
      await c.query('rollback');
    }
  };
  await round('before');
  for (const m of MIGRATIONS) {
    await ddl.query(m);
    await round(m.split(' ').slice(3, 5).join(' '));
  }
  for (const c of clients) await c.end();
  await ddl.end();
  console.log(JSON.stringify(log));
}

const timeout = Number(process.env.TIDEPOOL_CLIENT_TIMEOUT || 120) * 1000;
setTimeout(() => {
  console.error('migration_diff.js: timed out');
  process.exit(1);
}, timeout).unref();
main().catch((e) => {
  console.error(e);
  process.exit(1);
});
