//! Logging setup: `tracing` to stderr, as text or JSON lines. Stdout stays for command output.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

use crate::cli::{GlobalArgs, LogFormat};

pub fn init(global: &GlobalArgs) {
    let default = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    // RUST_LOG wins, so a user can turn on one module without touching the others.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match global.log_format {
        LogFormat::Text if crate::term::fancy_stderr() => {
            builder.with_ansi(true).with_target(false).try_init()
        }
        LogFormat::Text => builder
            .with_ansi(false)
            .with_target(false)
            .fmt_fields(PlainFields)
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The fields of a text log line without colours, exactly as tracing-subscriber's default writes them, but
/// without its styling machinery: with colours off it still wraps every field name and `=` in a style that
/// prints nothing, which was ~9k of the ~23k instructions of serve-proxy's per-request line (18 fields).
/// Plain strings and formatted values (numbers and booleans come as these, through `Visit`'s defaults) are
/// written here; the message, escapes, errors and raw identifiers go to the default visitor, so the bytes are the same either way (a test compares them).
pub struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        PlainVisitor {
            writer: target,
            is_empty: true,
            result: Ok(()),
        }
    }
}

pub struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// `name=` after the separating space, for the fields the default visitor would write the same way;
    /// `false` for those it treats specially (left to it).
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name == "message" || name.starts_with("r#") || name.starts_with("log.") {
            return false;
        }
        if self.result.is_ok() {
            let pad = if self.is_empty { "" } else { " " };
            self.is_empty = false;
            self.result = self
                .writer
                .write_str(pad)
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='));
        }
        true
    }

    fn delegate(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        // It writes something for every field but the `log.*` metadata of events that came from `log`.
        if !field.name().starts_with("log.") {
            self.is_empty = false;
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // `Debug` of a str quotes it and escapes `"`, `\`, control and some non-ASCII characters; printable
        // ASCII otherwise stands for itself.
        let plain = value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
        if !plain || !self.start(field) {
            return self.delegate(field, |v| v.record_str(field, value));
        }
        if self.result.is_ok() {
            self.result = self
                .writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.start(field) {
            return self.delegate(field, |v| v.record_debug(field, value));
        }
        if self.result.is_ok() {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("could not reach the upstream")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Every kind of field the project logs, and the awkward ones, through `format` (no time, no colours).
    fn lines_with<F>(fields: F) -> String
    where
        F: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let (path, none): (&str, Option<&str>) = ("/v1/messages", None);
            tracing::info!(
                request_id = %"req_1",
                path = path,
                status = 200u16,
                delta = -3i64,
                stream = true,
                ttft_ms = 1.5f64,
                whole = 2.0f64,
                replica = none,
                model = "SmolLM2 \"135M\" ü\u{1b}[31m",
                r#type = "raw",
                list = ?vec![1, 2],
                "request"
            );
            tracing::warn!(
                error = &Outer(std::io::Error::other("refused")) as &dyn std::error::Error,
                "plain \u{1b}[2J message"
            );
            tracing::info!("only a message {}", 7);
            let span = tracing::info_span!("conn", peer = "10.0.0.1", n = 3u64);
            let _g = span.enter();
            tracing::info!(k = "v", "in a span");
        });
        let text = out.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn plain_fields_write_what_the_default_writes() {
        let default = lines_with(tracing_subscriber::fmt::format::DefaultFields::new());
        let plain = lines_with(PlainFields);
        assert_eq!(plain, default);
        // The comparison saw every kind of field.
        for part in [
            "request_id=req_1",
            "status=200",
            "delta=-3",
            "stream=true",
            "ttft_ms=1.5",
            "whole=2.0",
            "type=\"raw\"",
            "list=[1, 2]",
            "error.sources=",
            "conn{peer=\"10.0.0.1\" n=3}",
        ] {
            assert!(plain.contains(part), "{part} in {plain}");
        }
        assert!(!plain.contains("replica"), "{plain}");
    }
}
