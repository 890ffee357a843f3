//! `orderflow pause|resume SERVICE`: an operator stops and restarts one
//! service's consumption, through `orderflow_ops::pause` (the same function
//! the order API's console calls).

use std::process::ExitCode;

use orderflow_ops::pause;
use orderflow_shared::config::Settings;

use crate::cli::PauseArgs;

/// Pauses (`pausing`) or resumes `args.service`.
pub fn run(args: &PauseArgs, pausing: bool) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(None)?;
    crate::block_on(async {
        let broker = crate::dlq::broker(&settings)?;
        let service = args.service.as_str();
        let by = format!(
            "orderflow pause (user {})",
            std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
        );
        let done = if pausing {
            pause::pause(&broker, service, &by).await
        } else {
            pause::resume(&broker, service).await
        };
        broker.close();
        let state = done?;
        let every = settings.pause_check_ms;
        if pausing {
            println!(
                "paused {service}: its consumers stop taking messages within {every} ms, after \
                 finishing what they hold; its queue fills and its orders wait at its step while \
                 their timers run on. `orderflow resume {service}` resumes (marker in {})",
                state.queue
            );
        } else {
            println!(
                "resumed {service}: its consumers take messages again within {every} ms and \
                 drain its queue"
            );
        }
        Ok(ExitCode::SUCCESS)
    })?
}
