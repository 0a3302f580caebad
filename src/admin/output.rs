//! Result sets of the admin console, written as PostgreSQL messages:
//! RowDescription, DataRows (text format), CommandComplete.
//!
//! Column types follow PgBouncer's console (numeric for statistics, int4 for
//! counts, text otherwise) so that drivers decode them the same way.

use bytes::{BufMut, BytesMut};

use crate::protocol::{BackendTag, write};

/// A column's type, as RowDescription announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    Int4,
    Int8,
    Numeric,
}

impl Type {
    fn oid(self) -> u32 {
        match self {
            Type::Text => 25,
            Type::Int4 => 23,
            Type::Int8 => 20,
            Type::Numeric => 1700,
        }
    }

    fn len(self) -> i16 {
        match self {
            Type::Int4 => 4,
            Type::Int8 => 8,
            Type::Text | Type::Numeric => -1,
        }
    }
}

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::from(v as u64)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<u16> for Value {
    fn from(v: u16) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(i64::from(v))
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A result set under construction.
#[derive(Debug, Default)]
pub struct ResultSet {
    pub columns: Vec<(&'static str, Type)>,
    pub rows: Vec<Vec<Value>>,
}

impl ResultSet {
    pub fn new(columns: &[(&'static str, Type)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Value>) {
        debug_assert_eq!(row.len(), self.columns.len(), "row width");
        self.rows.push(row);
    }

    /// Index of a column, for tests and callers that fill by name.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|(n, _)| *n == name)
    }

    /// Writes RowDescription, the rows and `CommandComplete(tag)`.
    pub fn write(&self, out: &mut BytesMut, tag: &str) {
        write::message(out, BackendTag::RowDescription.byte(), |b| {
            b.put_i16(self.columns.len() as i16);
            for (name, ty) in &self.columns {
                b.put_slice(name.as_bytes());
                b.put_u8(0);
                b.put_u32(0); // table oid
                b.put_i16(0); // column number
                b.put_u32(ty.oid());
                b.put_i16(ty.len());
                b.put_i32(-1); // typmod
                b.put_i16(0); // text format
            }
        });
        for row in &self.rows {
            write::message(out, BackendTag::DataRow.byte(), |b| {
                b.put_i16(row.len() as i16);
                for v in row {
                    let text = match v {
                        Value::Null => {
                            b.put_i32(-1);
                            continue;
                        }
                        Value::Text(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => format!("{f:.4}"),
                    };
                    b.put_i32(text.len() as i32);
                    b.put_slice(text.as_bytes());
                }
            });
        }
        command_complete(out, tag);
    }
}

pub use crate::protocol::write::command_complete;

/// A NOTICE with a message and optional detail.
pub fn notice(out: &mut BytesMut, message: &str, detail: Option<&str>) {
    write::message(out, BackendTag::NoticeResponse.byte(), |b| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', crate::error::SqlState::SUCCESSFUL_COMPLETION.0),
            (b'M', message),
        ] {
            b.put_u8(field);
            b.put_slice(value.as_bytes());
            b.put_u8(0);
        }
        if let Some(d) = detail {
            b.put_u8(b'D');
            b.put_slice(d.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}
