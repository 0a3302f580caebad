// pgjdbc through tidepool (transaction mode).
//
// Usage: java -cp postgresql.jar:DIR JdbcCheck JDBC_URL USER PASSWORD
//
// With prepareThreshold=1 in the URL, pgjdbc switches a PreparedStatement to
// a named server-side statement (S_n) on its first execution and afterwards
// sends only Bind/Execute for it, in later transactions (autocommit: one per
// execution) and so, behind tidepool, on whatever server.
//
// Checks: 8 threads x 500 executions of parameterised PreparedStatements
// (each thread its own connection, results compared), a 1,000-row
// executeBatch insert in one transaction, a rolled-back batch, final counts.
//
// Prints "pgjdbc: OK ..." and exits 0 on success; prints a diagnostic and
// exits 1 on any error or wrong result. Bounded by TIDEPOOL_CLIENT_TIMEOUT
// seconds (default 120).

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

public final class JdbcCheck {
    private static final int THREADS = 8;
    private static final int EXECUTIONS = 500;
    private static final int BATCH_ROWS = 1000;

    private static String url;
    private static String user;
    private static String password;

    static final class Mismatch extends Exception {
        private static final long serialVersionUID = 1L;

        Mismatch(String msg) {
            super(msg);
        }
    }

    static void expect(String what, Object got, Object want) throws Mismatch {
        if (!Objects.equals(got, want)) {
            throw new Mismatch(what + ": got " + got + ", want " + want);
        }
    }

    static Connection connect() throws SQLException {
        return DriverManager.getConnection(url, user, password);
    }

    static Void worker(int t) throws Exception {
        try (Connection conn = connect();
                PreparedStatement add =
                        conn.prepareStatement("select ?::int + ?::int, ?::text, ?::bigint * 2");
                PreparedStatement series =
                        conn.prepareStatement(
                                "select count(*), coalesce(sum(g), 0) from generate_series(1, ?) g")) {
            for (int i = 0; i < EXECUTIONS; i++) {
                int a = t * 100_000 + i;
                int b = -3 * i;
                String s = "t" + t + "-" + i;
                add.setInt(1, a);
                add.setInt(2, b);
                add.setString(3, s);
                add.setLong(4, 1L << 33 | i);
                try (ResultSet rs = add.executeQuery()) {
                    expect("thread " + t + " exec " + i + " has a row", rs.next(), true);
                    expect("thread " + t + " exec " + i + " sum", rs.getInt(1), a + b);
                    expect("thread " + t + " exec " + i + " text", rs.getString(2), s);
                    expect("thread " + t + " exec " + i + " bigint", rs.getLong(3), (1L << 33 | i) * 2);
                    expect("thread " + t + " exec " + i + " one row", rs.next(), false);
                }
                int n = i % 13;
                series.setInt(1, n);
                try (ResultSet rs = series.executeQuery()) {
                    expect("thread " + t + " exec " + i + " series row", rs.next(), true);
                    expect("thread " + t + " exec " + i + " count", rs.getLong(1), (long) n);
                    expect("thread " + t + " exec " + i + " total", rs.getLong(2), (long) n * (n + 1) / 2);
                }
                if (i == 1) {
                    org.postgresql.PGStatement pgs = add.unwrap(org.postgresql.PGStatement.class);
                    expect("thread " + t + " uses a server-side prepared statement",
                            pgs.isUseServerPrepare(), true);
                }
            }
        }
        return null;
    }

    static void batchCheck() throws Exception {
        try (Connection conn = connect()) {
            try (Statement st = conn.createStatement()) {
                st.execute("drop table if exists jdbc_items");
                st.execute("create table jdbc_items (id int primary key, label text not null, n bigint)");
            }
            conn.setAutoCommit(false);
            try (PreparedStatement ins =
                    conn.prepareStatement("insert into jdbc_items (id, label, n) values (?, ?, ?)")) {
                for (int i = 0; i < BATCH_ROWS; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "row-" + i);
                    ins.setLong(3, 5L * i);
                    ins.addBatch();
                }
                int[] counts = ins.executeBatch();
                expect("batch statement count", counts.length, BATCH_ROWS);
                for (int i = 0; i < counts.length; i++) {
                    if (counts[i] != 1 && counts[i] != Statement.SUCCESS_NO_INFO) {
                        throw new Mismatch("batch entry " + i + " update count " + counts[i]);
                    }
                }
                conn.commit();

                // A batch that is rolled back leaves nothing behind.
                for (int i = 0; i < 10; i++) {
                    ins.setInt(1, BATCH_ROWS + i);
                    ins.setString(2, "gone");
                    ins.setLong(3, 0L);
                    ins.addBatch();
                }
                ins.executeBatch();
                conn.rollback();
            }
            conn.setAutoCommit(true);
        }
        try (Connection conn = connect();
                PreparedStatement q =
                        conn.prepareStatement("select count(*), sum(n), max(id) from jdbc_items where id >= ?")) {
            for (int rep = 0; rep < 3; rep++) {
                q.setInt(1, 0);
                try (ResultSet rs = q.executeQuery()) {
                    expect("count row", rs.next(), true);
                    expect("row count", rs.getLong(1), (long) BATCH_ROWS);
                    expect("sum(n)", rs.getLong(2), 5L * BATCH_ROWS * (BATCH_ROWS - 1) / 2);
                    expect("max(id)", rs.getInt(3), BATCH_ROWS - 1);
                }
            }
        }
    }

    static void run() throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(THREADS);
        List<Future<Void>> futures = new ArrayList<>();
        for (int t = 0; t < THREADS; t++) {
            final int tt = t;
            futures.add(pool.submit(() -> worker(tt)));
        }
        pool.shutdown();
        Exception first = null;
        for (int t = 0; t < THREADS; t++) {
            try {
                futures.get(t).get();
            } catch (java.util.concurrent.ExecutionException e) {
                Throwable cause = e.getCause();
                System.err.println("pgjdbc: thread " + t + " failed: " + describe(cause));
                cause.printStackTrace();
                if (first == null) {
                    first = cause instanceof Exception ? (Exception) cause : new Exception(cause);
                }
            }
        }
        if (first != null) {
            throw first;
        }
        System.out.println("pgjdbc: " + THREADS + " threads x " + EXECUTIONS + " executions ok");
        batchCheck();
        System.out.println("pgjdbc: executeBatch of " + BATCH_ROWS + " rows ok");
        System.out.println("pgjdbc: OK threads=" + THREADS + " executions=" + EXECUTIONS
                + " batch=" + BATCH_ROWS);
    }

    static String describe(Throwable e) {
        String s = e.getClass().getSimpleName() + ": " + e.getMessage();
        if (e instanceof SQLException) {
            s += " (SQLSTATE " + ((SQLException) e).getSQLState() + ")";
        }
        return s;
    }

    public static void main(String[] args) {
        if (args.length != 3) {
            System.err.println("usage: JdbcCheck JDBC_URL USER PASSWORD");
            System.exit(2);
        }
        url = args[0];
        user = args[1];
        password = args[2];
        long timeout = Long.parseLong(System.getenv().getOrDefault("TIDEPOOL_CLIENT_TIMEOUT", "120"));
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(TimeUnit.SECONDS.toMillis(timeout));
            } catch (InterruptedException e) {
                return;
            }
            System.err.println("pgjdbc: FAILED: timed out after " + timeout + "s");
            Runtime.getRuntime().halt(1);
        });
        watchdog.setDaemon(true);
        watchdog.start();
        try {
            run();
        } catch (Mismatch e) {
            System.err.println("pgjdbc: FAILED: wrong result: " + e.getMessage());
            System.exit(1);
        } catch (Exception e) {
            e.printStackTrace();
            System.err.println("pgjdbc: FAILED: " + describe(e));
            System.exit(1);
        }
        System.exit(0);
    }
}
