//! A YAML stream cut into its documents, each keeping its original text.
//!
//! The stream is split on `---` lines here rather than by the YAML parser so that a document the
//! injector does not change can be written back byte for byte (comments, quoting and key order
//! included), and so that a parse error can be reported with the document's number and the line
//! in the whole file, not in the document.

use serde_yaml::Value;

/// One document of the stream.
#[derive(Debug)]
pub struct Document<'a> {
    /// 1-based position in the stream, as a reader counts documents (a blank or comment-only
    /// preamble before the first `---` is not counted).
    pub number: usize,
    /// 1-based line of the file where the document's text starts.
    pub line: usize,
    /// The `---` line that opened it (with its line break), or "" for the first document.
    pub separator: &'a str,
    /// The document's text, written back unchanged when nothing is injected.
    pub body: &'a str,
}

/// A document that is not valid YAML. `line` and `column` are in the whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub document: usize,
    pub line: usize,
    pub column: usize,
    /// The parser's message, with any line numbers in it moved to file lines.
    pub message: String,
}

/// Cuts `text` into documents. Concatenating every `separator` and `body` gives `text` back.
pub fn split(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0; // byte offset of the current body
    let mut start_line = 1;
    let mut separator = "";
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) {
            docs.push((separator, &text[start..offset], start_line));
            // `--- {a: 1}`: the rest of the line belongs to the document.
            let rest = &line[3..];
            let sep_len = if rest.trim().is_empty() || rest.trim_start().starts_with('#') { line.len() } else { 3 };
            separator = &text[offset..offset + sep_len];
            start = offset + sep_len;
            start_line = if sep_len == line.len() { i + 2 } else { i + 1 };
        }
        offset += line.len();
    }
    docs.push((separator, &text[start..], start_line));

    let mut out = Vec::with_capacity(docs.len());
    let mut number = 0;
    for (k, (separator, body, line)) in docs.into_iter().enumerate() {
        // Text before the first `---` that holds no content is a preamble, not a document.
        if !(k == 0 && out.is_empty() && is_blank(body) && text.len() > body.len()) {
            number += 1;
        }
        out.push(Document { number, line, separator, body });
    }
    out
}

impl Document<'_> {
    /// The document as a YAML value; a blank document is `Null`.
    pub fn parse(&self) -> Result<Value, ParseError> {
        if is_blank(self.body) {
            return Ok(Value::Null);
        }
        serde_yaml::from_str(self.body).map_err(|e| {
            let (line, column) = e.location().map_or((self.line, 1), |l| (self.line + l.line() - 1, l.column()));
            // The location leads the error's own text; it is shown once, by the caller.
            let message =
                shift_lines(&e.to_string(), self.line - 1).replacen(&format!(" at line {line} column {column}"), "", 1);
            ParseError { document: self.number, line, column, message }
        })
    }
}

/// `---` alone, or followed by a space, tab or line break (`----` is a plain scalar).
fn is_separator(line: &str) -> bool {
    line.starts_with("---") && line[3..].chars().next().is_none_or(|c| c == ' ' || c == '\t' || c == '\n' || c == '\r')
}

/// Only whitespace and comments.
fn is_blank(body: &str) -> bool {
    body.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    })
}

/// Adds `by` to every number following "line " in the parser's message, which counts lines from
/// the start of the document.
fn shift_lines(message: &str, by: usize) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("line ") {
        let (head, tail) = rest.split_at(i + 5);
        out.push_str(head);
        let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejoin(docs: &[Document]) -> String {
        docs.iter().map(|d| format!("{}{}", d.separator, d.body)).collect()
    }

    #[test]
    fn splitting_keeps_every_byte() {
        for text in [
            "",
            "a: 1\n",
            "---\na: 1\n---\nb: 2",
            "# head\n---\na: 1\n--- # two\nb: 2\n---\n",
            "--- {a: 1}\n---\n- x\n----: y\n",
        ] {
            assert_eq!(rejoin(&split(text)), text, "{text:?}");
        }
    }

    #[test]
    fn documents_are_numbered_and_located() {
        let docs = split("# preamble\n---\na: 1\n---\n\nb: 2\n");
        let shown: Vec<_> = docs.iter().map(|d| (d.number, d.line)).collect();
        assert_eq!(shown, [(0, 1), (1, 3), (2, 5)]);
        let docs = split("a: 1\n---\nb: 2\n");
        assert_eq!(docs.iter().map(|d| d.number).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn parse_errors_carry_file_lines() {
        let docs = split("a: 1\n---\nkind: Pod\nmetadata:\n  name: [x\n");
        let e = docs[1].parse().unwrap_err();
        assert_eq!(e.document, 2);
        assert!(e.line >= 5, "{e:?}");
        assert!(e.message.contains("while parsing a flow sequence at line 5"), "{e:?}");
    }
}
