//! Acknowledgements gathered per channel. A handled delivery is acked
//! together with the ones handled before it: one `basic.ack` with `multiple`
//! set, sent once every earlier delivery of the channel is settled, covers
//! them all. RabbitMQ turns each ack frame into a settle command in the
//! quorum queue's log: consuming from a quorum queue cost it 27–29 ms of CPU
//! per thousand messages acked one by one, 6.5–7.5 ms acked 32 at a time
//! (BENCHMARKS.md, fifth sitting).
//!
//! Deliveries come in tag order on a channel and are handled concurrently,
//! so a handled delivery may wait for an earlier one still in work (a
//! retry, a slow gateway call). At most [`MAX_WAITING`] wait: beyond that
//! they are acked one by one, as each delivery was before, so a delivery
//! that takes long never holds the others' acks, nor fills the prefetch
//! window with deliveries already handled. A delivery settled otherwise
//! (requeued by its own `nack`) no longer holds anything back.
//!
//! Every frame goes out under one lock, in the order it was decided: an ack
//! that covers a tag never precedes a single ack of that tag, which the
//! broker would refuse as an unknown delivery tag (and close the channel).

use std::collections::BTreeSet;

use lapin::Channel;
use lapin::options::BasicAckOptions;
use lapin::types::DeliveryTag;
use tokio::sync::Mutex;

/// Handled deliveries that may wait for an earlier one before they are acked
/// one by one instead.
pub const MAX_WAITING: usize = 64;

/// The acks of one channel's deliveries.
#[derive(Debug)]
pub struct Acks {
    channel: Channel,
    tags: Mutex<Tags>,
}

/// What to send for the deliveries settled so far.
#[derive(Debug, PartialEq, Eq)]
enum Send {
    Nothing,
    /// `basic.ack` of this tag with `multiple`.
    UpTo(DeliveryTag),
    /// One `basic.ack` for each.
    Each(Vec<DeliveryTag>),
}

/// Which deliveries are open (delivered, not settled) and which are handled
/// but not acked yet.
#[derive(Debug, Default)]
struct Tags {
    open: BTreeSet<DeliveryTag>,
    handled: BTreeSet<DeliveryTag>,
}

impl Tags {
    /// What may be acked now: every handled delivery below the first open
    /// one, as one ack of the highest; else, when too many wait, each of
    /// them on its own.
    fn due(&mut self) -> Send {
        let first_open = self.open.first().copied().unwrap_or(DeliveryTag::MAX);
        if let Some(&up_to) = self.handled.range(..first_open).next_back() {
            self.handled = self.handled.split_off(&(up_to + 1));
            return Send::UpTo(up_to);
        }
        if self.handled.len() > MAX_WAITING {
            return Send::Each(std::mem::take(&mut self.handled).into_iter().collect());
        }
        Send::Nothing
    }
}

impl Acks {
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            tags: Mutex::new(Tags::default()),
        }
    }

    /// `tag` was delivered: later acks wait for it until it is settled.
    pub async fn delivered(&self, tag: DeliveryTag) {
        self.tags.lock().await.open.insert(tag);
    }

    /// These deliveries were handled (their effects are durable): ack them
    /// now or together with later ones.
    pub async fn handled(
        &self,
        tags: impl IntoIterator<Item = DeliveryTag>,
    ) -> Result<(), lapin::Error> {
        let mut state = self.tags.lock().await;
        for tag in tags {
            state.open.remove(&tag);
            state.handled.insert(tag);
        }
        let send = state.due();
        self.send(send).await
    }

    /// `tag` was settled by its own `nack` (requeued): it no longer holds
    /// back the acks of later deliveries.
    pub async fn settled(&self, tag: DeliveryTag) -> Result<(), lapin::Error> {
        let mut state = self.tags.lock().await;
        state.open.remove(&tag);
        let send = state.due();
        self.send(send).await
    }

    /// Sends `send`; called with the lock held, so frames go out in the
    /// order they were decided.
    async fn send(&self, send: Send) -> Result<(), lapin::Error> {
        match send {
            Send::Nothing => Ok(()),
            Send::UpTo(tag) => {
                self.channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
            }
            Send::Each(tags) => {
                for tag in tags {
                    self.channel
                        .basic_ack(tag, BasicAckOptions::default())
                        .await?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(open: &[u64], handled: &[u64]) -> Tags {
        Tags {
            open: open.iter().copied().collect(),
            handled: handled.iter().copied().collect(),
        }
    }

    #[test]
    fn handled_deliveries_are_acked_up_to_the_first_open_one() {
        let mut state = tags(&[], &[1, 2, 3]);
        assert_eq!(state.due(), Send::UpTo(3));
        assert!(state.handled.is_empty());

        // 2 is still in work: 1 goes, 3 and 4 wait for it.
        let mut state = tags(&[2], &[1, 3, 4]);
        assert_eq!(state.due(), Send::UpTo(1));
        assert_eq!(state.due(), Send::Nothing);
        state.open.remove(&2);
        assert_eq!(state.due(), Send::UpTo(4));
        assert_eq!(state.due(), Send::Nothing);
    }

    #[test]
    fn nothing_is_acked_while_the_earliest_delivery_is_open() {
        let mut state = tags(&[1], &[2, 3]);
        assert_eq!(state.due(), Send::Nothing);
        assert_eq!(state.handled.len(), 2);
    }

    #[test]
    fn too_many_waiting_are_acked_one_by_one_and_never_the_open_one() {
        let waiting: Vec<u64> = (2..=u64::try_from(MAX_WAITING).unwrap() + 2).collect();
        let mut state = tags(&[1], &waiting);
        assert_eq!(state.due(), Send::Each(waiting));
        assert!(state.handled.is_empty());
        assert_eq!(state.open.iter().copied().collect::<Vec<_>>(), vec![1]);
        // Settled later, the open one holds nothing back and is not acked by
        // anyone else: its own nack settled it.
        state.open.remove(&1);
        assert_eq!(state.due(), Send::Nothing);
    }

    #[test]
    fn a_multiple_ack_never_covers_an_open_delivery() {
        // Any order of settling: every ack sent covers only handled tags.
        for order in [[1, 2, 3, 4], [4, 3, 2, 1], [2, 4, 1, 3], [3, 1, 4, 2]] {
            let mut state = tags(&[1, 2, 3, 4], &[]);
            let mut acked = BTreeSet::new();
            for tag in order {
                state.open.remove(&tag);
                state.handled.insert(tag);
                match state.due() {
                    Send::Nothing => {}
                    Send::UpTo(up_to) => {
                        assert!(
                            state.open.iter().all(|open| *open > up_to),
                            "{order:?}: ack up to {up_to} with {:?} open",
                            state.open
                        );
                        acked.extend(1..=up_to);
                    }
                    Send::Each(each) => acked.extend(each),
                }
            }
            assert_eq!(acked, (1..=4).collect(), "{order:?}");
        }
    }
}
