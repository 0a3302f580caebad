use proptest::prelude::*;

use super::*;

/// Text made of what `effects` looks at: keywords, quotes, comment and
/// dollar-quote marks, `;`, brackets, and multi-byte characters.
fn sqlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "set ",
            "reset ",
            "discard ",
            "all",
            "deallocate ",
            "prepare ",
            "execute ",
            "listen ",
            "declare ",
            "with hold",
            "create ",
            "temp ",
            "load ",
            "select ",
            "as ",
            "set_config(",
            "pg_advisory_lock(",
            "app.x",
            "local ",
            "session ",
        ])
        .prop_map(str::to_owned),
        "[ ;'\"$/*\\-\n()._a-zA-Z0-9é€]{1,4}",
    ];
    prop::collection::vec(piece, 0..16).prop_map(|v| v.concat())
}

/// A plain SELECT: no session effect, no `;`, nothing after a `--`.
fn plain_select() -> impl Strategy<Value = String> {
    let expr = prop_oneof![
        "[a-z][a-z0-9]{0,6}",
        "[0-9]{1,4}",
        "'[a-z ;]{0,8}'",
        "\"[A-Za-z ;]{1,6}\"",
    ];
    (
        prop::sample::select(vec!["select", "SELECT", "Select"]),
        prop::collection::vec(expr, 1..4),
        prop::option::of("[a-z]{1,6}"),
    )
        .prop_map(|(kw, exprs, from)| {
            let mut s = format!("{kw} {}", exprs.join(", "));
            if let Some(t) = from {
                s.push_str(" from ");
                s.push_str(&t);
            }
            s
        })
}

/// Whitespace and comments whose text names nothing `effects` looks for
/// (no `_`, so no `set_config` or `pg_advisory_lock`).
fn filler() -> impl Strategy<Value = String> {
    let one = prop_oneof![
        "[ \t\r\n]{1,3}",
        "[a-z ;']{0,10}".prop_map(|c| format!("/*{c}*/")),
        "[a-z ;']{0,10}".prop_map(|c| format!("--{c}\n")),
    ];
    prop::collection::vec(one, 0..3).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn effects_never_panics(sql in any::<String>()) {
        let _ = effects(&sql);
    }

    #[test]
    fn effects_never_panics_on_sql_like_text(sql in sqlish()) {
        let e = effects(&sql);
        if let Some(name) = &e.deallocate {
            prop_assert!(!name.is_empty());
        }
    }

    /// A plain SELECT stays plain with whitespace and comments around it
    /// and a trailing `;` (slow path or fast path alike).
    #[test]
    fn comments_and_spacing_keep_a_select_plain(
        sel in plain_select(),
        before in filler(),
        after in filler(),
        semi in any::<bool>(),
    ) {
        prop_assert!(effects(&sel).is_plain(), "{:?} is not plain", sel);
        let wrapped = format!("{before}{sel} {after}{}", if semi { ";" } else { "" });
        prop_assert!(effects(&wrapped).is_plain(), "{:?} is not plain", wrapped);
    }

    /// `SET` of a dotted name is seen, and named, with comments and
    /// spacing around it.
    #[test]
    fn a_custom_set_is_seen_through_comments(
        name in "[a-z]{1,5}\\.[a-z]{1,5}",
        before in filler(),
        after in filler(),
    ) {
        let e = effects(&format!("{before}SET {name} = 'v' {after}"));
        prop_assert!(e.params_changed);
        prop_assert_eq!(e.custom_params, vec![name]);
    }
}
