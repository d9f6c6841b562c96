//! The links between neighbouring pipeline stages: features and labels go up, gradients go
//! down. A stage sees only [`StageLinks`], so every training method runs unchanged over any
//! implementation: [`ChannelLinks`] joins stages of one process (one thread each) through
//! bounded channels; a cross-process implementation sends the same messages between ranks.
//!
//! The contract every implementation keeps:
//! - messages on one link arrive in the order they were sent (MPI's no-overtaking rule);
//! - a send returns once the message is on its way, and a stage runs at most one message
//!   ahead of its neighbour on each link (the previous send must complete before the next
//!   one reuses the link), which bounds the memory in flight;
//! - a receive blocks until the message is there, or fails with [`Error::StageStopped`] when
//!   the neighbour is gone (it failed or finished), so nothing waits forever.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use super::Transport;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};

/// Features going up, with the labels the last module needs.
pub struct Features {
    /// The stage's output, on the sender's device when sent and on the receiver's when
    /// received.
    pub h: Tensor,
    pub labels: Vec<u32>,
    /// How many messages make up this iteration's input (GPipe's micro-batches; 1 else).
    pub parts: usize,
}

/// One stage's links to the stage below (k - 1) and the stage above (k + 1). Not `Send`: a
/// stage's links are made and used on the stage's own thread (MPI communicators must stay on
/// the thread that calls MPI).
pub trait StageLinks {
    /// True when there is a stage above.
    fn has_above(&self) -> bool;
    /// True when there is a stage below.
    fn has_below(&self) -> bool;
    /// Sends this stage's output to the stage above.
    fn send_up(&mut self, features: Features) -> Result<()>;
    /// The next features from the stage below, on this stage's device.
    fn receive_up(&mut self) -> Result<Features>;
    /// Sends the gradient of this stage's input to the stage below.
    fn send_down(&mut self, grad: Tensor) -> Result<()>;
    /// The next gradient from the stage above, on this stage's device.
    fn receive_down(&mut self) -> Result<Tensor>;
}

/// The error of a stage whose neighbour (or feed) is gone.
pub(crate) fn stopped(stage: usize, what: &'static str) -> Error {
    Error::StageStopped { stage, what }
}

/// The end of a channel link one stage holds towards a neighbour.
struct ChannelEnd<S, R> {
    tx: SyncSender<S>,
    rx: Receiver<R>,
    /// The neighbour's device, which what is sent must reach.
    gpu: Gpu,
}

/// Stages of one process, one thread each: a bounded channel of capacity 1 per direction and
/// pair of neighbours, and the process's [`Transport`] to move tensors between devices.
pub struct ChannelLinks<'a> {
    stage: usize,
    transport: &'a dyn Transport,
    /// Features to the stage above, gradients from it.
    above: Option<ChannelEnd<Features, Tensor>>,
    /// Gradients to the stage below, features from it.
    below: Option<ChannelEnd<Tensor, Features>>,
}

impl<'a> ChannelLinks<'a> {
    /// The links of `gpus.len()` stages in a line, stage k's at index k.
    pub fn line(gpus: &[Gpu], transport: &'a dyn Transport) -> Vec<ChannelLinks<'a>> {
        let mut links: Vec<ChannelLinks<'a>> =
            (0..gpus.len()).map(|stage| ChannelLinks { stage, transport, above: None, below: None }).collect();
        for k in 1..gpus.len() {
            // Capacity 1: a stage may run one message ahead of its neighbour, no more.
            let (up_tx, up_rx) = sync_channel::<Features>(1);
            let (down_tx, down_rx) = sync_channel::<Tensor>(1);
            links[k - 1].above = Some(ChannelEnd { tx: up_tx, rx: down_rx, gpu: gpus[k].clone() });
            links[k].below = Some(ChannelEnd { tx: down_tx, rx: up_rx, gpu: gpus[k - 1].clone() });
        }
        links
    }
}

impl StageLinks for ChannelLinks<'_> {
    fn has_above(&self) -> bool {
        self.above.is_some()
    }

    fn has_below(&self) -> bool {
        self.below.is_some()
    }

    fn send_up(&mut self, f: Features) -> Result<()> {
        let end = self.above.as_ref().ok_or_else(|| stopped(self.stage, "no stage above"))?;
        let moving = self.transport.start(&f.h, &end.gpu)?;
        drop(f.h);
        let h = moving.finish()?;
        end.tx.send(Features { h, ..f }).map_err(|_| stopped(self.stage, "the stage above is gone"))
    }

    fn receive_up(&mut self) -> Result<Features> {
        let end = self.below.as_ref().ok_or_else(|| stopped(self.stage, "no input"))?;
        end.rx.recv().map_err(|_| stopped(self.stage, "the stage below is gone"))
    }

    fn send_down(&mut self, g: Tensor) -> Result<()> {
        let end = self.below.as_ref().ok_or_else(|| stopped(self.stage, "no stage below"))?;
        let moving = self.transport.start(&g, &end.gpu)?;
        drop(g);
        let g = moving.finish()?;
        end.tx.send(g).map_err(|_| stopped(self.stage, "the stage below is gone"))
    }

    fn receive_down(&mut self) -> Result<Tensor> {
        let end = self.above.as_ref().ok_or_else(|| stopped(self.stage, "no gradient source"))?;
        end.rx.recv().map_err(|_| stopped(self.stage, "the stage above is gone"))
    }
}
