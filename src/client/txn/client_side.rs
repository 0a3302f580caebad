//! The client → server inspector: which client messages pass as they are,
//! what they owe, and which stop for the session (named statements,
//! refused features, a statement that needs the primary on a replica).

use std::borrow::Cow;

use super::*;

/// Inspector for client → server bytes.
///
/// Messages it can forward unchanged pass; named-statement messages, refused
/// features and messages to drop stop the scan for the session to handle.
pub struct ClientSide<'a> {
    pub(super) t: &'a mut Tracker,
    pub(super) shapes: Option<&'a Fingerprints>,
}

/// The shape of `sql` when per-query statistics are on: its first word
/// only when the session's literals cannot be told apart (`opaque`, see
/// `stats::fingerprint::opaque`).
pub fn shape_of(shapes: Option<&Fingerprints>, sql: &str, opaque: bool) -> Option<Arc<Shape>> {
    shapes.map(|s| shape_in(s, sql, opaque))
}

/// [`shape_of`] with statistics on.
pub fn shape_in(shapes: &Fingerprints, sql: &str, opaque: bool) -> Arc<Shape> {
    if opaque {
        shapes.shape(&crate::stats::fingerprint::opaque(sql))
    } else {
        shapes.shape(sql)
    }
}

impl ClientSide<'_> {
    /// What `sql` is: its shape (when per-query statistics are on) and its
    /// effects on the session (`None`: it has none). A statement like one
    /// this client sent lately is known from the memo without lexing it.
    ///
    /// Text in another client encoding (`foreign`) is read for its effects,
    /// and counts as changing settings whatever it says: in encodings whose
    /// second bytes look like ASCII (SJIS, BIG5, GBK), a byte the lexer takes
    /// for a backslash or a quote may hide a SET.
    #[inline]
    fn look(&mut self, sql: &str, foreign: bool) -> (Option<Arc<Shape>>, Option<Effects>) {
        let (shape, mut e) = if self.t.opaque_literals {
            // Literals the lexer cannot find: statistics see the first word
            // only, and the memo (keyed by masked text) is not asked.
            let e = self.t.effects_of(sql);
            (
                shape_of(self.shapes, sql, true),
                (!e.is_plain()).then_some(e),
            )
        } else {
            self.look_utf8(sql)
        };
        if foreign {
            e.get_or_insert_with(Effects::default).params_changed = true;
        }
        (shape, e)
    }

    #[inline]
    fn look_utf8(&mut self, sql: &str) -> (Option<Arc<Shape>>, Option<Effects>) {
        let t = &mut *self.t;
        // Shapes and templates are of the text without its edge comments:
        // a trace comment unique to each query still finds them.
        let key = crate::stats::trace::without_edge_comments(sql);
        if let Some(hit) = t.memo.find_key(key) {
            let shape = match self.shapes {
                // Remembered for routing, before statistics wanted its shape.
                Some(s) => Some(hit.shape.get_or_insert_with(|| s.shape(sql)).clone()),
                None => None,
            };
            let plain = hit.plain;
            return (
                shape,
                (!plain || t.calls_changer(sql)).then(|| t.effects_of(sql)),
            );
        }
        let e = t.effects_of(sql);
        let (shape, template) = match self.shapes {
            Some(s) => {
                let (shape, template) = s.shape_and_template(key);
                (Some(shape), template)
            }
            None => (None, hash_and_template(key).1),
        };
        let plain = e.is_plain();
        if let Some(template) = template {
            t.memo.remember(template, shape.clone(), plain);
        }
        (shape, (!plain).then_some(e))
    }
}

impl Inspector for ClientSide<'_> {
    fn classify(&mut self, tag: u8) -> Step {
        let t = &mut *self.t;
        let tag = FrontendTag::from_byte(tag);
        if tag == FrontendTag::Terminate {
            t.terminated = true;
            return Step::Stop;
        }
        if t.batch == Batch::Skipping {
            return Step::Inspect;
        }
        match tag {
            FrontendTag::Query
            | FrontendTag::Parse
            | FrontendTag::Bind
            | FrontendTag::Describe
            | FrontendTag::Execute
            | FrontendTag::Close => return Step::Inspect,
            FrontendTag::Sync => t.timing.sync(false),
            // A fastpath call names its function by OID, no text to
            // classify: like a write, it needs the primary when it would
            // start a transaction on a replica.
            FrontendTag::FunctionCall
                if t.replica_guard.is_some()
                    && t.status == TxStatus::Idle
                    && t.batch == Batch::Synced =>
            {
                t.reroute = true;
                return Step::Stop;
            }
            FrontendTag::FunctionCall => t.timing.sync(true),
            _ => {}
        }
        t.exchange.on_client(tag);
        Step::Pass
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Step, ProtocolError> {
        let t = &mut *self.t;
        if t.batch == Batch::Skipping {
            return Ok(Step::Stop);
        }
        let named = t.policy.named_statements;
        match FrontendTag::from_byte(tag) {
            FrontendTag::Query => {
                let sql = Body::new(body, "Query").sql()?;
                let foreign = matches!(sql, Cow::Owned(_));
                if t.needs_primary(&sql, foreign) {
                    t.reroute = true;
                    return Ok(Step::Stop);
                }
                let (shape, e) = self.look(&sql, foreign);
                let t = &mut *self.t;
                if let Some(e) = e {
                    let refused = e.session_feature.is_some() && t.policy.refuse_session_features;
                    let prepared = (e.prepared.is_some()
                        || e.nested_execute.is_some()
                        || !e.executes.is_empty()
                        || e.lists_statements)
                        && t.policy.named_statements;
                    if e.deallocate.is_some() || e.drops_all_statements || refused || prepared {
                        return Ok(Step::Stop);
                    }
                    t.note_effects(&e);
                }
                t.expect.push(Owed::UntilReady {
                    undo: None,
                    failed: false,
                    position_shift: 0,
                    bound: None,
                });
                t.timing
                    .query(shape, crate::stats::trace::traceparent(&sql));
            }
            FrontendTag::Parse => {
                let mut b = Body::new(body, "Parse");
                let name = b.cstr()?;
                let sql = b.sql()?;
                let foreign = matches!(sql, Cow::Owned(_));
                if t.needs_primary(&sql, foreign) {
                    t.reroute = true;
                    return Ok(Step::Stop);
                }
                if named && !name.is_empty() {
                    return Ok(Step::Stop);
                }
                let (shape, e) = self.look(&sql, foreign);
                if named
                    && e.as_ref().is_some_and(|e| {
                        e.lists_statements || e.prepared.is_some() || e.nested_execute.is_some()
                    })
                {
                    // It names the client's statements: the session puts
                    // them in (see `client::prepared`).
                    return Ok(Step::Stop);
                }
                let t = &mut *self.t;
                if name.is_empty() {
                    t.memo.unnamed_drops = match &e {
                        Some(e) if e.drops_all_statements => UnnamedDrops::All,
                        Some(Effects {
                            deallocate: Some(n),
                            ..
                        }) if named => UnnamedDrops::One(n.clone()),
                        _ => UnnamedDrops::Nothing,
                    };
                }
                if let Some(e) = e
                    && t.note_effects(&e)
                {
                    return Ok(Step::Stop);
                }
                t.batch.open();
                t.expect.push(Owed::Parse {
                    swallow: false,
                    undo: Undo::default(),
                });
                if name.is_empty() {
                    t.timing
                        .parse_unnamed(shape, crate::stats::trace::traceparent(&sql));
                } else {
                    t.timing.parse_named();
                }
            }
            FrontendTag::Bind => {
                let mut b = Body::new(body, "Bind");
                let portal = b.cstr()?;
                let statement = b.cstr()?;
                if named
                    && (!statement.is_empty()
                        || matches!(t.memo.unnamed_drops, UnnamedDrops::One(_)))
                {
                    return Ok(Step::Stop);
                }
                t.drops_statements |=
                    statement.is_empty() && t.memo.unnamed_drops == UnnamedDrops::All;
                t.batch.open();
                t.expect.push(Owed::Bind);
                let shape = (!statement.is_empty()).then_some(None);
                t.timing.bind(portal, shape, None);
            }
            FrontendTag::Execute => {
                let portal = Body::new(body, "Execute").cstr()?;
                t.batch.open();
                t.expect.push(Owed::Execute);
                t.timing.execute(portal);
            }
            FrontendTag::Describe | FrontendTag::Close => {
                let mut b = Body::new(body, "Describe/Close");
                let kind = b.u8()?;
                if named && kind == b'S' && !b.cstr()?.is_empty() {
                    return Ok(Step::Stop);
                }
                t.batch.open();
                t.expect.push(match (FrontendTag::from_byte(tag), kind) {
                    (FrontendTag::Close, _) => Owed::Close { swallow: false },
                    (_, b'S') => Owed::DescribeStatement,
                    _ => Owed::DescribePortal,
                });
            }
            _ => {}
        }
        Ok(Step::Pass)
    }
}
