//! How `consume` prints a record: a text template, or a JSON line.

use base64::Engine as _;
use serde_json::{Map, Value};
use streambus_client::ConsumerRecord;

/// A record field a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Topic,
    Partition,
    Offset,
    Timestamp,
    Key,
    Value,
    Headers,
}

impl Field {
    const ALL: [(&'static str, Field); 7] = [
        ("topic", Field::Topic),
        ("partition", Field::Partition),
        ("offset", Field::Offset),
        ("timestamp", Field::Timestamp),
        ("key", Field::Key),
        ("value", Field::Value),
        ("headers", Field::Headers),
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed `--format` template like `{offset} {key} {value}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template(Vec<Part>);

impl Template {
    /// Parses a template: `{field}` for a field, `{{`/`}}` for braces, `\t`, `\n`, `\\`.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let rest = chars.as_str();
                    if let Some(after) = rest.strip_prefix('{') {
                        text.push('{');
                        chars = after.chars();
                        continue;
                    }
                    let Some(end) = rest.find('}') else {
                        return Err("a `{` is not closed (write `{{` for a brace)".into());
                    };
                    let name = &rest[..end];
                    let field = Field::ALL
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, f)| *f)
                        .ok_or_else(|| {
                            let names: Vec<String> =
                                Field::ALL.iter().map(|(n, _)| format!("{{{n}}}")).collect();
                            format!("unknown field {{{name}}}: use {}", names.join(" "))
                        })?;
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(field));
                    chars = rest[end + 1..].chars();
                }
                '}' => {
                    let rest = chars.as_str();
                    let Some(after) = rest.strip_prefix('}') else {
                        return Err("a lone `}` (write `}}` for a brace)".into());
                    };
                    text.push('}');
                    chars = after.chars();
                }
                '\\' => match chars.next() {
                    Some('t') => text.push('\t'),
                    Some('n') => text.push('\n'),
                    Some('\\') => text.push('\\'),
                    Some(other) => {
                        text.push('\\');
                        text.push(other);
                    }
                    None => text.push('\\'),
                },
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self(parts))
    }

    /// Appends `record` as text, then a newline, to `out`.
    pub(crate) fn render(&self, record: &ConsumerRecord, out: &mut Vec<u8>) {
        for part in &self.0 {
            match part {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Field(Field::Topic) => out.extend_from_slice(record.topic.as_bytes()),
                Part::Field(Field::Partition) => {
                    out.extend_from_slice(record.partition.to_string().as_bytes());
                }
                Part::Field(Field::Offset) => {
                    out.extend_from_slice(record.offset.to_string().as_bytes());
                }
                Part::Field(Field::Timestamp) => {
                    out.extend_from_slice(record.timestamp.to_string().as_bytes());
                }
                Part::Field(Field::Key) => out.extend_from_slice(record.key()),
                Part::Field(Field::Value) => out.extend_from_slice(record.value()),
                Part::Field(Field::Headers) => {
                    for (i, (k, v)) in record.headers().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(k);
                        out.push(b'=');
                        out.extend_from_slice(v);
                    }
                }
            }
        }
        out.push(b'\n');
    }
}

/// Inserts `bytes` as `name` when they are UTF-8, else base64 as `name_base64`.
fn insert_bytes(map: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => map.insert(name.to_owned(), Value::String(s.to_owned())),
        Err(_) => map.insert(
            format!("{name}_base64"),
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
}

/// `record` as one JSON object: `topic`, `partition`, `offset`, `timestamp` (Unix ns), `key`
/// (null when empty), `value`, `headers` (an array of `{key, value}`); a key or value that is
/// not UTF-8 is base64 under the name with `_base64` appended.
pub(crate) fn json(record: &ConsumerRecord) -> Value {
    let mut m = Map::new();
    m.insert("topic".into(), Value::from(&*record.topic));
    m.insert("partition".into(), Value::from(record.partition));
    m.insert("offset".into(), Value::from(record.offset));
    m.insert("timestamp".into(), Value::from(record.timestamp));
    if record.key().is_empty() {
        m.insert("key".into(), Value::Null);
    } else {
        insert_bytes(&mut m, "key", record.key());
    }
    insert_bytes(&mut m, "value", record.value());
    let headers = record
        .headers()
        .map(|(k, v)| {
            let mut h = Map::new();
            insert_bytes(&mut h, "key", k);
            insert_bytes(&mut h, "value", v);
            Value::Object(h)
        })
        .collect();
    m.insert("headers".into(), Value::Array(headers));
    Value::Object(m)
}

/// Prints rows as a table: columns left-aligned, two spaces apart.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            l.extend(std::iter::repeat_n(' ', w.saturating_sub(cell.len())));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        let t = Template::parse("{offset}\t{{x}} {value}\\n").expect("valid");
        assert_eq!(
            t.0,
            vec![
                Part::Field(Field::Offset),
                Part::Text("\t{x} ".into()),
                Part::Field(Field::Value),
                Part::Text("\n".into()),
            ]
        );
        assert_eq!(
            Template::parse("a\\tb").expect("valid").0,
            vec![Part::Text("a\tb".into())]
        );
        assert!(
            Template::parse("{nope}")
                .unwrap_err()
                .contains("unknown field {nope}")
        );
        assert!(Template::parse("{value").is_err());
        assert!(Template::parse("value}").is_err());
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["NAME", "PARTITIONS"],
            &[
                vec!["orders".into(), "3".into()],
                vec!["a".into(), "12".into()],
            ],
        );
        assert_eq!(t, "NAME    PARTITIONS\norders  3\na       12\n");
    }
}
