//! Parsing one console statement. Keywords are case-insensitive; database
//! names are taken as written (double quotes allowed).

use super::AdminError;

/// A console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `SHOW <what>`, `<what>` upper-cased.
    Show(String),
    /// `SET ...`: accepted and ignored (drivers send `SET datestyle`).
    Set,
    Pause(Option<String>),
    Resume(Option<String>),
    Kill(Option<String>),
    Reload,
    /// SHUTDOWN: idle clients now, busy ones after their transaction.
    Shutdown,
    /// SHUTDOWN WAIT_FOR_CLIENTS: stop accepting, exit once every client
    /// has left on its own (a rolling upgrade with `so_reuseport`).
    ShutdownWaitForClients,
}

impl Command {
    /// Whether `stats_users` are refused.
    pub fn needs_admin(&self) -> bool {
        !matches!(self, Command::Show(_) | Command::Set)
    }
}

/// One database argument, unquoted.
fn database(word: Option<&str>) -> Option<String> {
    word.map(|w| {
        w.strip_prefix('"')
            .and_then(|w| w.strip_suffix('"'))
            .unwrap_or(w)
            .to_owned()
    })
}

pub fn parse(stmt: &str) -> Result<Command, AdminError> {
    let invalid = || AdminError::Syntax(stmt.to_owned());
    let mut words = stmt.split_whitespace();
    let Some(first) = words.next() else {
        return Err(invalid());
    };
    let rest: Vec<&str> = words.collect();
    let arg = || -> Result<Option<String>, AdminError> {
        match rest.as_slice() {
            [] => Ok(None),
            [db] => Ok(database(Some(db))),
            _ => Err(invalid()),
        }
    };
    match first.to_ascii_uppercase().as_str() {
        "SHOW" => match rest.as_slice() {
            [what] => Ok(Command::Show(what.to_ascii_uppercase())),
            _ => Err(invalid()),
        },
        "SET" => Ok(Command::Set),
        "PAUSE" => Ok(Command::Pause(arg()?)),
        "RESUME" => Ok(Command::Resume(arg()?)),
        "KILL" => Ok(Command::Kill(arg()?)),
        "RELOAD" if rest.is_empty() => Ok(Command::Reload),
        "SHUTDOWN" if rest.is_empty() => Ok(Command::Shutdown),
        "SHUTDOWN" if rest.len() == 1 && rest[0].eq_ignore_ascii_case("WAIT_FOR_CLIENTS") => {
            Ok(Command::ShutdownWaitForClients)
        }
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(
            parse("show stats").ok(),
            Some(Command::Show("STATS".into()))
        );
        assert_eq!(
            parse("PAUSE app").ok(),
            Some(Command::Pause(Some("app".into())))
        );
        assert_eq!(parse("pause").ok(), Some(Command::Pause(None)));
        assert_eq!(
            parse("kill \"My Db\"").ok(),
            None,
            "quoted names with spaces are not split-safe"
        );
        assert_eq!(
            parse("kill \"app\"").ok(),
            Some(Command::Kill(Some("app".into())))
        );
        assert_eq!(parse("reload").ok(), Some(Command::Reload));
        assert!(parse("select 1").is_err());
        assert!(parse("show").is_err());
        assert!(parse("reload now").is_err());
        assert!(!Command::Show("X".into()).needs_admin());
        assert!(Command::Reload.needs_admin());
    }
}
