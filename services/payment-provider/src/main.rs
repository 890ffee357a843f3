//! The `payment-provider` worker binary: `payment-provider --provider <method>`
//! runs the provider registered under that name until Ctrl-C or SIGTERM.

use clap::Parser;

/// Runs one payment provider of orderflow: it charges on
/// `payment.selected.<method>` and refunds on `order.cancelled`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The payment method this instance serves (an entry of config/providers.toml).
    #[arg(long, env = "ORDERFLOW_PROVIDER")]
    provider: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let service = payment_provider::service_name(&args.provider);
    orderflow_shared::app::main(&service, |ctx, shutdown| {
        payment_provider::run(ctx, args.provider, shutdown)
    })
    .await
}
