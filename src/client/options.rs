//! The startup packet's `options` string: `-c name=value` and
//! `--name=value` settings, read as PostgreSQL reads them; names that could
//! not be spliced into SET safely are refused.

use std::collections::BTreeMap;

use crate::error::ClientError;
use crate::server::params::valid_name;

/// `options` in the startup packet: `-c name=value` and `--name=value`.
pub(super) fn parse_options(
    options: &str,
    out: &mut BTreeMap<String, String>,
) -> Result<(), Option<ClientError>> {
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next()
        } else if let Some(s) = w.strip_prefix("-c") {
            Some(s)
        } else {
            w.strip_prefix("--")
        };
        let Some((k, v)) = setting.and_then(|s| s.split_once('=')) else {
            return Err(Some(ClientError::UnsupportedStartup(format!(
                "options: {w}"
            ))));
        };
        let k = k.replace('-', "_");
        if !valid_name(&k) {
            return Err(Some(ClientError::UnsupportedStartup(format!(
                "options: {k}"
            ))));
        }
        out.insert(k, v.to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed_like_postgres() {
        let mut m = BTreeMap::new();
        parse_options(
            "-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB",
            &mut m,
        )
        .unwrap();
        assert_eq!(m["search_path"], "a,b");
        assert_eq!(m["statement_timeout"], "5s");
        assert_eq!(m["work_mem"], "1MB");
        assert!(parse_options("-x", &mut m).is_err());
        assert!(parse_options("-c a;b=1", &mut m).is_err());
    }
}
