//! The fields of a text log line, written as tracing-subscriber's default writes them
//! (`name=value`, strings quoted, numbers and `%` values bare, the message first and bare with
//! terminal control characters escaped), but with one write per field: the default formats
//! every field through `fmt` and escapes the message one character at a time, which was a
//! tenth of a job's instructions with the per-job line (docs/benchmark.md).
//!
//! On a terminal (ANSI styling on) the default itself is used: there the names are styled, and
//! speed does not matter.

use std::fmt::{self, Debug, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};

/// The text format's fields (`tracing_subscriber::fmt().fmt_fields(LineFields)`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LineFields;

impl<'a> MakeVisitor<Writer<'a>> for LineFields {
    type Visitor = LineVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> LineVisitor<'a> {
        if writer.has_ansi_escapes() {
            LineVisitor::Styled(DefaultFields::new().make_visitor(writer))
        } else {
            LineVisitor::Plain(Plain {
                writer,
                first: true,
                result: Ok(()),
            })
        }
    }
}

pub enum LineVisitor<'a> {
    Plain(Plain<'a>),
    Styled(DefaultVisitor<'a>),
}

pub struct Plain<'a> {
    writer: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl Plain<'_> {
    /// Writes the separator and `name=` (nothing for the message); `None` for a field that is
    /// not written (the `log.` metadata of events from the `log` crate, shown elsewhere).
    fn start(&mut self, field: &Field) -> Option<bool> {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return None;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(' ');
        }
        if name == "message" {
            return Some(true);
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self
            .result
            .and_then(|()| self.writer.write_str(name))
            .and_then(|()| self.writer.write_char('='));
        Some(false)
    }

    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        if self.start(field).is_some() {
            self.write(|w| write!(w, "{value}"));
        }
    }

    fn write(&mut self, write: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = write(&mut self.writer);
        }
    }
}

impl Visit for LineVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let plain = match self {
            LineVisitor::Styled(styled) => return styled.record_str(field, value),
            LineVisitor::Plain(plain) => plain,
        };
        match plain.start(field) {
            None => {}
            Some(true) => plain.write(|w| Escaping(w).write_str(value)),
            Some(false) if value.bytes().all(quoted_as_is) => {
                plain.write(|w| {
                    w.write_char('"')?;
                    w.write_str(value)?;
                    w.write_char('"')
                });
            }
            Some(false) => plain.write(|w| write!(w, "{value:?}")),
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match self {
            LineVisitor::Styled(styled) => styled.record_u64(field, value),
            LineVisitor::Plain(plain) => plain.number(field, value),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        match self {
            LineVisitor::Styled(styled) => styled.record_i64(field, value),
            LineVisitor::Plain(plain) => plain.number(field, value),
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        match self {
            LineVisitor::Styled(styled) => styled.record_bool(field, value),
            LineVisitor::Plain(plain) => {
                if plain.start(field).is_some() {
                    plain.write(|w| w.write_str(if value { "true" } else { "false" }));
                }
            }
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        match self {
            LineVisitor::Styled(styled) => styled.record_error(field, value),
            // Rare: the default's own rendering (with the error's sources), escaped like it.
            LineVisitor::Plain(plain) => {
                let mut default = String::new();
                let mut visitor = DefaultFields::new().make_visitor(Writer::new(&mut default));
                visitor.record_error(field, value);
                if visitor.finish().is_ok() && plain.start(field).is_some() {
                    let value = default
                        .split_once('=')
                        .map_or(default.as_str(), |(_, value)| value);
                    plain.write(|w| w.write_str(value));
                }
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        let plain = match self {
            LineVisitor::Styled(styled) => return styled.record_debug(field, value),
            LineVisitor::Plain(plain) => plain,
        };
        match plain.start(field) {
            None => {}
            Some(true) => plain.write(|w| write!(Escaping(w), "{value:?}")),
            Some(false) => plain.write(|w| write!(w, "{value:?}")),
        }
    }
}

impl VisitOutput<fmt::Result> for LineVisitor<'_> {
    fn finish(self) -> fmt::Result {
        match self {
            LineVisitor::Styled(styled) => styled.finish(),
            LineVisitor::Plain(plain) => plain.result,
        }
    }
}

impl VisitFmt for LineVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        match self {
            LineVisitor::Styled(styled) => styled.writer(),
            LineVisitor::Plain(plain) => &mut plain.writer,
        }
    }
}

/// A byte that `{:?}` of a string writes as it is.
fn quoted_as_is(byte: u8) -> bool {
    byte == b' ' || (byte.is_ascii_graphic() && byte != b'"' && byte != b'\\')
}

/// Writes text with the characters a terminal could act on escaped, as tracing-subscriber
/// escapes a message: ESC, BEL, BS, FF, DEL and the C1 controls (U+0080–U+009F). Text without
/// any (their UTF-8 bytes: 0x07, 0x08, 0x0C, 0x1B, 0x7F, and 0xC2 leading a C1) is written in
/// one piece.
struct Escaping<'w, 'a>(&'w mut Writer<'a>);

impl Write for Escaping<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if !text
            .bytes()
            .any(|b| matches!(b, 0x07 | 0x08 | 0x0c | 0x1b | 0x7f | 0xc2))
        {
            return self.0.write_str(text);
        }
        for ch in text.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", u32::from(ch))?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Lines {
        type Writer = Lines;
        fn make_writer(&self) -> Lines {
            self.clone()
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into()
        }
    }

    #[derive(Debug)]
    enum Status {
        Confirmed,
        #[allow(dead_code, reason = "only shown by Debug")]
        Lost(&'static str),
    }

    #[derive(Debug)]
    struct Failure;

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the \x1b[31mbroker\x1b[0m went away")
        }
    }

    impl std::error::Error for Failure {}

    /// Everything a line of ours carries: strings (plain, quoted, escaped, non-ASCII), numbers,
    /// booleans, `%` and `?` values, errors, a span's fields, messages with control characters.
    fn log_everything() {
        let span = tracing::info_span!("job", correlation_id = %"c-1 \"quoted\"");
        let _entered = span.enter();
        tracing::info!(
            correlation_id = "abc-123",
            connector = %"bench",
            exit_code = 0_i64,
            attempts = 1_u64,
            duration_ms = 12_u64,
            redelivered = false,
            reply = ?Status::Confirmed,
            settlement = ?Status::Lost("window"),
            "{}",
            "published to topic a/b (QoS 1)"
        );
        tracing::warn!(
            topic = "tab\there, ümlaut, \u{85}, bell\x07",
            error = &Failure as &(dyn std::error::Error + 'static),
            "message with \x1b[2J escape, \x07\x08\x0c\x7f, C1 \u{9b}, and ümlaut"
        );
        tracing::warn!(r#type = "raw", ratio = 0.5_f64, "constant message");
        tracing::info!(message = "a message as a field", empty = "");
    }

    fn formatted(fields: bool) -> String {
        let lines = Lines::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false)
            .without_time();
        if fields {
            tracing::subscriber::with_default(
                builder.fmt_fields(LineFields).finish(),
                log_everything,
            );
        } else {
            tracing::subscriber::with_default(builder.finish(), log_everything);
        }
        lines.text()
    }

    #[test]
    fn lines_are_written_exactly_as_the_default_writes_them() {
        let default = formatted(false);
        assert_eq!(default.lines().count(), 4, "{default}");
        assert!(default.contains("\\x1b[2J"), "{default}");
        assert_eq!(formatted(true), default);
    }
}
