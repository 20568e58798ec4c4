//! Where log lines go: stderr, through a buffer that one thread writes out.
//!
//! A job logs one line. A line is copied into the buffer under a lock and leaves with the next
//! write, at most [`FLUSH_EVERY`] later, in one write(2) for many lines; a WARN or ERROR line
//! wakes the writer at once. (Handing each line to a writer thread through a channel, as
//! tracing-appender does, cost a heap copy and a wake-up per job.)
//!
//! The writer writes outside the lock, so a stderr that blocks — a log collector that stalls, a
//! pipe nobody reads — never blocks a job: lines beyond [`MAX_PENDING`] bytes are dropped and
//! counted, and a WARN line gives the count once stderr takes lines again.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes the buffer holds at most while stderr does not take them (at 13,000 jobs/s a
/// [`FLUSH_EVERY`] is ~200 KB of lines).
pub const MAX_PENDING: usize = 1 << 20;
/// How long the last lines may take to leave at exit before the process ends without them.
const EXIT_PATIENCE: Duration = Duration::from_secs(2);

/// The lines waiting for the writer.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Lines dropped since the writer last took the buffer.
    dropped: u64,
    /// A WARN or ERROR line is waiting: write now.
    urgent: bool,
    /// The guard asks for a last write; `closed` once it is done.
    closing: bool,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer: an urgent line, or the guard closing.
    wake: Condvar,
    /// Wakes the guard when the writer has closed.
    closed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The buffer in front of stderr (see the module's documentation).
#[derive(Clone)]
pub struct LogBuffer(Arc<Shared>);

/// Writes what is buffered when dropped (at the end of `main`), waiting at most
/// [`EXIT_PATIENCE`] for a stderr that does not take it.
pub struct FlushGuard(LogBuffer);

impl LogBuffer {
    /// The buffer in front of stderr, and its writer thread.
    pub fn start() -> io::Result<(LogBuffer, FlushGuard)> {
        LogBuffer::start_with(io::stderr())
    }

    /// The buffer in front of `out`, and a thread that writes it there for the process' life.
    pub fn start_with(out: impl Write + Send + 'static) -> io::Result<(LogBuffer, FlushGuard)> {
        let buffer = LogBuffer(Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            closed: Condvar::new(),
        }));
        let shared = Arc::clone(&buffer.0);
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_out(&shared, out))?;
        Ok((buffer.clone(), FlushGuard(buffer)))
    }

    /// Lines dropped so far because the buffer was full (reset when reported).
    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.0.lock().dropped
    }
}

/// The writer thread: takes the buffer every [`FLUSH_EVERY`] (at once for an urgent line or the
/// guard) and writes it out without holding the lock.
fn write_out(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    let mut pending = shared.lock();
    loop {
        if !pending.urgent && !pending.closing {
            pending = shared
                .wake
                .wait_timeout(pending, FLUSH_EVERY)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        pending.urgent = false;
        let closing = pending.closing;
        let dropped = std::mem::take(&mut pending.dropped);
        std::mem::swap(&mut pending.bytes, &mut spare);
        drop(pending);
        // Nowhere to report a failing stderr.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        if dropped > 0 {
            // Goes through the buffer (and so in the chosen format) with the next write.
            tracing::warn!(
                dropped,
                "log lines dropped: stderr did not take them in time"
            );
        }
        pending = shared.lock();
        if closing {
            pending.closed = true;
            shared.closed.notify_all();
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        let shared = &self.0.0;
        let mut pending = shared.lock();
        pending.closing = true;
        shared.wake.notify_one();
        let _ = shared
            .closed
            .wait_timeout_while(pending, EXIT_PATIENCE, |pending| !pending.closed);
    }
}

/// One line's writer: the buffer, locked while the line is written.
pub struct LineWriter<'a> {
    shared: &'a Shared,
    pending: MutexGuard<'a, Pending>,
    /// Where the line starts in the buffer, to take it back if it does not fit.
    start: usize,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.pending.bytes.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if self.pending.bytes.len() > MAX_PENDING {
            self.pending.bytes.truncate(self.start);
            self.pending.dropped += 1;
        } else if self.urgent {
            self.pending.urgent = true;
            self.shared.wake.notify_one();
        }
    }
}

impl LogBuffer {
    fn line(&self, urgent: bool) -> LineWriter<'_> {
        let pending = self.0.lock();
        LineWriter {
            shared: &self.0,
            start: pending.bytes.len(),
            pending,
            urgent,
        }
    }
}

impl<'a> MakeWriter<'a> for LogBuffer {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        self.line(false)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        // WARN and ERROR (the less verbose levels compare lower).
        self.line(*meta.level() <= Level::WARN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A stderr that takes nothing until the test lets it, then passes everything on.
    struct Stalled {
        open: mpsc::Receiver<()>,
        opened: bool,
        out: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if !self.opened {
                let _ = self.open.recv();
                self.opened = true;
            }
            let _ = self.out.send(bytes.to_vec());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log(buffer: &LogBuffer, line: &str) {
        buffer
            .make_writer()
            .write_all(line.as_bytes())
            .expect("buffered");
    }

    #[test]
    fn a_stalled_stderr_blocks_no_line_drops_what_does_not_fit_and_keeps_the_rest() {
        let (open, opening) = mpsc::channel();
        let (written, received) = mpsc::channel();
        let stalled = Stalled {
            open: opening,
            opened: false,
            out: written,
        };
        let (buffer, guard) = LogBuffer::start_with(stalled).expect("writer thread");
        log(&buffer, "first\n");
        // Let the writer take "first" and block in write(2) on it.
        while !buffer.0.lock().bytes.is_empty() {
            std::thread::yield_now();
        }
        // Twice what the buffer holds, from another thread: it must return.
        let line = format!("{}\n", "x".repeat(999));
        let lines = 2 * MAX_PENDING / line.len();
        let (done, finished) = mpsc::channel();
        let logger = buffer.clone();
        std::thread::spawn(move || {
            for _ in 0..lines {
                log(&logger, &line);
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("logging blocked on stderr");
        let kept_at_most = MAX_PENDING / 1000;
        let dropped = buffer.dropped();
        assert!(
            dropped >= (lines - kept_at_most) as u64,
            "dropped {dropped}"
        );
        log(&buffer, "last\n");
        open.send(()).expect("open stderr");
        drop(guard);
        let all: Vec<u8> = received.try_iter().flatten().collect();
        let all = String::from_utf8(all).expect("utf-8");
        assert!(
            all.starts_with("first\n"),
            "{:?}",
            &all[..20.min(all.len())]
        );
        assert!(all.ends_with("last\n"));
        let kept = all.lines().filter(|l| l.starts_with('x')).count();
        assert!(
            kept > 0 && kept <= kept_at_most,
            "kept {kept} of the long lines"
        );
    }
}
