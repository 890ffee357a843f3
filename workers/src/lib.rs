//! The worker registry: every orderflow worker by its service name, and how
//! to run it from a [`Ctx`] and a [`Shutdown`]. The one list `orderflow up`,
//! `orderflow worker NAME`, the benchmarks and the test harness start workers
//! from.
//!
//! Which workers exist is the topology model's to say
//! ([`orderflow_services`]: the order API, generate-info, payment-wait, the
//! coordinator, the two terminal workers, one payment provider per
//! configured method); this crate only knows which library runs each.

use std::future::Future;
use std::pin::Pin;

use anyhow::Context as _;

use orderflow_shared::Shutdown;
use orderflow_shared::app::Ctx;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::topology::orderflow_services;
use tokio::net::TcpListener;

/// A running worker: resolves when it stopped (after `shutdown`) or failed.
pub type Task = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// The workers of orderflow by service name, in the topology model's order:
/// the order API first, then every worker, one payment provider per
/// configured method.
pub fn names(metadata: &Metadata) -> Vec<String> {
    orderflow_services(&metadata.methods())
        .into_iter()
        .map(|service| service.name)
        .collect()
}

/// The task running the worker `name` until `shutdown`: the order API on
/// `listener` (on `ORDERFLOW_HTTP_ADDR` without one; other workers ignore
/// it). `None` for a name that is no worker of `ctx`'s configuration.
pub fn start(
    name: &str,
    ctx: Ctx,
    listener: Option<TcpListener>,
    shutdown: Shutdown,
) -> Option<Task> {
    let task: Task = match name {
        order_api::SERVICE => match listener {
            Some(listener) => Box::pin(order_api::serve(ctx, listener, shutdown)),
            None => Box::pin(order_api::run(ctx, shutdown)),
        },
        generate_info::SERVICE => Box::pin(generate_info::run(ctx, shutdown)),
        payment_wait::SERVICE => Box::pin(payment_wait::run(ctx, shutdown)),
        saga_coordinator::SERVICE => Box::pin(saga_coordinator::run(ctx, shutdown)),
        order_completed::SERVICE => Box::pin(order_completed::run(ctx, shutdown)),
        order_cancelled::SERVICE => Box::pin(order_cancelled::run(ctx, shutdown)),
        provider => {
            let method = ctx
                .metadata
                .methods()
                .into_iter()
                .find(|method| payment_provider::service_name(method) == provider)?;
            Box::pin(payment_provider::run(ctx, method, shutdown))
        }
    };
    Some(task)
}

/// Every worker `runs` keeps, in the order of [`names`], each on the
/// [`Ctx`] `ctx_of` gives for its name, the order API on `listener`: the
/// workers of a whole system in one process (`orderflow up`, the
/// benchmarks, the test harness).
pub fn start_all(
    metadata: &Metadata,
    ctx_of: impl Fn(&str) -> Ctx,
    runs: impl Fn(&str) -> bool,
    listener: TcpListener,
    shutdown: &Shutdown,
) -> Vec<(String, Task)> {
    let mut listener = Some(listener);
    names(metadata)
        .into_iter()
        .filter(|name| runs(name))
        .filter_map(|name| {
            let listener = if name == order_api::SERVICE {
                listener.take()
            } else {
                None
            };
            start(&name, ctx_of(&name), listener, shutdown.clone()).map(|task| (name, task))
        })
        .collect()
}

/// Every worker on one [`Ctx`], the order API on `listener`: a whole
/// orderflow in this process (`orderflow up`, `orderflow bench`).
pub fn whole_system(ctx: &Ctx, listener: TcpListener, shutdown: &Shutdown) -> Vec<(String, Task)> {
    start_all(&ctx.metadata, |_| ctx.clone(), |_| true, listener, shutdown)
}

/// Runs every task; the first that fails stops the others, and its error is returned.
pub async fn run_all(tasks: Vec<(String, Task)>, shutdown: &Shutdown) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for (name, task) in tasks {
        let shutdown = shutdown.clone();
        set.spawn(async move {
            let result = task.await.with_context(|| format!("{name} stopped"));
            if result.is_err() {
                shutdown.cancel();
            }
            result
        });
    }
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let result = joined.context("a worker task panicked").and_then(|r| r);
        if let Err(error) = result {
            tracing::error!(error = %format!("{error:#}"), "worker failed; stopping orderflow");
            first_error.get_or_insert(error);
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Every name the registry lists is one it can run, and each service
    /// crate's own name is listed: a worker added to the topology model but
    /// not here (or the reverse) fails this test.
    #[test]
    fn every_listed_worker_is_known_by_its_crate() {
        let metadata = Metadata::embedded().unwrap();
        let names = names(&metadata);
        for service in [
            order_api::SERVICE,
            generate_info::SERVICE,
            payment_wait::SERVICE,
            saga_coordinator::SERVICE,
            order_completed::SERVICE,
            order_cancelled::SERVICE,
        ] {
            assert!(
                names.iter().any(|name| name == service),
                "{service} is not listed"
            );
        }
        let providers: Vec<String> = metadata
            .methods()
            .iter()
            .map(|method| payment_provider::service_name(method))
            .collect();
        assert_eq!(names.len(), 6 + providers.len(), "{names:?}");
        assert!(providers.iter().all(|p| names.contains(p)), "{names:?}");
        assert_eq!(names[0], order_api::SERVICE, "the API starts first");
    }

    /// Every listed name starts a worker; any other name starts none.
    #[tokio::test]
    async fn every_listed_worker_can_be_started() {
        let settings = orderflow_shared::config::Settings::defaults().unwrap();
        let metadata = Metadata::embedded().unwrap();
        let topology = orderflow_shared::app::topology_for(&settings, &metadata);
        // Connects lazily: the tasks are made, never run.
        let ctx = Ctx::new(settings, metadata, topology, "registry-test").unwrap();
        for name in names(&ctx.metadata) {
            assert!(
                start(&name, ctx.clone(), None, Shutdown::new()).is_some(),
                "{name} cannot be started"
            );
        }
        for unknown in ["payment-provider-nope", "order-api-2", ""] {
            assert!(start(unknown, ctx.clone(), None, Shutdown::new()).is_none());
        }
    }
}
