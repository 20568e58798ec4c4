//! Where log lines go: stderr, through a buffer that a thread flushes every [`FLUSH_EVERY`].
//!
//! A job logs one line. Handing each line to a writer thread (tracing-appender's non-blocking
//! writer) cost a heap copy and, whenever that thread slept, a wake-up: a futex and a context
//! switch per job. Here a line is copied into a buffer under a lock, and leaves with the next
//! flush: at most [`FLUSH_EVERY`] late, in one write(2) for many lines. A WARN or ERROR line is
//! flushed at once, so a line that matters is never held back, and the guard flushes at exit.

use std::io::{self, BufWriter, Stderr, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// The buffer in front of stderr (see the module's documentation).
#[derive(Clone)]
pub struct BufferedStderr(Arc<Mutex<BufWriter<Stderr>>>);

/// Flushes the buffer when dropped (at the end of `main`).
pub struct FlushGuard(BufferedStderr);

impl BufferedStderr {
    /// The buffer, and a thread that flushes it every [`FLUSH_EVERY`] for the process' life.
    pub fn start() -> (BufferedStderr, FlushGuard) {
        let buffer = BufferedStderr(Arc::new(Mutex::new(BufWriter::with_capacity(
            64 * 1024,
            io::stderr(),
        ))));
        let flushed = buffer.clone();
        // A thread that cannot start leaves lines to the buffer filling up and to WARN lines.
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flushed.flush();
                }
            });
        (buffer.clone(), FlushGuard(buffer))
    }

    fn lock(&self) -> MutexGuard<'_, BufWriter<Stderr>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn flush(&self) {
        // Nowhere to report a failing stderr.
        let _ = self.lock().flush();
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// One line's writer: the buffer, locked while the line is written.
pub struct LineWriter<'a> {
    buffer: MutexGuard<'a, BufWriter<Stderr>>,
    flush: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.write(bytes)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.buffer.write_all(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.buffer.flush()
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if self.flush {
            let _ = self.buffer.flush();
        }
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            buffer: self.lock(),
            flush: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            buffer: self.lock(),
            // WARN and ERROR (the less verbose levels compare lower).
            flush: *meta.level() <= Level::WARN,
        }
    }
}
