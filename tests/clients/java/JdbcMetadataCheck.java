// pgjdbc's statement metadata through tidepool: getMetaData() and
// getParameterMetaData() on PreparedStatements never executed (pgjdbc sends
// Parse and Describe of the statement, with no Bind), then executions, with
// pgjdbc's defaults (prepareThreshold 5: the unnamed statement first, a
// named server statement S_n from the fifth execution).
//
// Usage: java -cp postgresql.jar:DIR JdbcMetadataCheck JDBC_URL USER PASSWORD THREADS ROUNDS
//
// THREADS threads (each its own connection; more than the pool) run ROUNDS
// rounds of: prepare, describe (column names and types, parameter count and
// types, checked), execute (result checked), an update and an insert in a
// transaction. Thread 0 adds a column half way (a schema change mid-run): a
// statement described after it shows the new column. Final sums and counts
// are checked. Prints "pgjdbc metadata: OK ..." and exits 0.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ParameterMetaData;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.Statement;
import java.sql.Types;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;

public final class JdbcMetadataCheck {
    private static String url;
    private static String user;
    private static String password;
    private static final AtomicBoolean altered = new AtomicBoolean(false);

    private static void check(boolean ok, String what) {
        if (!ok) {
            throw new IllegalStateException(what);
        }
    }

    private static void work(int w, int rounds) throws Exception {
        try (Connection c = DriverManager.getConnection(url, user, password)) {
            for (int i = 0; i < rounds; i++) {
                int id = (w * 7 + i) % 100 + 1;
                boolean wasAltered = altered.get();
                // Described, never executed: `*` shows the schema of now.
                try (PreparedStatement ps = c.prepareStatement("SELECT * FROM items WHERE id = ?")) {
                    int cols = ps.getMetaData().getColumnCount();
                    check(cols == 3 || cols == 4, "columns " + cols);
                    if (wasAltered) {
                        check(cols == 4 && ps.getMetaData().getColumnName(4).equals("note"),
                                "after the schema change: " + cols + " columns");
                    }
                }
                try (PreparedStatement ps = c.prepareStatement(
                        "SELECT id, name, qty FROM items WHERE id = ? AND qty >= ?")) {
                    ResultSetMetaData md = ps.getMetaData();
                    check(md != null && md.getColumnCount() == 3, "no metadata");
                    check(md.getColumnName(1).equals("id") && md.getColumnType(1) == Types.INTEGER,
                            "column 1 " + md.getColumnName(1) + " " + md.getColumnType(1));
                    check(md.getColumnName(2).equals("name") && md.getColumnType(2) == Types.VARCHAR,
                            "column 2 " + md.getColumnName(2) + " " + md.getColumnType(2));
                    ParameterMetaData pm = ps.getParameterMetaData();
                    check(pm.getParameterCount() == 2, "parameters " + pm.getParameterCount());
                    check(pm.getParameterType(1) == Types.INTEGER, "parameter 1 type " + pm.getParameterType(1));
                    ps.setInt(1, id);
                    ps.setInt(2, 0);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "no row for " + id);
                        check(rs.getInt("id") == id && rs.getString("name").equals("item" + id),
                                "row " + rs.getInt("id") + " " + rs.getString("name"));
                    }
                }
                // A statement only ever described, never executed.
                try (PreparedStatement ps = c.prepareStatement(
                        "INSERT INTO events (worker, n) VALUES (?, ?) RETURNING worker, n")) {
                    check(ps.getParameterMetaData().getParameterCount() == 2, "insert parameters");
                    check(ps.getMetaData().getColumnCount() == 2, "insert returning columns");
                }
                c.setAutoCommit(false);
                try (PreparedStatement up = c.prepareStatement("UPDATE items SET qty = qty + 1 WHERE id = ?");
                     PreparedStatement ins = c.prepareStatement("INSERT INTO events (worker, n) VALUES (?, ?)")) {
                    up.setInt(1, id);
                    check(up.executeUpdate() == 1, "update " + id);
                    ins.setInt(1, w);
                    ins.setInt(2, i);
                    ins.executeUpdate();
                }
                c.commit();
                c.setAutoCommit(true);
                if (w == 0 && i == rounds / 2) {
                    try (Statement s = c.createStatement()) {
                        s.execute("ALTER TABLE items ADD COLUMN note text");
                    }
                    altered.set(true);
                }
            }
        }
    }

    public static void main(String[] args) throws Exception {
        url = args[0];
        user = args[1];
        password = args[2];
        int threads = Integer.parseInt(args[3]);
        int rounds = Integer.parseInt(args[4]);
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        List<Future<?>> futures = new ArrayList<>();
        for (int w = 0; w < threads; w++) {
            final int worker = w;
            futures.add(pool.submit(() -> {
                work(worker, rounds);
                return null;
            }));
        }
        try {
            for (Future<?> f : futures) {
                f.get(180, TimeUnit.SECONDS);
            }
            try (Connection c = DriverManager.getConnection(url, user, password);
                 Statement s = c.createStatement();
                 ResultSet rs = s.executeQuery("SELECT sum(qty), (SELECT count(*) FROM events) FROM items")) {
                rs.next();
                long want = (long) threads * rounds;
                check(rs.getLong(1) == want && rs.getLong(2) == want,
                        "sum(qty) " + rs.getLong(1) + ", events " + rs.getLong(2) + ", want " + want);
            }
            System.out.println("pgjdbc metadata: OK " + threads + " threads x " + rounds + " rounds");
        } catch (Exception e) {
            e.printStackTrace();
            System.exit(1);
        } finally {
            pool.shutdownNow();
        }
    }
}
