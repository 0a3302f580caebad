<?php
// PHP PDO (pdo_pgsql) through tidepool with native server-side prepares
// (PDO::ATTR_EMULATE_PREPARES => false): each PDO statement is a named
// prepared statement on the connection (pdo_stmt_NNNNNNNN), deallocated with
// SQL DEALLOCATE when the statement object goes.
//
// Usage: php pdo_check.php HOST PORT DB USER PASSWORD WORKERS ITERATIONS
//
// WORKERS processes (pcntl_fork), each with its own connection, run
// ITERATIONS rounds of: a prepared SELECT by id (result checked), a prepared
// UPDATE in a transaction, a prepared INSERT; worker 0 adds a column and an
// index half way (a schema change mid-run). Finally the sums and counts are
// checked. Prints "php pdo: OK ..." and exits 0, or a diagnostic and 1.

[$_, $host, $port, $db, $user, $pass, $workers, $iterations] = $argv;
$workers = (int)$workers;
$iterations = (int)$iterations;
$dsn = "pgsql:host=$host;port=$port;dbname=$db";

function connect($dsn, $user, $pass) {
    return new PDO($dsn, $user, $pass, [
        PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
        PDO::ATTR_EMULATE_PREPARES => false,
    ]);
}

function work($dsn, $user, $pass, $w, $iterations) {
    $pdo = connect($dsn, $user, $pass);
    $select = $pdo->prepare('SELECT id, name, qty FROM items WHERE id = ?');
    $update = $pdo->prepare('UPDATE items SET qty = qty + 1 WHERE id = ?');
    $insert = $pdo->prepare('INSERT INTO events (worker, n) VALUES (?, ?)');
    for ($i = 0; $i < $iterations; $i++) {
        $id = ($w * 7 + $i) % 100 + 1;
        $select->execute([$id]);
        $row = $select->fetch(PDO::FETCH_ASSOC);
        $select->closeCursor();
        if ($row === false || (int)$row['id'] !== $id || $row['name'] !== "item$id") {
            throw new Exception("worker $w: select $id got " . json_encode($row));
        }
        $pdo->beginTransaction();
        $update->execute([$id]);
        if ($update->rowCount() !== 1) {
            throw new Exception("worker $w: update $id touched " . $update->rowCount());
        }
        $insert->execute([$w, $i]);
        $pdo->commit();
        if ($w === 0 && $i === intdiv($iterations, 2)) {
            $pdo->exec('ALTER TABLE items ADD COLUMN note text');
            $pdo->exec('CREATE INDEX items_qty ON items (qty)');
        }
        if ($i % 50 === 49) {
            // A statement that goes away (SQL DEALLOCATE) and comes back.
            $tmp = $pdo->prepare('SELECT count(*) FROM items WHERE qty >= ?');
            $tmp->execute([0]);
            if ((int)$tmp->fetchColumn() !== 100) {
                throw new Exception("worker $w: count");
            }
            $tmp = null;
        }
    }
}

try {
    $children = [];
    for ($w = 0; $w < $workers; $w++) {
        $pid = pcntl_fork();
        if ($pid === -1) {
            throw new Exception('fork failed');
        }
        if ($pid === 0) {
            try {
                work($dsn, $user, $pass, $w, $iterations);
                exit(0);
            } catch (Throwable $e) {
                fwrite(STDERR, "worker $w: " . $e->getMessage() . "\n");
                exit(1);
            }
        }
        $children[] = $pid;
    }
    $failed = 0;
    foreach ($children as $pid) {
        pcntl_waitpid($pid, $status);
        if (!pcntl_wifexited($status) || pcntl_wexitstatus($status) !== 0) {
            $failed++;
        }
    }
    if ($failed) {
        throw new Exception("$failed worker(s) failed");
    }
    $pdo = connect($dsn, $user, $pass);
    $q = $pdo->prepare('SELECT sum(qty), (SELECT count(*) FROM events) FROM items');
    $q->execute();
    [$sum, $events] = $q->fetch(PDO::FETCH_NUM);
    $want = $workers * $iterations;
    if ((int)$sum !== $want || (int)$events !== $want) {
        throw new Exception("sum(qty) $sum, events $events, want $want each");
    }
    echo "php pdo: OK $workers workers x $iterations iterations\n";
} catch (Throwable $e) {
    fwrite(STDERR, $e->getMessage() . "\n");
    exit(1);
}
