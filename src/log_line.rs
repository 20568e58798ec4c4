//! The text log line, written as tracing-subscriber's default `Full` format writes it
//! (`TIME LEVEL span{fields}: target: fields`: strings quoted, numbers and `%` values bare, the
//! message first and bare with terminal control characters escaped), but without going through
//! `fmt` where it can: the default formats every field, the timestamp, the level and the spans
//! through `fmt` and escapes the message one character at a time, which was an eighth of a
//! job's instructions with the per-job line (docs/benchmark.md).
//!
//! On a terminal (ANSI styling on), and for events of the `log` crate, the default itself is
//! used: there the output is styled or normalized, and speed does not matter.

use std::cell::RefCell;
use std::fmt::{self, Debug, Write};
use std::time::{Duration, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Format, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The text format's lines (`tracing_subscriber::fmt().event_format(LineFormat::default())`).
#[derive(Debug, Clone, Copy)]
pub struct LineFormat {
    /// Lines start with the time ([`LineTime`]); off only in tests, to compare lines.
    pub timestamps: bool,
}

impl Default for LineFormat {
    fn default() -> Self {
        Self { timestamps: true }
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // tracing-log's events all have the target "log" (the default rewrites their metadata).
        if writer.has_ansi_escapes() || meta.target() == "log" {
            return if self.timestamps {
                Format::default().format_event(ctx, writer, event)
            } else {
                Format::default()
                    .without_time()
                    .format_event(ctx, writer, event)
            };
        }
        if self.timestamps {
            if LineTime.format_time(&mut writer).is_err() {
                writer.write_str("<unknown time>")?;
            }
            writer.write_char(' ')?;
        }
        writer.write_str(match *meta.level() {
            Level::TRACE => "TRACE ",
            Level::DEBUG => "DEBUG ",
            Level::INFO => " INFO ",
            Level::WARN => " WARN ",
            Level::ERROR => "ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut spans = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                spans = true;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    writer.write_char('{')?;
                    writer.write_str(&fields.fields)?;
                    writer.write_char('}')?;
                }
                writer.write_char(':')?;
            }
            if spans {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// The default's timestamp (RFC 3339 in UTC with microseconds, `2026-12-05T22:10:01.123456Z`),
/// the part down to the second formatted once a second per thread.
#[derive(Debug, Default, Clone, Copy)]
pub struct LineTime;

thread_local! {
    /// The second last formatted on this thread (since the epoch), and its text up to the `.`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for LineTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        match std::time::SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => write_since_epoch(since, w).unwrap_or_else(|| SystemTime.format_time(w)),
            Err(_) => SystemTime.format_time(w),
        }
    }
}

/// Writes the time `since` the epoch; `None` for a time the default writes its own way (years
/// past 9999: `+YYYYY`).
fn write_since_epoch(since: Duration, w: &mut Writer<'_>) -> Option<fmt::Result> {
    let (seconds, micros) = (since.as_secs(), since.subsec_micros());
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != seconds {
            let at = i64::try_from(seconds)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .filter(|at| at.year() <= 9999)?;
            text.clear();
            let written = write!(
                text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            );
            *second = if written.is_ok() { seconds } else { u64::MAX };
        }
        let mut tail = *b"000000Z";
        let mut rest = micros;
        for digit in tail[..6].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        Some(
            w.write_str(text)
                .and_then(|()| w.write_str(std::str::from_utf8(&tail).unwrap_or("Z"))),
        )
    })
}

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
            // Rare: the default's own rendering (with the error's sources), on the same line.
            LineVisitor::Plain(plain) => {
                if plain.result.is_ok() {
                    let mut default = DefaultVisitor::new(plain.writer.by_ref(), plain.first);
                    default.record_error(field, value);
                    plain.result = default.finish();
                    plain.first = false;
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

    fn formatted(ours: bool) -> String {
        let lines = Lines::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false)
            .without_time();
        if ours {
            let ours = builder
                .event_format(LineFormat { timestamps: false })
                .fmt_fields(LineFields);
            tracing::subscriber::with_default(ours.finish(), log_everything);
        } else {
            tracing::subscriber::with_default(builder.finish(), log_everything);
        }
        lines.text()
    }

    fn time(timer: impl FormatTime) -> String {
        let mut text = String::new();
        let _ = timer.format_time(&mut Writer::new(&mut text));
        text
    }

    #[test]
    fn the_time_is_written_as_the_default_writes_it() {
        // Taken one after the other: retried if a second ends between the two.
        for _ in 0..5 {
            let (ours, again, default) = (time(LineTime), time(LineTime), time(SystemTime));
            assert_eq!(ours.len(), default.len(), "{ours} against {default}");
            if ours[..20] != default[..20] || again[..20] != ours[..20] {
                continue;
            }
            for text in [&ours, &again] {
                assert!(text.ends_with('Z'), "{text}");
                assert!(text[20..26].bytes().all(|b| b.is_ascii_digit()), "{text}");
            }
            assert!(again[20..26] >= ours[20..26], "{ours} then {again}");
            return;
        }
        panic!("the two clocks never agreed to the second");
    }

    #[test]
    fn times_are_written_to_the_microsecond() {
        let at = |seconds, nanos| {
            let mut text = String::new();
            let written =
                write_since_epoch(Duration::new(seconds, nanos), &mut Writer::new(&mut text));
            assert!(matches!(written, Some(Ok(()))), "{seconds}");
            text
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7_999), "2000-02-29T00:00:00.000007Z");
        // The same second again (from the cache), then the next.
        assert_eq!(at(951_782_400, 999_999_999), "2000-02-29T00:00:00.999999Z");
        assert_eq!(at(951_782_401, 120_000_000), "2000-02-29T00:00:01.120000Z");
        assert_eq!(at(253_402_300_799, 1_000), "9999-12-31T23:59:59.000001Z");
        let mut text = String::new();
        assert!(
            write_since_epoch(
                Duration::from_secs(253_402_300_800),
                &mut Writer::new(&mut text)
            )
            .is_none()
        );
    }

    #[test]
    fn lines_are_written_exactly_as_the_default_writes_them() {
        let default = formatted(false);
        assert_eq!(default.lines().count(), 4, "{default}");
        assert!(default.contains("\\x1b[2J"), "{default}");
        assert_eq!(formatted(true), default);
    }
}
