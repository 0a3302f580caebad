// What pgjdbc's server-side prepared statements see across a migration, as
// one line of JSON.
//
// Usage: java -cp postgresql.jar:DIR MigrationDiff JDBC_URL DDL_JDBC_URL USER PASSWORD TABLE
//
// With prepareThreshold=1 in the URLs, three connections each run one
// PreparedStatement (a named server-side statement from its first run)
// twice per round, and once inside a transaction, before and after
// DDL_JDBC_URL alters TABLE (ADD COLUMN, ALTER COLUMN TYPE, DROP COLUMN);
// each outcome is recorded: the column count and the row, or the error's
// SQLSTATE. The caller runs it directly and through tidepool and compares.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;

public final class MigrationDiff {
    public static void main(String[] args) throws Exception {
        String url = args[0], ddlUrl = args[1], user = args[2], password = args[3], table = args[4];
        String[] migrations = {
            "alter table " + table + " add column extra int not null default 7",
            "alter table " + table + " alter column v type varchar(20)",
            "alter table " + table + " drop column extra",
        };
        try (Connection ddl = DriverManager.getConnection(ddlUrl, user, password)) {
            try (Statement s = ddl.createStatement()) {
                s.execute("drop table if exists " + table);
                s.execute("create table " + table + " (id int primary key, v text)");
                s.execute("insert into " + table + " values (1, 'a')");
            }
            List<Connection> conns = new ArrayList<>();
            List<PreparedStatement> stmts = new ArrayList<>();
            for (int i = 0; i < 3; i++) {
                Connection c = DriverManager.getConnection(url, user, password);
                conns.add(c);
                stmts.add(c.prepareStatement("select * from " + table + " where id = ?"));
            }
            StringBuilder out = new StringBuilder("[");
            round(out, "before", conns, stmts);
            for (String m : migrations) {
                try (Statement s = ddl.createStatement()) {
                    s.execute(m);
                }
                String[] w = m.split(" ");
                round(out, w[3] + " " + w[4], conns, stmts);
            }
            out.append("]");
            for (Connection c : conns) {
                c.close();
            }
            System.out.println(out);
        }
    }

    private static void round(StringBuilder out, String label, List<Connection> conns,
            List<PreparedStatement> stmts) throws SQLException {
        for (int i = 0; i < conns.size(); i++) {
            for (int attempt = 0; attempt < 2; attempt++) {
                entry(out, label, i, String.valueOf(attempt), stmts.get(i));
            }
            Connection c = conns.get(i);
            c.setAutoCommit(false);
            entry(out, label, i, "tx", stmts.get(i));
            c.rollback();
            c.setAutoCommit(true);
        }
    }

    private static void entry(StringBuilder out, String label, int i, String attempt,
            PreparedStatement ps) {
        if (out.length() > 1) {
            out.append(",");
        }
        out.append("[\"").append(label).append("\",").append(i).append(",\"").append(attempt)
            .append("\",");
        try {
            ps.setInt(1, 1);
            try (ResultSet rs = ps.executeQuery()) {
                int n = rs.getMetaData().getColumnCount();
                StringBuilder row = new StringBuilder();
                while (rs.next()) {
                    for (int c = 1; c <= n; c++) {
                        row.append(rs.getString(c)).append("|");
                    }
                }
                out.append("\"ok\",").append(n).append(",\"").append(row).append("\"]");
            }
        } catch (SQLException e) {
            out.append("\"error\",\"").append(e.getSQLState()).append("\"]");
        }
    }
}
