//! A timeline of the pipeline as Chrome trace events (the JSON array format), which Perfetto
//! (ui.perfetto.dev) and chrome://tracing open: one row per stage, one span per phase (play,
//! replay, backward, update, send, receive, waiting), so the overlap and the bubbles show.
//!
//! Device work is asynchronous, so a span that only records commands would be meaningless:
//! while tracing, each phase ends by waiting for its device, and the span is the phase's
//! real duration. That adds a wait per phase, so traced runs are slightly slower.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::error::{Error, Result};

struct Event {
    name: &'static str,
    tid: usize,
    start_us: f64,
    dur_us: f64,
    iteration: u64,
}

/// Collects spans from every stage thread; written once at the end.
pub struct Tracer {
    path: PathBuf,
    t0: Instant,
    events: Mutex<Vec<Event>>,
}

impl Tracer {
    pub fn new(path: &Path) -> Tracer {
        Tracer { path: path.to_path_buf(), t0: Instant::now(), events: Mutex::new(Vec::new()) }
    }

    /// A tracer writing to `path`, checked before any work is done: a directory, a missing
    /// parent directory or an unwritable place is an error now, not after the first epoch.
    /// The file starts as an empty trace (`[]`) so it is valid JSON at every moment.
    pub fn create(path: &Path) -> Result<Tracer> {
        let bad = |message: String| Error::Data { path: path.display().to_string(), message };
        if path.is_dir() {
            return Err(bad("--trace names a directory; give a file name, e.g. trace.json".into()));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(bad(format!("the directory {} does not exist", parent.display())));
            }
        }
        let tracer = Tracer::new(path);
        tracer.write()?;
        Ok(tracer)
    }

    /// Starts a span of `name` on stage `tid`; it ends when [`Span::end`] is called or the
    /// span drops.
    pub fn span(&self, tid: usize, name: &'static str, iteration: u64) -> Span<'_> {
        Span { tracer: self, tid, name, iteration, start: Instant::now() }
    }

    /// Writes the events recorded so far (the whole file, atomically).
    pub fn write(&self) -> Result<()> {
        let io = |source| Error::Io { path: self.path.display().to_string(), source };
        let mut w: Vec<u8> = Vec::new();
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut tids: Vec<usize> = events.iter().map(|e| e.tid).collect();
        tids.sort_unstable();
        tids.dedup();
        write!(w, "[").map_err(io)?;
        let mut first = true;
        for tid in &tids {
            let sep = if first { "" } else { "," };
            first = false;
            write!(
                w,
                "{sep}\n{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":0,\"tid\":{tid},\"args\":{{\"name\":\"stage {}\"}}}}",
                tid + 1
            )
            .map_err(io)?;
        }
        for e in events.iter() {
            let sep = if first { "" } else { "," };
            first = false;
            write!(
                w,
                "{sep}\n{{\"name\":\"{}\",\"ph\":\"X\",\"pid\":0,\"tid\":{},\"ts\":{:.1},\"dur\":{:.1},\"args\":{{\"iteration\":{}}}}}",
                e.name, e.tid, e.start_us, e.dur_us, e.iteration
            )
            .map_err(io)?;
        }
        writeln!(w, "\n]").map_err(io)?;
        // Replaced whole (write-then-rename), so the file is valid JSON at every moment.
        crate::report::write_atomic(&self.path, &w)
    }
}

/// An open span (see [`Tracer::span`]).
pub struct Span<'a> {
    tracer: &'a Tracer,
    tid: usize,
    name: &'static str,
    iteration: u64,
    start: Instant,
}

impl Span<'_> {
    pub fn end(self) {}
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let start_us = self.start.duration_since(self.tracer.t0).as_secs_f64() * 1e6;
        let dur_us = self.start.elapsed().as_secs_f64() * 1e6;
        let mut ev = self.tracer.events.lock().unwrap_or_else(|p| p.into_inner());
        ev.push(Event { name: self.name, tid: self.tid, start_us, dur_us, iteration: self.iteration });
    }
}
