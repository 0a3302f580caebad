//! Address rules: `auth_hba_file` in pg_hba.conf format, the subset
//! PgBouncer supports. Parsed once per config load (an error names the file
//! and line, and the running rules stay); evaluated for every login before
//! authentication.
//!
//! Lines: `TYPE DATABASE USER [ADDRESS [MASK]] METHOD [OPTIONS]`.
//! - TYPE: `local` (clients on the Unix socket, `unix_socket_dir`), `host`,
//!   `hostssl`, `hostnossl` (TCP clients).
//! - DATABASE: `all`, `sameuser`, or names separated by commas; a quoted
//!   name is a name, never a keyword.
//! - USER: `all` or names separated by commas.
//! - ADDRESS: `all`, an address with a `/prefix`, or an address followed
//!   by a netmask column. IPv4 clients seen as IPv4-mapped IPv6 addresses
//!   match IPv4 rules.
//! - METHOD: `trust`, `reject`, `md5`, `password`, `scram-sha-256`, `cert`.
//! - OPTIONS (`name=value`, on `hostssl` lines): `clientcert=verify-ca` (a
//!   client certificate that `client_tls_ca_file` verifies is required
//!   besides the method) or `clientcert=verify-full` (and it must name the
//!   user), and `clientname=CN`. Any other option is a load error: an
//!   option ignored would admit whom the line meant to keep out.
//!
//! Invariant: the first line that matches decides; no match is a refusal.
//! What PgBouncer does not support (`samerole`, `+group`, `@file`,
//! host names, `samehost`, `samenet`, other methods) is a load error, never a
//! rule silently read as something else.

use std::net::IpAddr;

/// What a line's `clientcert` option asks of the client's certificate,
/// besides the method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCert {
    /// One that `client_tls_ca_file` verifies.
    VerifyCa,
    /// One that it verifies and whose common name is the user.
    VerifyFull,
}

/// What the first matching line says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Trust,
    Reject,
    Md5,
    /// A clear-text password (checked against the user's secret).
    Password,
    ScramSha256,
    /// A TLS client certificate whose common name is the user.
    Cert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Local,
    Host,
    HostSsl,
    HostNoSsl,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    All,
    SameUser,
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Any,
    Net { net: IpAddr, prefix: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    line: usize,
    kind: Kind,
    databases: Vec<Name>,
    users: Vec<Name>,
    address: Address,
    method: Method,
    clientcert: Option<ClientCert>,
}

/// The rules of one HBA file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hba {
    rules: Vec<Rule>,
}

/// Who is logging in, and how.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The client's address; None for a client on the Unix socket.
    pub addr: Option<IpAddr>,
    pub tls: bool,
    pub database: &'a str,
    pub user: &'a str,
}

/// A line tidepool cannot read: its number and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct HbaError {
    pub line: usize,
    pub message: String,
}

impl Hba {
    /// Parses the text of an HBA file.
    pub fn parse(text: &str) -> Result<Hba, HbaError> {
        let mut rules = Vec::new();
        let mut pending = String::new();
        let mut first_line = 0;
        for (i, raw) in text.lines().enumerate() {
            let raw = strip_comment(raw);
            if pending.is_empty() {
                first_line = i + 1;
            }
            // A backslash at the end of a line continues it.
            if let Some(head) = raw.trim_end().strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(raw);
            let line = std::mem::take(&mut pending);
            let fields = split_fields(&line).map_err(|message| HbaError {
                line: first_line,
                message,
            })?;
            if fields.is_empty() {
                continue;
            }
            rules.push(rule(first_line, &fields).map_err(|message| HbaError {
                line: first_line,
                message,
            })?);
        }
        Ok(Hba { rules })
    }

    /// The method of the first line that matches `peer`; None when no line
    /// does (the login is refused).
    pub fn method_for(&self, peer: &Peer<'_>) -> Option<Method> {
        self.rule_for(peer).map(|(m, _)| m)
    }

    /// The method of the first line that matches `peer`, and what its
    /// `clientcert` option asks.
    pub fn rule_for(&self, peer: &Peer<'_>) -> Option<(Method, Option<ClientCert>)> {
        let addr = peer.addr.map(canonical);
        self.rules
            .iter()
            .find(|r| {
                let kind = match r.kind {
                    Kind::Local => addr.is_none(),
                    Kind::Host => addr.is_some(),
                    Kind::HostSsl => addr.is_some() && peer.tls,
                    Kind::HostNoSsl => addr.is_some() && !peer.tls,
                };
                kind && r.databases.iter().any(|d| match d {
                    Name::All => true,
                    Name::SameUser => peer.database == peer.user,
                    Name::Exact(n) => n == peer.database,
                }) && r.users.iter().any(|u| match u {
                    Name::All => true,
                    Name::SameUser => false,
                    Name::Exact(n) => n == peer.user,
                }) && addr.is_none_or(|a| matches_address(&r.address, a))
            })
            .map(|r| (r.method, r.clientcert))
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's IPv4 clients) as IPv4.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn matches_address(rule: &Address, addr: IpAddr) -> bool {
    match (rule, addr) {
        (Address::Any, _) => true,
        (
            Address::Net {
                net: IpAddr::V4(n),
                prefix,
            },
            IpAddr::V4(a),
        ) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
            u32::from(*n) & mask == u32::from(a) & mask
        }
        (
            Address::Net {
                net: IpAddr::V6(n),
                prefix,
            },
            IpAddr::V6(a),
        ) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
            u128::from(*n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// One field's parts (split at commas), each with whether it was quoted.
type Field = Vec<(String, bool)>;

fn split_fields(line: &str) -> Result<Vec<Field>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(fields);
        }
        let mut field: Field = Vec::new();
        let mut part = String::new();
        let mut quoted = false;
        let mut in_quotes = false;
        while let Some(&c) = chars.peek() {
            if !in_quotes && c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '"' => {
                    in_quotes = !in_quotes;
                    quoted = true;
                }
                ',' if !in_quotes => {
                    field.push((std::mem::take(&mut part), quoted));
                    quoted = false;
                }
                _ => part.push(c),
            }
        }
        if in_quotes {
            return Err("unterminated quoted string".into());
        }
        field.push((part, quoted));
        fields.push(field);
    }
}

fn single(f: &Field, what: &str) -> Result<String, String> {
    match f.as_slice() {
        [(s, _)] => Ok(s.clone()),
        _ => Err(format!("{what} must be a single value")),
    }
}

fn names(f: &Field, what: &str, same_user: bool) -> Result<Vec<Name>, String> {
    f.iter()
        .map(|(s, quoted)| {
            if *quoted {
                return Ok(Name::Exact(s.clone()));
            }
            match s.as_str() {
                "" => Err(format!("empty {what} name")),
                "all" => Ok(Name::All),
                "sameuser" if same_user => Ok(Name::SameUser),
                "replication" if same_user => Ok(Name::Exact(String::new())),
                "samerole" | "samegroup" => Err(format!("{s} is not supported")),
                _ if s.starts_with('@') => Err(format!("{what} files ({s}) are not supported")),
                _ if s.starts_with('+') => Err(format!("group membership ({s}) is not supported")),
                _ => Ok(Name::Exact(s.clone())),
            }
        })
        .collect()
}

fn rule(line: usize, f: &[Field]) -> Result<Rule, String> {
    let kind = match single(&f[0], "the connection type")?.as_str() {
        "local" => Kind::Local,
        "host" => Kind::Host,
        "hostssl" => Kind::HostSsl,
        "hostnossl" => Kind::HostNoSsl,
        other => return Err(format!("unknown connection type \"{other}\"")),
    };
    let need = if kind == Kind::Local { 4 } else { 5 };
    if f.len() < need {
        return Err("too few fields".into());
    }
    let databases = names(&f[1], "database", true)?;
    let users = names(&f[2], "user", false)?;
    let (address, method_at) = if kind == Kind::Local {
        (Address::Any, 3)
    } else {
        let a = single(&f[3], "the address")?;
        if a == "all" {
            (Address::Any, 4)
        } else if let Some((ip, prefix)) = a.split_once('/') {
            (net(ip, prefix)?, 4)
        } else {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| format!("\"{a}\" is not an IP address (host names, samehost and samenet are not supported)"))?;
            let mask = f
                .get(4)
                .ok_or("an address without /prefix needs a netmask")?;
            let mask: IpAddr = single(mask, "the netmask")?
                .parse()
                .map_err(|_| "invalid netmask".to_string())?;
            let prefix = match (ip, mask) {
                (IpAddr::V4(_), IpAddr::V4(m)) => prefix_of(u128::from(u32::from(m)) << 96),
                (IpAddr::V6(_), IpAddr::V6(m)) => prefix_of(u128::from(m)),
                _ => None,
            }
            .ok_or("invalid netmask")?;
            (Address::Net { net: ip, prefix }, 5)
        }
    };
    let m = f.get(method_at).ok_or("no authentication method")?;
    let method = match single(m, "the method")?.as_str() {
        "trust" => Method::Trust,
        "reject" => Method::Reject,
        "md5" => Method::Md5,
        "password" => Method::Password,
        "scram-sha-256" => Method::ScramSha256,
        "cert" => Method::Cert,
        other => {
            return Err(format!(
                "authentication method \"{other}\" is not supported"
            ));
        }
    };
    let clientcert = options(kind, method, &f[method_at + 1..])?;
    Ok(Rule {
        line,
        kind,
        databases,
        users,
        address,
        method,
        clientcert,
    })
}

/// The `name=value` options after the method, in PostgreSQL's words where
/// it refuses them too.
fn options(kind: Kind, method: Method, f: &[Field]) -> Result<Option<ClientCert>, String> {
    let mut clientcert = (method == Method::Cert).then_some(ClientCert::VerifyFull);
    for field in f {
        let option = single(field, "an option")?;
        let Some((name, value)) = option.split_once('=') else {
            return Err(format!(
                "authentication option not in name=value format: {option}"
            ));
        };
        match name {
            "clientcert" | "clientname" if kind != Kind::HostSsl => {
                return Err(format!(
                    "{name} can only be configured for \"hostssl\" rows"
                ));
            }
            "clientcert" => {
                clientcert = match value {
                    "verify-full" => Some(ClientCert::VerifyFull),
                    "verify-ca" if method == Method::Cert => {
                        return Err("clientcert only accepts \"verify-full\" when using \"cert\" authentication".into());
                    }
                    "verify-ca" => Some(ClientCert::VerifyCa),
                    _ => {
                        return Err(format!(
                            "invalid value for clientcert: \"{value}\" (verify-ca or verify-full)"
                        ));
                    }
                }
            }
            "clientname" if value == "CN" => {}
            "clientname" => {
                return Err(format!(
                    "clientname \"{value}\" is not supported (only CN: the certificate's common name)"
                ));
            }
            _ => {
                return Err(format!("authentication option \"{name}\" is not supported"));
            }
        }
    }
    Ok(clientcert)
}

fn net(ip: &str, prefix: &str) -> Result<Address, String> {
    let net: IpAddr = ip
        .parse()
        .map_err(|_| format!("\"{ip}\" is not an IP address"))?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| format!("invalid prefix length \"/{prefix}\""))?;
    Ok(Address::Net { net, prefix })
}

/// The prefix length of a contiguous netmask (as the top bits of a u128).
fn prefix_of(mask: u128) -> Option<u8> {
    let ones = mask.leading_ones();
    (mask.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer<'a>(addr: &str, tls: bool, database: &'a str, user: &'a str) -> Peer<'a> {
        Peer {
            addr: if addr == "unix" {
                None
            } else {
                Some(addr.parse().unwrap())
            },
            tls,
            database,
            user,
        }
    }

    #[test]
    fn the_first_matching_line_decides() {
        let hba = Hba::parse(
            "# comment\n\
             local all all trust\n\
             host  app  \"all\"  10.0.0.0/8  reject   # a user named all\n\
             hostssl all all 0.0.0.0/0 cert\n\
             host app,other alice,bob 10.1.0.0 255.255.0.0 md5\n\
             host sameuser all 127.0.0.1/32 password\n\
             hostssl all all ::1/128 scram-sha-256 \\\n   clientcert=verify-full\n\
             hostnossl all all 0.0.0.0/0 scram-sha-256\n",
        )
        .unwrap();
        assert_eq!(hba.len(), 7);
        let m = |p: Peer<'_>| hba.method_for(&p);
        assert_eq!(
            m(peer("10.1.2.3", false, "app", "all")),
            Some(Method::Reject)
        );
        assert_eq!(
            m(peer("10.1.2.3", false, "app", "alice")),
            Some(Method::Md5)
        );
        assert_eq!(
            m(peer("10.1.2.3", true, "app", "alice")),
            Some(Method::Cert)
        );
        assert_eq!(
            m(peer("10.2.2.3", false, "app", "alice")),
            Some(Method::ScramSha256)
        );
        assert_eq!(
            m(peer("127.0.0.1", false, "bob", "bob")),
            Some(Method::Password)
        );
        assert_eq!(
            m(peer("::ffff:127.0.0.1", false, "bob", "bob")),
            Some(Method::Password)
        );
        assert_eq!(m(peer("::1", true, "x", "y")), Some(Method::ScramSha256));
        assert_eq!(
            hba.rule_for(&peer("::1", true, "x", "y")),
            Some((Method::ScramSha256, Some(ClientCert::VerifyFull)))
        );
        assert_eq!(m(peer("::1", false, "x", "y")), None);
        assert_eq!(m(peer("::2", false, "x", "y")), None);
        // The Unix socket: `local` lines only.
        assert_eq!(m(peer("unix", false, "x", "y")), Some(Method::Trust));
        let tcp_only = Hba::parse("host all all all trust\n").unwrap();
        assert_eq!(tcp_only.method_for(&peer("unix", false, "x", "y")), None);
    }

    #[test]
    fn clientcert_options() {
        let hba = Hba::parse(
            "hostssl a all all md5 clientcert=verify-ca\n\
             hostssl b all all scram-sha-256 clientcert=verify-full clientname=CN\n\
             hostssl c all all cert\n\
             hostssl d all all cert clientcert=verify-full\n\
             hostssl e all all md5\n",
        )
        .unwrap();
        let r = |db: &str| hba.rule_for(&peer("10.0.0.1", true, db, "u"));
        assert_eq!(r("a"), Some((Method::Md5, Some(ClientCert::VerifyCa))));
        assert_eq!(
            r("b"),
            Some((Method::ScramSha256, Some(ClientCert::VerifyFull)))
        );
        assert_eq!(r("c"), Some((Method::Cert, Some(ClientCert::VerifyFull))));
        assert_eq!(r("d"), Some((Method::Cert, Some(ClientCert::VerifyFull))));
        assert_eq!(r("e"), Some((Method::Md5, None)));
    }

    #[test]
    fn what_is_not_supported_is_a_load_error_with_its_line() {
        for (text, line) in [
            ("host all all example.com trust", 1),
            ("\nhost samerole all all trust", 2),
            ("host all +admins all trust", 1),
            ("host @dbs all all trust", 1),
            ("host all all 0.0.0.0/33 trust", 1),
            ("host all all 10.0.0.0 255.0.255.0 trust", 1),
            ("host all all all ident", 1),
            ("hostgssenc all all all trust", 1),
            ("host all all", 1),
            ("host \"all all all trust", 1),
            // Options: an ignored one would admit whom the line keeps out.
            ("hostssl all all all md5 foo=bar", 1),
            ("hostssl all all all md5 clientcert", 1),
            ("hostssl all all all md5 clientcert=yes", 1),
            ("host all all all md5 clientcert=verify-ca", 1),
            ("hostssl all all all cert clientcert=verify-ca", 1),
            ("hostssl all all all md5 clientname=DN", 1),
            ("local all all trust map=x", 1),
        ] {
            let e = Hba::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
        }
    }

    proptest::proptest! {
        /// Any text: parsed or refused with a line number within it, never
        /// a panic; rules that parse answer any peer.
        #[test]
        fn any_text_parses_or_names_its_line(text in "(host|hostssl|local|all|app|\"x y\"|,|#| |\\\\|\n|10\\.0\\.0\\.0/8|::1/128|255\\.0\\.0\\.0|md5|trust|reject|cert|clientcert=verify-full|clientcert=verify-ca|clientname=CN|=|[a-z0-9./+@=]{1,6}){0,40}") {
            match Hba::parse(&text) {
                Ok(hba) => {
                    for a in ["10.1.1.1", "::1"] {
                        let _ = hba.method_for(&peer(a, false, "app", "app"));
                        let _ = hba.rule_for(&peer(a, true, "app", "app"));
                    }
                }
                Err(e) => proptest::prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1)),
            }
        }
    }

    #[test]
    fn prefixes_and_masks() {
        assert_eq!(prefix_of(u128::MAX << 104), Some(24));
        assert_eq!(prefix_of(0), Some(0));
        assert_eq!(prefix_of(0b101 << 125), None);
        let any4 = Address::Net {
            net: "0.0.0.0".parse().unwrap(),
            prefix: 0,
        };
        assert!(matches_address(&any4, "8.8.8.8".parse().unwrap()));
        assert!(!matches_address(&any4, "::1".parse().unwrap()));
    }
}
