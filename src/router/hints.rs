//! Routing hints in a leading comment: `/* tidepool: primary */` or
//! `/* tidepool: replica */`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}

pub fn hint(sql: &str) -> Option<Hint> {
    let rest = sql.trim_start().strip_prefix("/*")?;
    let body = &rest[..rest.find("*/")?];
    let value = body.trim().strip_prefix("tidepool:")?.trim();
    match value.to_ascii_lowercase().as_str() {
        "primary" => Some(Hint::Primary),
        "replica" => Some(Hint::Replica),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_comment_hints() {
        assert_eq!(
            hint("/* tidepool: primary */ select 1"),
            Some(Hint::Primary)
        );
        assert_eq!(hint("  /*tidepool:REPLICA*/select 1"), Some(Hint::Replica));
        assert_eq!(hint("select 1 /* tidepool: primary */"), None);
        assert_eq!(hint("/* other */ select 1"), None);
    }
}
