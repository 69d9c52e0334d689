//! The process's log on stderr: plain text, coloured only on a terminal and never under
//! `NO_COLOR`, or one JSON object per line; which lines it keeps (`--log-level`, unless `RUST_LOG`
//! says otherwise); and, in JSON, each line's fields: the event's own and those of the spans it is
//! in, every name once.

use std::{ffi::OsString, fmt, io::IsTerminal, time::SystemTime};

use serde_json::{Map, Value};
use tracing::{field::Field, Event, Subscriber};
use tracing_subscriber::{
    filter::EnvFilter,
    fmt::{
        format::{JsonFields, Writer},
        FmtContext, FormatEvent, FormattedFields,
    },
    registry::LookupSpan,
};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL span{fields}: target: message fields`, as people read it.
    #[default]
    Text,
    /// One JSON object per line, as log collectors read it.
    Json,
}

/// The least severe lines kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, clap::ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// This crate's modules, the ones a level more verbose than `info` is for.
const OWN_TARGET: &str = "caption_cascade";

/// The filter of the log's lines: `RUST_LOG` when it is set and valid (it can name modules), else
/// `level`. Above `info`, `level` is this program's only: the libraries under it (HTTP/2, TLS)
/// would bury its lines in theirs, and `RUST_LOG` still reaches them. Also says why a `RUST_LOG`
/// was not used, when it was not.
pub(super) fn filter(level: LogLevel, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let mut ignored = None;
    if let Some(directives) = rust_log.filter(|d| !d.trim().is_empty()) {
        match EnvFilter::builder().parse(directives) {
            Ok(filter) => return (filter, None),
            Err(e) => ignored = Some(format!("RUST_LOG ({directives:?}) ignored, --log-level applies: {e}")),
        }
    }
    let directives =
        if level > LogLevel::Info { format!("info,{OWN_TARGET}={}", level.name()) } else { level.name().to_string() };
    (EnvFilter::new(directives), ignored)
}

/// Whether text lines are coloured: on a terminal only, and not when `NO_COLOR` is set to
/// anything but the empty string (no-color.org).
pub(super) fn colour(stderr_is_terminal: bool, no_color: Option<OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Whether this process's stderr is coloured in text mode.
pub(super) fn stderr_colour() -> bool {
    colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"))
}

/// A JSON line: `time`, `level`, `message`, the fields of the event and of the spans it is in
/// (outermost first, an inner one's value replacing an outer one's of the same name, the event's
/// replacing them all), then `target`. Span fields are kept as [`JsonFields`] formats them.
pub(super) struct JsonLine;

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(formatted) = extensions.get::<FormattedFields<JsonFields>>() else { continue };
                if let Ok(Value::Object(span_fields)) = serde_json::from_str::<Value>(&formatted.fields) {
                    fields.extend(span_fields);
                }
            }
        }
        event.record(&mut FieldMap(&mut fields));
        let meta = event.metadata();
        let message = fields.remove("message").unwrap_or(Value::String(String::new()));
        let line = line(meta.level().as_str(), message, fields, meta.target());
        writeln!(writer, "{line}")
    }
}

/// One JSON line, its keys in the order people look for them.
pub(super) fn line(level: &str, message: Value, fields: Map<String, Value>, target: &str) -> String {
    let time = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let mut out = format!("{{\"time\":{},\"level\":{},\"message\":{message}", Value::from(time), Value::from(level));
    for (name, value) in fields {
        if !matches!(name.as_str(), "time" | "level" | "target") {
            out.push_str(&format!(",{}:{value}", Value::from(name)));
        }
    }
    out.push_str(&format!(",\"target\":{}}}", Value::from(target)));
    out
}

/// An event's fields into a JSON map, each by its name; a later one of the same name replaces it.
struct FieldMap<'a>(&'a mut Map<String, Value>);

impl FieldMap<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_string(), value);
    }
}

impl tracing::field::Visit for FieldMap<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::{colour, filter, line, LogLevel};
    use serde_json::{json, Map, Value};

    #[test]
    fn rust_log_wins_over_the_level_unless_unset_empty_or_invalid() {
        let shown = |level, rust_log| {
            let (filter, ignored) = filter(level, rust_log);
            (filter.to_string(), ignored.is_some())
        };
        assert_eq!(shown(LogLevel::Warn, None), ("warn".into(), false));
        assert_eq!(shown(LogLevel::Info, Some("")), ("info".into(), false));
        assert_eq!(shown(LogLevel::Warn, Some("debug,h2=off")), ("h2=off,debug".into(), false));
        assert_eq!(shown(LogLevel::Debug, None), ("caption_cascade=debug,info".into(), false));
        assert_eq!(shown(LogLevel::Off, None), ("off".into(), false));
        let (fallback, why) = shown(LogLevel::Error, Some("caption_cascade=loud"));
        assert_eq!((fallback.as_str(), why), ("error", true));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())), "an empty NO_COLOR is unset");
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn a_json_line_has_each_name_once_and_escapes_what_it_holds() {
        let mut fields = Map::new();
        fields.insert("key".into(), json!("a\nb\u{1b}[2J"));
        fields.insert("level".into(), json!("forged"));
        fields.insert("duration_ms".into(), json!(3));
        let text = line("INFO", json!("answered"), fields, "caption_cascade::api::observe");
        assert!(!text.contains('\n') && !text.contains('\u{1b}'), "{text}");
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["level"], "INFO", "a field cannot pass for the line's own: {text}");
        assert_eq!(parsed["key"], "a\nb\u{1b}[2J");
        assert_eq!(parsed["duration_ms"], 3);
        assert_eq!(text.matches("\"level\"").count(), 1, "{text}");
        assert!(text.starts_with("{\"time\":"), "{text}");
    }
}
