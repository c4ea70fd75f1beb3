//! The bounded queue between callers and the writer thread, the writer itself, and the
//! synchronous paths (fallback to stderr, writes after shutdown).
//!
//! Admission: with capacity `C` and `R` slots reserved, a debug/info/trace record is admitted
//! only while fewer than `C - R` records wait, otherwise it is dropped and counted; a warning,
//! error, panic or audit record (any level) is admitted up to `C`, and when even that is full
//! the caller writes that one record to stderr itself (`keel_log_fallback_total`).
//!
//! The writer runs each record under [`keel_guard::isolate`]: a panicking formatter or sink
//! costs that record (`keel_log_failed_total`). The writer loop itself runs under an isolate
//! inside a restart loop, and a watchdog (checked on every log call and flush) starts a new
//! thread when the writer thread has exited unexpectedly.

use std::cell::Cell;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use crate::config::Format;
use crate::filter::CompiledFilters;
use crate::format;
use crate::record::{COMPONENT, FieldValue, Origin, Record, log_scope};
use crate::sink::{SinkCounters, Sinks};
use crate::stream::{Level, PANIC_TARGET, Stream, StreamSet, uses_reserve};

/// Records the writer takes in one go before it flushes the sinks and reports progress.
const BATCH: usize = 512;

/// Pause before the writer loop restarts after a panic, so a failure that repeats at once
/// does not spin a core.
const RESTART_PAUSE: Duration = Duration::from_millis(10);

thread_local! {
    /// Set while the writer writes a panic record: a panic of the logger itself at that moment
    /// is not turned into yet another panic record (that could loop forever).
    static WRITING_PANIC_RECORD: Cell<bool> = const { Cell::new(false) };
}

/// Counters behind [`crate::LogStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) written: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) fallback: AtomicU64,
    pub(crate) writer_restarts: AtomicU64,
    /// Indexed by `stream.index() * 5 + level.rank()`.
    pub(crate) dropped: [AtomicU64; 20],
}

impl Counters {
    pub(crate) fn dropped(&self, stream: Stream, level: Level) -> Option<&AtomicU64> {
        self.dropped
            .get(stream.index() * Level::ALL.len() + usize::from(level.rank()))
    }
}

/// What the writer thread needs: the sinks and the counters.
pub(crate) struct WriterState {
    pub(crate) sinks: Mutex<Sinks>,
    pub(crate) sink_counters: Vec<Arc<SinkCounters>>,
    pub(crate) counters: Counters,
    /// Records taken off the queue and handled (written, failed or lost), after their sinks
    /// were flushed.
    processed: AtomicU64,
    progress: Mutex<()>,
    progress_changed: Condvar,
    writer_alive: AtomicBool,
}

impl WriterState {
    pub(crate) fn new(sinks: Sinks, sink_counters: Vec<Arc<SinkCounters>>) -> Self {
        Self {
            sinks: Mutex::new(sinks),
            sink_counters,
            counters: Counters::default(),
            processed: AtomicU64::new(0),
            progress: Mutex::new(()),
            progress_changed: Condvar::new(),
            writer_alive: AtomicBool::new(false),
        }
    }

    /// Writes one record to its sinks; a panic inside costs this record only.
    fn handle(&self, sinks: &mut Sinks, record: &Record) {
        let panic_record = record.origin == Origin::Panic;
        if panic_record {
            let _ = WRITING_PANIC_RECORD.try_with(|flag| flag.set(true));
        }
        let result = keel_guard::isolate(log_scope(), || sinks.write_record(record));
        if panic_record {
            let _ = WRITING_PANIC_RECORD.try_with(|flag| flag.set(false));
        }
        match result {
            Ok(()) => {
                self.counters.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keel_log_failed_total", "stream" => record.stream.as_str())
                    .increment(1);
            }
        }
    }

    /// Handles `first` and what else waits (up to [`BATCH`]), flushes, reports progress.
    fn process_batch(&self, first: Record, rx: &Receiver<Record>) {
        let mut sinks = self.sinks.lock();
        let mut next = Some(first);
        let mut handled: u64 = 0;
        while let Some(record) = next {
            self.handle(&mut sinks, &record);
            handled += 1;
            next = if handled < BATCH as u64 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        sinks.flush();
        drop(sinks);
        self.advance(handled);
    }

    fn drain(&self, rx: &Receiver<Record>) {
        while let Ok(record) = rx.try_recv() {
            self.process_batch(record, rx);
        }
    }

    fn advance(&self, handled: u64) {
        self.processed.fetch_add(handled, Ordering::SeqCst);
        // Taking the lock orders this notification after a waiter's check of `processed`.
        let _progress = self.progress.lock();
        self.progress_changed.notify_all();
    }
}

/// Marks the writer dead when its thread ends, however it ends.
struct AliveGuard(Arc<WriterState>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.writer_alive.store(false, Ordering::SeqCst);
        let _progress = self.0.progress.lock();
        self.0.progress_changed.notify_all();
    }
}

/// Where a fallback is counted. Inside the panic hook only the logger's own atomic counter is
/// touched (`LogStats::fallback`): the metrics recorder has locks that panicking code may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    InMetrics,
    InStatsOnly,
}

/// How often an idle writer looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

fn writer_thread(core: Arc<WriterState>, rx: Receiver<Record>, stop: Arc<AtomicBool>) {
    let _alive = AliveGuard(Arc::clone(&core));
    loop {
        // Ends the thread as if it had died, for the watchdog's tests.
        fail::fail_point!("log.writer.exit", |_| ());
        let outcome = keel_guard::isolate(log_scope(), || {
            fail::fail_point!("log.writer");
            run(&core, &rx, &stop);
        });
        match outcome {
            Ok(()) => return,
            Err(_) => {
                core.counters
                    .writer_restarts
                    .fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keel_log_writer_restarts_total").increment(1);
                std::thread::sleep(RESTART_PAUSE);
            }
        }
    }
}

/// Writes records until stopped. It blocks on the one record channel only: a caller's send
/// then wakes it through that channel's waker alone (a `select!` over a second, control
/// channel made every wake-up take two wakers' locks, on the caller's path). Stop is a flag,
/// looked at after every batch and every `STOP_POLL` while idle.
fn run(core: &WriterState, rx: &Receiver<Record>, stop: &AtomicBool) {
    loop {
        if stop.load(Ordering::SeqCst) {
            // Write what waits, then end.
            core.drain(rx);
            return;
        }
        match rx.recv_timeout(STOP_POLL) {
            Ok(record) => core.process_batch(record, rx),
            Err(RecvTimeoutError::Timeout) => {}
            // Every logger handle is gone.
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn spawn_writer(
    core: &Arc<WriterState>,
    rx: &Receiver<Record>,
    stop: &Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    core.writer_alive.store(true, Ordering::SeqCst);
    let (thread_core, rx, stop) = (Arc::clone(core), rx.clone(), Arc::clone(stop));
    let spawned = std::thread::Builder::new()
        .name("keel-log-writer".to_owned())
        .spawn(move || writer_thread(thread_core, rx, stop));
    if spawned.is_err() {
        core.writer_alive.store(false, Ordering::SeqCst);
    }
    spawned
}

/// Everything a logger handle, the layer and the panic reporter share.
pub(crate) struct LogQueue {
    pub(crate) core: Arc<WriterState>,
    tx: Sender<Record>,
    rx: Receiver<Record>,
    /// Tells the writer to drain and end.
    stop: Arc<AtomicBool>,
    /// Records successfully put on the queue.
    enqueued: AtomicU64,
    pub(crate) capacity: usize,
    /// Debug and info are admitted while the queue holds fewer records than this.
    low_level_limit: usize,
    pub(crate) filters: ArcSwap<CompiledFilters>,
    /// The lowest level rank any filter keeps, read at every callsite.
    pub(crate) min_rank: AtomicU8,
    /// Set by shutdown: from then on callers write synchronously.
    synchronous: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl LogQueue {
    pub(crate) fn start(
        core: WriterState,
        capacity: usize,
        reserved: usize,
        filters: CompiledFilters,
    ) -> io::Result<Arc<Self>> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let core = Arc::new(core);
        let handle = spawn_writer(&core, &rx, &stop)?;
        let min_rank = AtomicU8::new(filters.min_rank());
        Ok(Arc::new(Self {
            core,
            tx,
            rx,
            stop,
            enqueued: AtomicU64::new(0),
            capacity,
            low_level_limit: capacity.saturating_sub(reserved),
            filters: ArcSwap::from_pointee(filters),
            min_rank,
            synchronous: AtomicBool::new(false),
            writer: Mutex::new(Some(handle)),
        }))
    }

    pub(crate) fn queue_len(&self) -> usize {
        self.rx.len()
    }

    pub(crate) fn is_synchronous(&self) -> bool {
        self.synchronous.load(Ordering::SeqCst)
    }

    pub(crate) fn writer_alive(&self) -> bool {
        self.core.writer_alive.load(Ordering::SeqCst)
    }

    /// True when a debug/info record may be queued now.
    pub(crate) fn admits_low_level(&self) -> bool {
        self.is_synchronous() || self.rx.len() < self.low_level_limit
    }

    pub(crate) fn count_drop(&self, stream: Stream, level: Level) {
        if let Some(counter) = self.core.counters.dropped(stream, level) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(
            "keel_log_dropped_total",
            "stream" => stream.as_str(),
            "level" => level.as_str()
        )
        .increment(1);
    }

    /// Hands a record from a log call to the writer, never blocking on I/O (except after
    /// shutdown, when the caller writes it).
    pub(crate) fn submit(&self, record: Record) {
        if self.is_synchronous() {
            self.write_now(record);
            return;
        }
        self.watchdog();
        match self.tx.try_send(record) {
            Ok(()) => {
                self.enqueued.fetch_add(1, Ordering::SeqCst);
                if self.is_synchronous() {
                    // Shutdown ran between the check above and the send: the writer may be gone.
                    self.drain_now();
                }
            }
            Err(TrySendError::Full(record)) => {
                if uses_reserve(record.stream, record.level) || record.origin == Origin::Panic {
                    self.fallback(&record, Counted::InMetrics);
                } else {
                    self.count_drop(record.stream, record.level);
                }
            }
            Err(TrySendError::Disconnected(record)) => self.write_now(record),
        }
    }

    /// Writes `record` on the calling thread (after shutdown).
    fn write_now(&self, record: Record) {
        self.drain_now();
        let mut sinks = self.core.sinks.lock();
        self.core.handle(&mut sinks, &record);
        sinks.flush();
    }

    /// Writes what waits in the queue on the calling thread.
    fn drain_now(&self) {
        while let Ok(record) = self.rx.try_recv() {
            let mut sinks = self.core.sinks.lock();
            self.core.handle(&mut sinks, &record);
            sinks.flush();
            drop(sinks);
            self.core.advance(1);
        }
    }

    /// The last resort for a record that must not be dropped: one line on stderr, now.
    fn fallback(&self, record: &Record, counted: Counted) {
        self.core.counters.fallback.fetch_add(1, Ordering::Relaxed);
        if counted == Counted::InMetrics {
            metrics::counter!("keel_log_fallback_total", "stream" => record.stream.as_str())
                .increment(1);
        }
        let mut line = Vec::with_capacity(256);
        format::render_unchecked(record, record.stream, Format::Text, &mut line);
        let _ = io::stderr().write_all(&line);
    }

    /// Starts a new writer thread when the current one has exited. Never blocks: when another
    /// caller is already restarting it, this one goes on.
    pub(crate) fn watchdog(&self) {
        if self.writer_alive() || self.is_synchronous() {
            return;
        }
        let Some(mut handle) = self.writer.try_lock() else {
            return;
        };
        if self.writer_alive() || self.is_synchronous() {
            return;
        }
        // The old thread has ended (or is ending); it is detached, not joined.
        if let Ok(new) = spawn_writer(&self.core, &self.rx, &self.stop) {
            *handle = Some(new);
            self.core
                .counters
                .writer_restarts
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("keel_log_writer_restarts_total").increment(1);
        }
    }

    /// Waits until every record queued before the call has been handled and flushed.
    pub(crate) fn flush(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        if self.is_synchronous() {
            self.drain_now();
            return match self.core.sinks.try_lock_until(until) {
                Some(mut sinks) => {
                    sinks.flush();
                    true
                }
                None => false,
            };
        }
        self.watchdog();
        self.wait_for_queue(until)
    }

    fn wait_for_queue(&self, until: Instant) -> bool {
        let target = self.enqueued.load(Ordering::SeqCst);
        let mut progress = self.core.progress.lock();
        loop {
            if self.core.processed.load(Ordering::SeqCst) >= target {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            if !self.writer_alive() {
                drop(progress);
                if self.is_synchronous() {
                    self.drain_now();
                } else {
                    self.watchdog();
                }
                progress = self.core.progress.lock();
                continue;
            }
            // Wake up now and then to look after the writer, not only on progress.
            let wake = until.min(now + Duration::from_millis(50));
            let _ = self.core.progress_changed.wait_until(&mut progress, wake);
        }
    }

    /// Drains the queue (within `deadline`), stops the writer, and switches to synchronous
    /// writes. True when everything queued was written in time.
    pub(crate) fn shutdown(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        self.synchronous.store(true, Ordering::SeqCst);
        let drained = self.wait_for_queue(until);
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.writer.lock().take();
        if let Some(handle) = handle {
            // An idle writer sees the stop flag within `STOP_POLL`: give it that long even when
            // the deadline is (nearly) spent, so it does not outlive the shutdown holding records.
            let join_by = until.max(Instant::now() + 2 * STOP_POLL);
            while !handle.is_finished() && Instant::now() < join_by {
                std::thread::sleep(Duration::from_millis(1));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        if !self.writer_alive() {
            // Anything that slipped in while the writer stopped.
            self.drain_now();
        }
        drained
    }

    /// Turns a panic report into an `error` stream record. Runs inside the panic hook: it
    /// neither panics nor blocks (no lock, no sink: `try_send`, or one line on stderr).
    pub(crate) fn report_panic(&self, report: &keel_guard::panic::PanicReport) {
        let feedback = report.component == COMPONENT
            && WRITING_PANIC_RECORD.try_with(Cell::get).unwrap_or(true);
        if feedback {
            // The hook has written its stderr line; a panic while writing a panic record is
            // not queued again.
            return;
        }
        let mut fields = Vec::with_capacity(8);
        fields.push(("component", FieldValue::Str(report.component.clone())));
        fields.push(("fingerprint", FieldValue::Str(report.fingerprint.clone())));
        if let Some(request_id) = &report.request_id {
            fields.push(("request_id", FieldValue::Str(request_id.clone())));
        }
        if let Some(context) = &report.context {
            fields.push(("context", FieldValue::Str(context.clone())));
        }
        if let Some(location) = &report.location {
            fields.push(("location", FieldValue::Str(location.clone())));
        }
        if let Some(thread) = &report.thread {
            fields.push(("thread", FieldValue::Str(thread.clone())));
        }
        match &report.backtrace {
            Some(backtrace) => fields.push(("backtrace", FieldValue::Str(backtrace.clone()))),
            None => fields.push((
                "backtrace_skipped",
                FieldValue::Bool(report.backtrace_skipped),
            )),
        }
        let mut streams = StreamSet::default();
        streams.insert(Stream::Error);
        let record = Record {
            time: report.at,
            level: Level::Error,
            stream: Stream::Error,
            streams,
            target: PANIC_TARGET,
            message: report.message.clone(),
            fields,
            origin: Origin::Panic,
        };
        if self.is_synchronous() {
            // Sinks may panic, and a panic inside the panic hook aborts: stderr only.
            self.fallback(&record, Counted::InStatsOnly);
            return;
        }
        match self.tx.try_send(record) {
            Ok(()) => {
                self.enqueued.fetch_add(1, Ordering::SeqCst);
            }
            Err(TrySendError::Full(record) | TrySendError::Disconnected(record)) => {
                self.fallback(&record, Counted::InStatsOnly);
            }
        }
    }
}
