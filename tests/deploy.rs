//! The deployment files: `docker-compose.yml` (services, ports, health
//! checks, mounted files that exist, a config that `tidepool check` passes),
//! the `Dockerfile` (multi-stage, non-root, `tidepool check --probe` as its
//! health check), Prometheus scraping tidepool's metrics port, and the
//! Grafana dashboard, every panel of which queries metrics that a real
//! tidepool exports. No Docker daemon runs here, so the files are checked,
//! not run; `tidepool check --probe` is run against a real process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use harness::daemon::Daemon;
use serde_json::Value;

/// A YAML file as JSON, through Python's yaml module (Debian's python3-yaml,
/// installed by scripts/test).
fn yaml(path: &str) -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            path,
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{path} does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_file_runs_a_primary_two_replicas_tidepool_prometheus_and_grafana() {
    let c = yaml("docker-compose.yml");
    let services = c["services"].as_object().expect("services");
    for s in [
        "primary",
        "replica1",
        "replica2",
        "tidepool",
        "prometheus",
        "grafana",
    ] {
        let svc = services.get(s).unwrap_or_else(|| panic!("no service {s}"));
        // Every service says when it is healthy (the anchors are merged).
        assert!(
            svc["healthcheck"]["test"].is_array(),
            "{s} has no health check: {svc}"
        );
        // Every file it mounts from the repository exists.
        for v in strings(&svc["volumes"]) {
            let host = v.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(
                    Path::new(host).exists(),
                    "{s} mounts {host}, which is missing"
                );
            }
        }
    }
    let tp = &services["tidepool"];
    assert_eq!(tp["build"], ".", "tidepool is built from the Dockerfile");
    let ports = strings(&tp["ports"]);
    assert!(ports.contains(&"6432:6432".to_owned()), "{ports:?}");
    assert!(ports.contains(&"9930:9930".to_owned()), "{ports:?}");
    let check = strings(&tp["healthcheck"]["test"]).join(" ");
    assert!(
        check.contains("tidepool check") && check.contains("--probe"),
        "{check}"
    );
    assert!(
        strings(&tp["volumes"]).contains(&"./deploy/proxy.toml:/etc/tidepool/proxy.toml:ro".into())
    );
    for r in ["replica1", "replica2"] {
        assert_eq!(services[r]["environment"]["PRIMARY_HOST"], "primary");
        assert_eq!(
            services[r]["depends_on"]["primary"]["condition"],
            "service_healthy"
        );
    }

    // The config it mounts passes `tidepool check` and points at the services.
    let (ok, out) = harness::tidepool_check(Path::new("deploy/proxy.toml"));
    assert!(ok, "{out}");
    let config = tidepool::Config::load(Path::new("deploy/proxy.toml")).unwrap();
    let app = &config.databases["app"];
    assert_eq!(app.host, "primary");
    let replicas: Vec<&str> = app.replicas.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(replicas, ["replica1", "replica2"]);
    let metrics = config.metrics.listen.clone().unwrap();
    assert!(metrics.ends_with(":9930"), "{metrics}");

    // Prometheus scrapes that port; Grafana's data source is that Prometheus.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let targets = strings(&prom["scrape_configs"][0]["static_configs"][0]["targets"]);
    assert_eq!(targets, ["tidepool:9930"]);
    // The alerting rules are loaded, from the file the compose file mounts.
    assert_eq!(strings(&prom["rule_files"]), ["/etc/prometheus/alerts.yml"]);
    let mounts = strings(&c["services"]["prometheus"]["volumes"]);
    assert!(
        mounts.contains(&"./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro".to_owned()),
        "{mounts:?}"
    );
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(ds["datasources"][0]["url"], "http://prometheus:9090");
    assert_eq!(ds["datasources"][0]["uid"], "prometheus");
    let provider = yaml("deploy/grafana/provisioning/dashboards/tidepool.yml");
    assert_eq!(
        provider["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );
}

#[test]
fn the_image_is_multi_stage_runs_as_a_user_and_probes_tidepool() {
    let d = std::fs::read_to_string("Dockerfile").unwrap();
    let froms: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(
        froms.last().unwrap().contains("slim"),
        "a small final stage"
    );
    let user = d
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    let health = d
        .split("HEALTHCHECK")
        .nth(1)
        .expect("a HEALTHCHECK")
        .split("\n\n")
        .next()
        .unwrap();
    assert!(
        health.contains("\"check\"") && health.contains("--probe"),
        "{health}"
    );
    assert!(d.contains("COPY deploy/proxy.toml /etc/tidepool/proxy.toml"));
    let ignore = std::fs::read_to_string(".dockerignore").unwrap();
    assert!(
        ignore.lines().any(|l| l == "target"),
        "the build context skips target/"
    );
}

/// Metric names (sample names) in PromQL.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("tidepool_") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        out.insert(expr[start..end].to_owned());
        i = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_queries_metrics_tidepool_exports() {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/grafana/dashboards/tidepool.json").unwrap(),
    )
    .unwrap();
    let mut wanted = BTreeSet::new();
    let mut panels = 0;
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        panels += 1;
        assert_eq!(p["datasource"]["uid"], "prometheus", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            let names = metric_names(t["expr"].as_str().unwrap());
            assert!(!names.is_empty(), "{}: {}", p["title"], t["expr"]);
            wanted.extend(names);
        }
    }
    assert!(panels >= 10, "{panels} panels");

    let exported = exported_metrics().await;
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics does not export: {missing:?}"
    );
}

/// The metric names a real tidepool exports (samples, and families
/// declared without samples yet), in front of a primary and a replica,
/// after some traffic (routing metrics appear once replicas are configured).
async fn exported_metrics() -> BTreeSet<String> {
    let c = harness::cluster_with_replica();
    let db = c.create_database("dashboard");
    let toml = harness::proxy::config_toml(
        c,
        &db,
        "",
        &format!(
            "replicas = [{{ host = \"127.0.0.1\", port = {} }}]",
            c.replica_ports()[0]
        ),
    ) + "\n[routing]\nhealth_check_period = \"200ms\"\n";
    let proxy = harness::TestProxy::start(&toml);
    let client = proxy.client(&db).await;
    for _ in 0..5 {
        client.simple_query("select 1").await.unwrap();
    }
    let text = tidepool::http::metrics::render(&proxy.shared).unwrap();
    let mut names: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut w = rest.split(' ');
            let (name, kind) = (w.next().unwrap(), w.next().unwrap_or(""));
            names.insert(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            });
        }
    }
    names
}

/// The alerting rules (deploy/prometheus/alerts.yml: pool saturated,
/// clients waiting, replica banned, replication lag, slow-query ratio,
/// leaks, rate-limit rejections) pass `promtool check rules` and their unit
/// tests (`promtool test rules`), and name only metrics tidepool exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_pass_promtool_and_query_exported_metrics() {
    let promtool = std::process::Command::new("promtool")
        .arg("--version")
        .output();
    assert!(
        promtool.is_ok_and(|o| o.status.success()),
        "promtool is missing: run scripts/test (apt-get install prometheus)"
    );
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir("deploy/prometheus")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = yaml("deploy/prometheus/alerts.yml");
    let mut wanted = BTreeSet::new();
    let mut alerts = Vec::new();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            alerts.push(r["alert"].as_str().unwrap().to_owned());
            wanted.extend(metric_names(r["expr"].as_str().unwrap()));
        }
    }
    assert_eq!(alerts.len(), 7, "{alerts:?}");
    let exported = exported_metrics().await;
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "alerts on metrics /metrics does not export: {missing:?}"
    );
}

#[test]
fn check_probe_says_whether_a_running_tidepool_answers() {
    let toml = "[tidepool]\nlisten = [\"127.0.0.1:{port}\"]\n\
                [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
                [databases.d]\nhost = \"127.0.0.1\"\nport = 1\n\
                [users.u]\nauth_type = \"trust\"\n";
    let mut d = Daemon::start(toml);
    let probe = |path: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["check", "--probe", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let up = probe(&d.config_path);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    d.signal(libc::SIGKILL);
    d.wait_exit(std::time::Duration::from_secs(10));
    let down = probe(&d.config_path);
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("probe failed"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}
