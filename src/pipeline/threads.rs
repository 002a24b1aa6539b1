//! The threads of a run, owned by one guard that stops and joins them on every path: a
//! normal stop, a failed set-up after some threads started, an error or a panic on the main
//! thread. Order matters and lives here only: the real-time threads and the control thread
//! stop first (the stop flag, the decode thread unparked), then the recorder is told to
//! finish, so that it has every record they made, and is joined last. The shadow thread
//! stops after the decode thread (it drains every bin the decoder handed it), and the
//! shadows' recorders finish with the session's.

use super::record::{RecordResult, ToRecorder};
use crate::decoder::Decoder;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct Threads {
    stop: Arc<AtomicBool>,
    acquire: Option<JoinHandle<()>>,
    decode: Option<JoinHandle<Box<dyn Decoder>>>,
    control: Option<JoinHandle<()>>,
    recorder: Option<(crossbeam_channel::Sender<ToRecorder>, JoinHandle<RecordResult>)>,
    shadows: Option<(Arc<AtomicBool>, JoinHandle<Vec<super::shadow::Finished>>)>,
    shadows_finished: Vec<super::shadow::Finished>,
    shadow_recorders: Vec<(crossbeam_channel::Sender<ToRecorder>, JoinHandle<RecordResult>)>,
}

fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> crate::Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| crate::Error::Invalid(format!("cannot start the {name} thread: {e}")))
}

impl Threads {
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Threads {
            stop,
            acquire: None,
            decode: None,
            control: None,
            recorder: None,
            shadows: None,
            shadows_finished: Vec::new(),
            shadow_recorders: Vec::new(),
        }
    }

    pub fn start_recorder(
        &mut self,
        tx: crossbeam_channel::Sender<ToRecorder>,
        f: impl FnOnce() -> RecordResult + Send + 'static,
    ) -> crate::Result<()> {
        self.recorder = Some((tx, spawn("ll-record", f)?));
        Ok(())
    }

    /// A shadow decoder's recorder (its session under `<session>/shadows/<name>`).
    pub fn start_shadow_recorder(
        &mut self,
        tx: crossbeam_channel::Sender<ToRecorder>,
        f: impl FnOnce() -> RecordResult + Send + 'static,
    ) -> crate::Result<()> {
        self.shadow_recorders.push((tx, spawn("ll-shadow-rec", f)?));
        Ok(())
    }

    /// The shadow thread; `stop` tells it the decode thread has stopped.
    pub fn start_shadows(
        &mut self,
        stop: Arc<AtomicBool>,
        f: impl FnOnce() -> Vec<super::shadow::Finished> + Send + 'static,
    ) -> crate::Result<()> {
        self.shadows = Some((stop, spawn("ll-shadow", f)?));
        Ok(())
    }

    /// After [`Threads::stop_realtime`]: what each shadow decoder did.
    pub fn shadows_finished(&mut self) -> Vec<super::shadow::Finished> {
        std::mem::take(&mut self.shadows_finished)
    }

    pub fn start_acquire(&mut self, f: impl FnOnce() + Send + 'static) -> crate::Result<()> {
        self.acquire = Some(spawn("ll-acquire", f)?);
        Ok(())
    }

    pub fn start_control(&mut self, f: impl FnOnce() + Send + 'static) -> crate::Result<()> {
        self.control = Some(spawn("ll-control", f)?);
        Ok(())
    }

    /// Starts the decode thread; returns its handle's thread (the acquisition thread unparks it).
    pub fn start_decode(
        &mut self,
        f: impl FnOnce() -> Box<dyn Decoder> + Send + 'static,
    ) -> crate::Result<std::thread::Thread> {
        let h = spawn("ll-decode", f)?;
        let t = h.thread().clone();
        self.decode = Some(h);
        Ok(t)
    }

    /// Stops the acquisition, decode and control threads and joins them; returns the
    /// decoder. (The control thread may be waiting, at most a few seconds, for a change to
    /// be applied: it is joined after the decode thread, and before the recorder finishes,
    /// since it writes into the session.)
    pub fn stop_realtime(&mut self) -> Option<Box<dyn Decoder>> {
        self.stop.store(true, Ordering::Relaxed);
        let decoder = self.decode.take().and_then(|h| {
            h.thread().unpark();
            h.join().ok()
        });
        for h in [self.acquire.take(), self.control.take()].into_iter().flatten() {
            let _ = h.join();
        }
        // Only now: every bin the decode thread handed the shadows is in their feed.
        if let Some((stop, h)) = self.shadows.take() {
            stop.store(true, Ordering::Release);
            self.shadows_finished = h.join().unwrap_or_default();
        }
        decoder
    }

    /// After [`Threads::stop_realtime`]: the recorder writes its end record with `summary`
    /// and is joined. `None` when nothing was recorded.
    pub fn finish_recording(&mut self, summary: serde_json::Value) -> Option<RecordResult> {
        self.finish_shadow_recordings(|_| summary.clone());
        let (tx, h) = self.recorder.take()?;
        let _ = tx.send(ToRecorder::Finish(summary));
        Some(h.join().unwrap_or_else(|_| Err("the recorder thread panicked".into())))
    }
}

impl Threads {
    /// The shadows' recorders write their end records (`summary(k)` for the k-th) and are
    /// joined; what each wrote, in the order they were started.
    pub fn finish_shadow_recordings(&mut self, summary: impl Fn(usize) -> serde_json::Value) -> Vec<RecordResult> {
        let recs = std::mem::take(&mut self.shadow_recorders);
        for (k, (tx, _)) in recs.iter().enumerate() {
            let _ = tx.send(ToRecorder::Finish(summary(k)));
        }
        recs.into_iter()
            .map(|(_, h)| h.join().unwrap_or_else(|_| Err("a shadow recorder thread panicked".into())))
            .collect()
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop_realtime();
        self.finish_recording(serde_json::json!({"aborted": true}));
    }
}
