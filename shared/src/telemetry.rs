//! Telemetry: tracing subscriber set up from `ORDERFLOW_LOG` (filter) and
//! `ORDERFLOW_LOG_FORMAT` (`text` for people, `json` for machines).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it again (tests) is harmless.
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).map_err(|e| {
        anyhow::anyhow!("ORDERFLOW_LOG=`{filter}` is not a valid log filter ({e}); try `info` or `orderflow=debug`")
    })?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // Already initialised (several tests in one process): keep the first one.
    let _ = result;
    Ok(())
}
