//! The status of an order and its one rule: it only moves forward
//! (started → awaiting_payment → paying → completed | cancelled), and a
//! terminal status never changes.

use std::fmt;
use std::str::FromStr;

/// Where an order is in the saga, as the `orders.status` column spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Started,
    AwaitingPayment,
    Paying,
    Completed,
    Cancelled,
}

/// A status name that is not one of [`Status::ALL`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown status `{0}`; expected one of started, awaiting_payment, paying, completed, cancelled"
)]
pub struct UnknownStatus(pub String);

impl Status {
    pub const ALL: [Self; 5] = [
        Self::Started,
        Self::AwaitingPayment,
        Self::Paying,
        Self::Completed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::AwaitingPayment => "awaiting_payment",
            Self::Paying => "paying",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }

    /// Position on the way forward; both terminal statuses rank last.
    pub fn rank(self) -> u8 {
        match self {
            Self::Started => 0,
            Self::AwaitingPayment => 1,
            Self::Paying => 2,
            Self::Completed | Self::Cancelled => 3,
        }
    }

    /// The statuses an order may leave to take `self` (those ranked below it).
    pub fn predecessors(self) -> Vec<&'static str> {
        Self::ALL
            .into_iter()
            .filter(|s| s.rank() < self.rank())
            .map(Self::as_str)
            .collect()
    }

    /// Whether an order in `self` is what a reader waiting for `wanted` waits
    /// for: that status, a later one (statuses never go back, so it was
    /// passed), or the end of the saga.
    pub fn satisfies(self, wanted: Self) -> bool {
        self == wanted || self.is_terminal() || self.rank() > wanted.rank()
    }
}

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_errors() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
        }
        assert_eq!(
            "shipped".parse::<Status>(),
            Err(UnknownStatus("shipped".into()))
        );
    }

    #[test]
    fn waiting_ends_at_the_status_a_later_one_or_the_end() {
        use Status::*;
        assert!(AwaitingPayment.satisfies(AwaitingPayment));
        assert!(Paying.satisfies(AwaitingPayment));
        assert!(Cancelled.satisfies(Completed));
        assert!(Completed.satisfies(Cancelled));
        assert!(!Started.satisfies(AwaitingPayment));
        assert!(!Paying.satisfies(Completed));
        assert_eq!(Paying.predecessors(), ["started", "awaiting_payment"]);
        assert!(Started.predecessors().is_empty());
    }
}
