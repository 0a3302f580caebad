//! `/metrics` in Prometheus's text format 0.0.4, for clients that do not
//! ask for OpenMetrics (`promtool check metrics`, curl, older scrapers).
//! Prometheus itself asks for OpenMetrics and gets it unchanged.
//!
//! Owns the conversion only: a counter family is named after its `_total`
//! samples in `# HELP` / `# TYPE`, and the OpenMetrics-only lines
//! (`# UNIT`, `# EOF`) go; sample lines are the same (an empty label set
//! stays `{}`, which both formats allow). Invariant: every
//! sample line and value is the OpenMetrics text's, in the same order.

use std::collections::HashSet;

/// The Prometheus 0.0.4 text of an OpenMetrics text.
pub fn from_openmetrics(om: &str) -> String {
    let counters: HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let tail = match (prefix, tail) {
                    ("# TYPE ", "unknown") => "untyped",
                    _ => tail,
                };
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_after_their_samples_and_openmetrics_lines_go() {
        // Sample lines pass unchanged.
        let om = "# HELP tp_bytes Bytes sent\n# TYPE tp_bytes counter\n# UNIT tp_bytes bytes\n\
                  tp_bytes_total{app=\"a {} b\"} 3\n\
                  # HELP tp_up Up\n# TYPE tp_up gauge\ntp_up{} 1\n\
                  # HELP tp_x What\n# TYPE tp_x unknown\ntp_x 2\n# EOF\n";
        assert_eq!(
            from_openmetrics(om),
            "# HELP tp_bytes_total Bytes sent\n# TYPE tp_bytes_total counter\n\
             tp_bytes_total{app=\"a {} b\"} 3\n\
             # HELP tp_up Up\n# TYPE tp_up gauge\ntp_up{} 1\n\
             # HELP tp_x What\n# TYPE tp_x untyped\ntp_x 2\n"
        );
    }
}
