//! Reading Kubernetes-format YAML: a stream of documents, each turned into a JSON value (the same
//! form a Kubernetes watch delivers, so both adapters parse objects with one code path) together
//! with the line of every field, so a finding or an error can say where it is.
//!
//! serde_yaml gives values but not positions; saphyr-parser's events carry both, so the value is
//! built here from the events. Plain scalars are resolved as YAML 1.1 does for Kubernetes (go-yaml):
//! `true`/`false` (and `yes`/`no`/`on`/`off`), `null`/`~`/empty, integers (decimal, `0x`, `0o`),
//! floats; everything quoted or not matching is a string.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle};
use serde_json::{Map, Number, Value};

/// A document that could not be read as YAML.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: line {line}: {reason}")]
pub struct Error {
    pub origin: String,
    pub line: usize,
    pub reason: String,
}

/// Where the fields of one document are: `spec.http[0].route[1].weight` → line (1-based).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lines {
    /// The line the document's first node starts on.
    pub start: usize,
    fields: HashMap<String, usize>,
}

impl Lines {
    /// The line of `path`, or of its nearest ancestor that has one (a field the writer left out
    /// is reported where its parent is), or the document's first line.
    pub fn line(&self, path: &str) -> usize {
        let mut p = path;
        loop {
            if let Some(&l) = self.fields.get(p) {
                return l;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.start,
            }
        }
    }
}

/// One document of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub value: Value,
    pub lines: Lines,
}

/// A node being built: the container and, for a mapping, the key waiting for its value.
enum Frame {
    Seq { path: String, items: Vec<Value> },
    Map { path: String, map: Map<String, Value>, key: Option<String> },
}

/// Parses every document of `text`. Empty documents (only comments, or a stray `---`) are skipped.
pub fn documents(origin: &str, text: &str) -> Result<Vec<Document>, Error> {
    let mut docs = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut lines = Lines::default();
    let mut anchors: HashMap<usize, Value> = HashMap::new();
    // Anchored containers being built: (stack depth, anchor id).
    let mut open_anchors: Vec<(usize, usize)> = Vec::new();
    let mut root: Option<Value> = None;
    let err = |line: usize, reason: String| Error { origin: origin.to_string(), line, reason };

    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| err(e.marker().line(), e.info().to_string()))?;
        let line = span.start.line();
        // A node (scalar or container) starts: record where, for the path it will have.
        let path_for_child = |stack: &mut Vec<Frame>, lines: &mut Lines| -> Result<Option<String>, Error> {
            match stack.last_mut() {
                None => {
                    lines.start = line;
                    Ok(Some(String::new()))
                }
                Some(Frame::Seq { path, items }) => {
                    let p = format!("{path}[{}]", items.len());
                    lines.fields.insert(p.clone(), line);
                    Ok(Some(p))
                }
                Some(Frame::Map { path, key: Some(k), .. }) => {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    Ok(Some(p))
                }
                // This node is a key.
                Some(Frame::Map { key: None, .. }) => Ok(None),
            }
        };
        match event {
            Event::DocumentStart(_) => {
                stack.clear();
                lines = Lines::default();
                anchors.clear();
                root = None;
            }
            Event::DocumentEnd => {
                if let Some(value) = root.take() {
                    if !value.is_null() {
                        docs.push(Document { value, lines: std::mem::take(&mut lines) });
                    }
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let is_key = path_for_child(&mut stack, &mut lines)?.is_none();
                if is_key {
                    if let Some(Frame::Map { path, key, .. }) = stack.last_mut() {
                        let k = text.to_string();
                        let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                        lines.fields.insert(p, line);
                        *key = Some(k);
                    }
                    continue;
                }
                let quoted = style != ScalarStyle::Plain
                    || tag.as_ref().is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                let value = if quoted { Value::String(text.to_string()) } else { resolve_plain(&text) };
                if anchor > 0 {
                    anchors.insert(anchor, value.clone());
                }
                push(&mut stack, &mut root, value);
            }
            Event::Alias(id) => {
                let is_key = path_for_child(&mut stack, &mut lines)?.is_none();
                let value = anchors.get(&id).cloned().ok_or_else(|| err(line, "unknown alias".into()))?;
                if is_key {
                    return Err(err(line, "an alias as a mapping key is not supported".into()));
                }
                push(&mut stack, &mut root, value);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let is_seq = matches!(event, Event::SequenceStart(..));
                let Some(path) = path_for_child(&mut stack, &mut lines)? else {
                    return Err(err(line, "a mapping or sequence as a mapping key is not supported".into()));
                };
                if anchor > 0 {
                    open_anchors.push((stack.len(), anchor));
                }
                stack.push(if is_seq {
                    Frame::Seq { path, items: Vec::new() }
                } else {
                    Frame::Map { path, map: Map::new(), key: None }
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let value = match stack.pop() {
                    Some(Frame::Seq { items, .. }) => Value::Array(items),
                    Some(Frame::Map { map, .. }) => Value::Object(map),
                    None => return Err(err(line, "unbalanced YAML events".into())),
                };
                if open_anchors.last().is_some_and(|&(depth, _)| depth == stack.len()) {
                    let (_, id) = open_anchors.pop().expect("checked above");
                    anchors.insert(id, value.clone());
                }
                push(&mut stack, &mut root, value);
            }
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
    Ok(docs)
}

fn push(stack: &mut [Frame], root: &mut Option<Value>, value: Value) {
    match stack.last_mut() {
        None => *root = Some(value),
        Some(Frame::Seq { items, .. }) => items.push(value),
        Some(Frame::Map { map, key, .. }) => {
            if let Some(k) = key.take() {
                map.insert(k, value);
            }
        }
    }
}

/// YAML 1.1 resolution of an unquoted scalar, as Kubernetes' YAML reader does it.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => return Value::Bool(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => return Value::Bool(false),
        _ => {}
    }
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let radix = |prefix: &str, radix: u32| {
        digits.strip_prefix(prefix).and_then(|d| i64::from_str_radix(d, radix).ok()).map(|v| if neg { -v } else { v })
    };
    if let Some(v) = radix("0x", 16).or_else(|| radix("0o", 8)) {
        return Value::Number(v.into());
    }
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(v) = s.parse::<i64>() {
            return Value::Number(v.into());
        }
        if let Ok(v) = s.parse::<u64>() {
            return Value::Number(v.into());
        }
    }
    let looks_float = digits.bytes().any(|b| b.is_ascii_digit())
        && digits.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_float {
        if let Some(n) = s.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_lines_of_every_document() {
        let text = "\
# leading comment
apiVersion: v1
kind: Service
metadata:
  name: reviews
  labels: {app: reviews}
spec:
  ports:
  - port: 9080
    name: http
---
---
kind: VirtualService
spec:
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
";
        let docs = documents("f.yaml", text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].value["spec"]["ports"][0]["port"], 9080);
        assert_eq!(docs[0].value["metadata"]["labels"]["app"], "reviews");
        assert_eq!(docs[0].lines.start, 2);
        assert_eq!(docs[0].lines.line("metadata.name"), 5);
        assert_eq!(docs[0].lines.line("spec.ports[0].name"), 10);
        assert_eq!(docs[1].lines.line("spec.http[0].route[0].destination.subset"), 17);
        assert_eq!(docs[1].lines.line("spec.http[0].route[0].weight"), 18);
        // A field that is absent is reported at its nearest ancestor.
        assert_eq!(docs[1].lines.line("spec.http[0].route[0].destination.port.number"), 17);
        assert_eq!(docs[1].lines.line("nothing.here"), 13);
    }

    #[test]
    fn scalars_resolve_as_kubernetes_reads_them() {
        let docs =
            documents("f", "a: '80'\nb: 80\nc: yes\nd: ~\ne: 1.5\nf: 0x1f\ng: v1\nh: \"true\"\ni: -3\n").unwrap();
        let v = &docs[0].value;
        assert_eq!(v["a"], "80");
        assert_eq!(v["b"], 80);
        assert_eq!(v["c"], true);
        assert!(v["d"].is_null());
        assert_eq!(v["e"], 1.5);
        assert_eq!(v["f"], 31);
        assert_eq!(v["g"], "v1");
        assert_eq!(v["h"], "true");
        assert_eq!(v["i"], -3);
    }

    #[test]
    fn anchors_and_aliases_are_expanded() {
        let docs = documents("f", "a: &x {k: 1}\nb: *x\nc: &s hi\nd: *s\n").unwrap();
        assert_eq!(docs[0].value["b"]["k"], 1);
        assert_eq!(docs[0].value["d"], "hi");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = documents("bad.yaml", "a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert_eq!(e.origin, "bad.yaml");
        assert!(e.line >= 2, "{e}");
    }
}
