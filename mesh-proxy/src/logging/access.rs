//! Access-log lines off the request path. A data-plane thread formats its line into a reusable
//! thread-local buffer and appends it to a shared, bounded batch (a lock held for one copy); a
//! writer thread writes the batch to stderr every [`FLUSH_INTERVAL`] (Envoy's
//! `--file-flush-interval-msec` default), or as soon as [`FLUSH_AT`] bytes wait. A request never
//! waits for stderr: when the writer falls behind (a slow or stuck reader of stderr) and
//! [`MAX_PENDING`] bytes wait, further lines are dropped and counted
//! (`mesh_proxy_access_log_dropped_lines_total`, and a warning once the writer catches up).
//!
//! Lines are switched on and off by the `access` target of the log filter (`info,access=off`), as
//! before; their format (text or JSON) follows `--log-format`. The batch is written under the
//! lock of `std::io::stderr`, which the other log lines also take, so lines never interleave.
//! Lines still waiting when the process ends are written by [`flush`] (`main` calls it); a crash
//! loses at most the last second.

use std::{
    cell::RefCell,
    fmt::{self, Display, Write as _},
    io::Write as _,
    sync::{Condvar, LazyLock, Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::counter::Counter;

use super::LogFormat;

/// How long a line may wait in the batch.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// A batch this large is written at once (Envoy's 64 KiB flush size).
pub const FLUSH_AT: usize = 64 * 1024;
/// Bytes allowed to wait; beyond, lines are dropped. About 16,000 lines: at 100,000 requests/s
/// the writer may stall for over 100 ms before anything is lost.
pub const MAX_PENDING: usize = 4 * 1024 * 1024;

/// The access log's own counters, exported by every [`Metrics`](crate::metrics::Metrics).
pub struct Counters {
    /// Lines accepted into the batch.
    pub lines: Counter,
    /// Lines dropped because [`MAX_PENDING`] bytes were waiting.
    pub dropped: Counter,
}

/// Process-wide, like the log filter and stderr they belong to.
pub static COUNTERS: LazyLock<Counters> =
    LazyLock::new(|| Counters { lines: Counter::default(), dropped: Counter::default() });

static SINK: OnceLock<Sink> = OnceLock::new();

struct Sink {
    format: LogFormat,
    pending: Mutex<Pending>,
    /// The writer waits on it; signalled when a batch reaches [`FLUSH_AT`].
    wake: Condvar,
    /// Held while a batch is written, so that [`flush`] and the writer keep the lines in order.
    writing: Mutex<()>,
}

struct Pending {
    batch: Vec<u8>,
    /// The writer has been signalled for this batch (one signal per batch, not per line).
    signalled: bool,
    /// Lines dropped since the writer last reported it.
    dropped: u64,
}

/// Starts the writer thread; lines are formatted as `format`. Called once by
/// [`logging::init`](super::init); without it no access line is written.
pub(super) fn start(format: LogFormat) -> std::io::Result<()> {
    let sink = Sink {
        format,
        pending: Mutex::new(Pending { batch: Vec::new(), signalled: false, dropped: 0 }),
        wake: Condvar::new(),
        writing: Mutex::new(()),
    };
    if SINK.set(sink).is_ok() {
        std::thread::Builder::new().name("access-log".into()).spawn(writer)?;
    }
    Ok(())
}

/// Whether an access line would be written now: the sink runs and the filter lets the `access`
/// target through at INFO. Cheap (the filter's answer is cached per call site); checked before any
/// per-request field is kept.
pub fn enabled() -> bool {
    SINK.get().is_some() && tracing::enabled!(target: "access", tracing::Level::INFO)
}

thread_local! {
    /// Where a line is formatted before it is copied into the batch; reused, so a line costs no
    /// allocation once the thread has written one.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Formats one line with `fill` and queues it, unless access logging is off.
pub fn write(fill: impl FnOnce(&mut Line<'_>)) {
    let Some(sink) = SINK.get() else { return };
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        let mut line = Line::begin(buf, sink.format, SystemTime::now());
        fill(&mut line);
        line.end();
        sink.push(buf);
    });
}

/// Writes what waits now, on the calling thread (at exit).
pub fn flush() {
    if let Some(sink) = SINK.get() {
        let _writing = sink.writing.lock().unwrap_or_else(|e| e.into_inner());
        let batch = std::mem::take(&mut sink.pending.lock().unwrap_or_else(|e| e.into_inner()).batch);
        let _ = std::io::stderr().lock().write_all(&batch);
    }
}

impl Sink {
    fn push(&self, line: &[u8]) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.batch.len() + line.len() > MAX_PENDING {
            p.dropped += 1;
            drop(p);
            COUNTERS.dropped.inc();
            return;
        }
        p.batch.extend_from_slice(line);
        let signal = p.batch.len() >= FLUSH_AT && !p.signalled;
        p.signalled |= signal;
        drop(p);
        COUNTERS.lines.inc();
        if signal {
            self.wake.notify_one();
        }
    }
}

/// The writer thread: swaps the batch for an empty one and writes it, every [`FLUSH_INTERVAL`]
/// or when signalled. Two buffers alternate, so a steady load allocates nothing.
fn writer() {
    let sink = SINK.get().expect("the sink is set before its writer starts");
    let mut spare = Vec::new();
    loop {
        let dropped;
        {
            let mut p = sink.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.batch.len() < FLUSH_AT {
                p = sink.wake.wait_timeout(p, FLUSH_INTERVAL).unwrap_or_else(|e| e.into_inner()).0;
            }
            std::mem::swap(&mut p.batch, &mut spare);
            p.signalled = false;
            dropped = std::mem::take(&mut p.dropped);
        }
        if !spare.is_empty() {
            let _writing = sink.writing.lock().unwrap_or_else(|e| e.into_inner());
            // An error (stderr closed) cannot be reported anywhere better than stderr: the lines go.
            let _ = std::io::stderr().lock().write_all(&spare);
        }
        if dropped > 0 {
            tracing::warn!(dropped, "access log: lines dropped, stderr was not read fast enough");
        }
        // A burst may have grown the buffer; keep a steady state's worth, not the burst's.
        if spare.capacity() > 4 * FLUSH_AT {
            spare = Vec::new();
        }
        spare.clear();
    }
}

/// One access-log line being formatted: `key=value` pairs after the same prefix as the other log
/// lines (text), or one JSON object with the same keys as `tracing`'s JSON lines (`timestamp`,
/// `level`, the fields, `target`).
pub struct Line<'a> {
    buf: &'a mut Vec<u8>,
    format: LogFormat,
}

impl<'a> Line<'a> {
    fn begin(buf: &'a mut Vec<u8>, format: LogFormat, now: SystemTime) -> Self {
        match format {
            LogFormat::Text => {
                timestamp(buf, now);
                buf.extend_from_slice(b"  INFO access:");
            }
            LogFormat::Json => {
                buf.extend_from_slice(b"{\"timestamp\":\"");
                timestamp(buf, now);
                buf.extend_from_slice(b"\",\"level\":\"INFO\"");
            }
        }
        Line { buf, format }
    }

    fn end(self) {
        match self.format {
            LogFormat::Text => self.buf.push(b'\n'),
            LogFormat::Json => self.buf.extend_from_slice(b",\"target\":\"access\"}\n"),
        }
    }

    fn key(&mut self, key: &str) {
        match self.format {
            LogFormat::Text => {
                self.buf.push(b' ');
                self.buf.extend_from_slice(key.as_bytes());
                self.buf.push(b'=');
            }
            LogFormat::Json => {
                self.buf.extend_from_slice(b",\"");
                self.buf.extend_from_slice(key.as_bytes());
                self.buf.extend_from_slice(b"\":");
            }
        }
    }

    /// What happened, in words (`connection refused`); JSON's `message`.
    pub fn message(&mut self, text: &str) -> &mut Self {
        match self.format {
            LogFormat::Text => {
                self.buf.push(b' ');
                self.buf.extend_from_slice(text.as_bytes());
            }
            LogFormat::Json => {
                self.buf.extend_from_slice(b",\"message\":");
                json_string(self.buf, text);
            }
        }
        self
    }

    /// A text value; in text lines quoted only when it would not read as one word.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        match self.format {
            LogFormat::Text if is_bare(value) => self.buf.extend_from_slice(value.as_bytes()),
            _ => json_string(self.buf, value),
        }
        self
    }

    /// A text value, `-` when there is none.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        self.str(key, value.unwrap_or("-"))
    }

    /// A value written by its `Display` (addresses, methods, URIs), treated as text.
    pub fn display(&mut self, key: &str, value: impl Display) -> &mut Self {
        // Formatted straight into the line, then checked for what needs escaping: the common
        // case (no quote, space or control character) costs no second buffer.
        self.key(key);
        let start = self.buf.len();
        let _ = write!(Utf8Sink(self.buf), "{value}");
        let bare = std::str::from_utf8(&self.buf[start..]).is_ok_and(is_bare);
        if self.format == LogFormat::Json || !bare {
            let text = String::from_utf8_lossy(&self.buf[start..]).into_owned();
            self.buf.truncate(start);
            json_string(self.buf, &text);
        }
        self
    }

    /// A value written by its `Display`, `-` when there is none.
    pub fn opt_display(&mut self, key: &str, value: Option<impl Display>) -> &mut Self {
        match value {
            Some(v) => self.display(key, v),
            None => self.str(key, "-"),
        }
    }

    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        self.buf.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self
    }

    /// Milliseconds with microsecond precision (`0.412`).
    pub fn millis(&mut self, key: &str, d: Duration) -> &mut Self {
        self.key(key);
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.buf.extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
        let frac = us % 1000;
        self.buf.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        self
    }
}

/// `fmt::Write` into a byte buffer (what `Display` needs).
struct Utf8Sink<'a>(&'a mut Vec<u8>);

impl fmt::Write for Utf8Sink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A text-format value that needs no quotes: non-empty printable ASCII without space, quote,
/// backslash or `=`.
fn is_bare(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'='))
}

/// `value` as a JSON string (also the quoted form in text lines).
fn json_string(buf: &mut Vec<u8>, value: &str) {
    buf.push(b'"');
    for c in value.chars() {
        match c {
            '"' => buf.extend_from_slice(b"\\\""),
            '\\' => buf.extend_from_slice(b"\\\\"),
            '\n' => buf.extend_from_slice(b"\\n"),
            '\r' => buf.extend_from_slice(b"\\r"),
            '\t' => buf.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(Utf8Sink(buf), "\\u{:04x}", c as u32);
            }
            c => {
                let mut b = [0; 4];
                buf.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    buf.push(b'"');
}

/// RFC 3339 in UTC with microseconds (`2026-11-28T12:36:58.123456Z`), as the other log lines.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        Utf8Sink(buf),
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: LogFormat, fill: impl FnOnce(&mut Line<'_>)) -> String {
        let mut buf = Vec::new();
        let mut l = Line::begin(&mut buf, format, UNIX_EPOCH + Duration::from_micros(1_795_869_418_123_456));
        fill(&mut l);
        l.end();
        String::from_utf8(buf).unwrap()
    }

    fn sample(l: &mut Line<'_>) {
        l.str("kind", "http")
            .display("peer", "10.0.0.1:5555".parse::<std::net::SocketAddr>().unwrap())
            .display("path", "/a b\"c")
            .opt_str("route", None)
            .u64("status", 200)
            .millis("duration_ms", Duration::from_micros(1_412))
            .str("reason", "response body not completed");
    }

    #[test]
    fn text_lines_read_as_key_value_pairs() {
        assert_eq!(
            line(LogFormat::Text, sample),
            "2026-11-28T12:36:58.123456Z  INFO access: kind=http peer=10.0.0.1:5555 path=\"/a b\\\"c\" route=- \
             status=200 duration_ms=1.412 reason=\"response body not completed\"\n"
        );
    }

    #[test]
    fn json_lines_parse_and_keep_their_types() {
        let text = line(LogFormat::Json, |l| {
            l.message("connection refused");
            sample(l);
            l.str("ctl", "a\u{1}\n");
        });
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["timestamp"], "2026-11-28T12:36:58.123456Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        assert_eq!(v["message"], "connection refused");
        assert_eq!(v["path"], "/a b\"c");
        assert_eq!(v["peer"], "10.0.0.1:5555");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.412);
        assert_eq!(v["ctl"], "a\u{1}\n");
    }

    #[test]
    fn a_full_batch_drops_lines_and_signals_the_writer_once() {
        let sink = Sink {
            format: LogFormat::Text,
            pending: Mutex::new(Pending { batch: Vec::new(), signalled: false, dropped: 0 }),
            wake: Condvar::new(),
            writing: Mutex::new(()),
        };
        let line = [b'x'; 1000];
        let fit = MAX_PENDING / line.len();
        for _ in 0..fit + 10 {
            sink.push(&line);
        }
        let p = sink.pending.lock().unwrap();
        assert_eq!(p.batch.len(), fit * line.len());
        assert_eq!(p.dropped, 10);
        assert!(p.signalled);
    }

    #[test]
    fn civil_dates_across_leap_years() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, "2000-02-29T00:00:00.000000Z"),
            (4_107_542_399, "2100-02-28T23:59:59.000000Z"),
        ] {
            let mut b = Vec::new();
            timestamp(&mut b, UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(String::from_utf8(b).unwrap(), want);
        }
    }
}
