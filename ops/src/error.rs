//! The errors of operator operations: each says what failed, on which
//! service or queue, and what to do about it.

use orderflow_shared::bus::{BusError, PublishError};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("unknown service `{service}`; services: {known}")]
    UnknownService { service: String, known: String },
    #[error(transparent)]
    Broker(#[from] Box<BusError>),
    #[error(
        "queue {queue} does not exist; has orderflow declared its topology here \
         (ORDERFLOW_NAMESPACE, `orderflow topology declare`)? ({cause})"
    )]
    MissingQueue {
        queue: String,
        cause: Box<lapin::Error>,
    },
    #[error(
        "the broker refused {what}: {cause}; operator actions need a broker user allowed to do \
         them (ORDERFLOW_AMQP_URL for the CLI, ORDERFLOW_OPERATOR_AMQP_URL for the console: the \
         `console` user of `orderflow topology users`, or an administrator)"
    )]
    Refused {
        what: String,
        cause: Box<lapin::Error>,
    },
    #[error("{what}: {cause}")]
    Publish {
        what: String,
        cause: Box<PublishError>,
    },
}

impl From<BusError> for OpsError {
    fn from(error: BusError) -> Self {
        Self::Broker(Box::new(error))
    }
}

impl OpsError {
    /// A failed AMQP call `what`: refused for lack of rights, or another error.
    pub(crate) fn amqp(what: impl Into<String>, cause: lapin::Error) -> Self {
        Self::Refused {
            what: what.into(),
            cause: Box::new(cause),
        }
    }

    /// Whether the broker said no for lack of permission (rather than being
    /// away): the caller's broker user may not do this.
    pub fn is_refused(&self) -> bool {
        match self {
            Self::Refused { cause, .. } => cause.to_string().contains("ACCESS_REFUSED"),
            _ => false,
        }
    }
}
