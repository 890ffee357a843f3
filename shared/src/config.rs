//! Configuration: defaults, then an optional TOML file, then `ORDERFLOW_*`
//! environment variables (the names of docs/design.md §9). Secrets (URLs with
//! passwords, token keys) are [`SecretString`]s and never printed.

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Log output format.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything a worker or `orderflow up` is configured with.
#[derive(Clone, Debug, Deserialize)]
pub struct Settings {
    /// `ORDERFLOW_AMQP_URL`
    pub amqp_url: SecretString,
    /// `ORDERFLOW_DATABASE_URL`
    pub database_url: SecretString,
    /// `ORDERFLOW_HTTP_ADDR`
    pub http_addr: String,
    /// `ORDERFLOW_NAMESPACE`: prefix of every broker name (empty: none).
    pub namespace: String,
    /// `ORDERFLOW_GENERATE_INFO_TIMEOUT_SECS` (1 to [`MAX_TIMEOUT_SECS`])
    pub generate_info_timeout_secs: u64,
    /// `ORDERFLOW_PAYMENT_TIMEOUT_SECS` (1 to [`MAX_TIMEOUT_SECS`])
    pub payment_timeout_secs: u64,
    /// `ORDERFLOW_FLOW_TIMEOUT_SECS` (1 to [`MAX_TIMEOUT_SECS`])
    pub flow_timeout_secs: u64,
    /// `ORDERFLOW_TOKEN_KEYS`: `kid:secret[,kid:secret]`, the first one signs.
    pub token_keys: Option<SecretString>,
    /// `ORDERFLOW_LOG`: a tracing filter such as `info` or `orderflow=debug`.
    pub log: String,
    /// `ORDERFLOW_LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// `ORDERFLOW_PREFETCH`: unacknowledged deliveries per consumer (at least 1).
    pub prefetch: u16,
    /// `ORDERFLOW_CONCURRENCY`: handler invocations in flight per consumer
    /// (1 to [`MAX_CONCURRENCY`]).
    pub concurrency: usize,
    /// `ORDERFLOW_DB_POOL_SIZE`: database connections per service (per schema
    /// pool). `orderflow up` runs ten such pools in one process, plus the
    /// order API's two HTTP pools (`ORDERFLOW_HTTP_DB_POOL_SIZE`): keep their
    /// sum under the server's `max_connections` (100 by default). At least 1.
    pub db_pool_size: u32,
    /// `ORDERFLOW_HTTP_REQUEST_TIMEOUT_MS`: longest the order API works on
    /// one request before it answers 503 (long polls excepted: they end by
    /// their own `timeout_ms`, at most 60 s).
    pub http_request_timeout_ms: u64,
    /// `ORDERFLOW_HTTP_MAX_CONCURRENCY`: requests the order API works on at
    /// once (long polls not counted); one more is answered 503 with
    /// `Retry-After` at once, never queued.
    pub http_max_concurrency: usize,
    /// `ORDERFLOW_HTTP_MAX_WAITERS`: long polls (`GET /orders/{id}?wait_for=`)
    /// waiting at once; one more is answered 503 with `Retry-After`.
    pub http_max_waiters: usize,
    /// `ORDERFLOW_HTTP_DB_POOL_SIZE`: database connections of the order API's
    /// HTTP handlers, per pool (the `orders` schema, and the `coordinator`
    /// schema for histories), apart from the read-model consumer's pool, so
    /// that clients cannot take the connections event handling needs.
    pub http_db_pool_size: u32,
    /// `ORDERFLOW_PUBLISH_TIMEOUT_MS`: how long one publish may wait for its
    /// confirm (at least 1).
    pub publish_timeout_ms: u64,
    /// `ORDERFLOW_GATEWAY_LATENCY_MS`: the simulated payment gateway's latency
    /// (0 to [`MAX_GATEWAY_LATENCY_MS`]).
    pub gateway_latency_ms: u64,
    /// `ORDERFLOW_GATEWAY_FAILURE_RATE`: share (0 to 1) of gateway calls that
    /// fail transiently.
    pub gateway_failure_rate: f64,
    /// `ORDERFLOW_GATEWAY_RETRIES`: gateway retries before a provider gives up (`payment.failed`).
    pub gateway_retries: usize,
    /// `ORDERFLOW_RETENTION_DAYS`: how long the runtime keeps inbox rows and
    /// the coordinator keeps finished sagas (their timers, history, used
    /// tokens and payment steps); older ones are pruned. At least 1 day, and
    /// longer than the flow timeout.
    ///
    /// An inbox row is what turns a second delivery of a message into a
    /// no-op, so it must outlive every way a message can come back. The
    /// broker's own redeliveries are over within minutes: the delay tiers
    /// add up to 1 s + 10 s + 1 min, and a saga runs at most the flow
    /// timeout. But a dead letter can be replayed by an operator
    /// (`orderflow dlq replay`) days later; if the inbox rows of its
    /// message were pruned by then, the replay would apply it a second
    /// time. The retention is therefore counted in days (default 30), and
    /// `dlq replay` refuses, without `--force`, a dead letter older than it.
    pub retention_days: u32,
    /// `ORDERFLOW_PAUSE_CHECK_MS`: how often a consumer looks whether an
    /// operator paused its service (at least 1; a passive declaration each).
    pub pause_check_ms: u64,
    /// `ORDERFLOW_OPERATOR_TOKEN`: the bearer token of the order API's
    /// operator console (replays, pauses, dead letters, stuck sagas); at
    /// least 16 characters. None: the console's operator side is off (403).
    pub operator_token: Option<SecretString>,
    /// `ORDERFLOW_OPERATOR_AMQP_URL`: the broker user the console's operator
    /// actions use (reading and replaying dead letters, pausing services);
    /// by default the service's own `ORDERFLOW_AMQP_URL`, which in a
    /// deployment may do none of it (the `console` user of `orderflow
    /// topology users` may, and nothing more).
    pub operator_amqp_url: Option<SecretString>,
    /// `ORDERFLOW_MANAGEMENT_URL`: the RabbitMQ management HTTP API the
    /// console reads queue rates from, with the operator's broker user; when
    /// it does not answer, the console counts messages and consumers with
    /// passive declarations instead.
    pub management_url: String,
}

/// Shortest operator token accepted (`ORDERFLOW_OPERATOR_TOKEN`).
pub const MIN_OPERATOR_TOKEN_CHARS: usize = 16;

/// The default of `ORDERFLOW_RETENTION_DAYS`.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;

fn invalid(message: String) -> ConfigError {
    ConfigError(config::ConfigError::Message(message))
}

/// Longest saga timeout (`ORDERFLOW_*_TIMEOUT_SECS`): 365 days. Deadlines
/// are computed from it; a year is far beyond any saga step.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 60 * 60;

/// Most handler invocations in flight per consumer (`ORDERFLOW_CONCURRENCY`):
/// the most deliveries a consumer can hold (the largest prefetch).
pub const MAX_CONCURRENCY: usize = u16::MAX as usize;

/// Longest simulated gateway latency (`ORDERFLOW_GATEWAY_LATENCY_MS`): a
/// minute. A provider waits that long per call, holding its message.
pub const MAX_GATEWAY_LATENCY_MS: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
#[error("configuration is invalid: {0}; check the config file and the ORDERFLOW_* environment")]
pub struct ConfigError(#[from] config::ConfigError);

impl Settings {
    /// Defaults, then `file` (if given and present), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, config::Environment::with_prefix("ORDERFLOW"))
    }

    /// [`load`](Self::load) with the file named by `ORDERFLOW_CONFIG`, if set.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::load(
            std::env::var_os("ORDERFLOW_CONFIG")
                .as_deref()
                .map(Path::new),
        )
    }

    /// The defaults alone (no file, no environment): a base for tests.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load_from(
            None,
            config::Environment::with_prefix("ORDERFLOW")
                .source(Some(std::collections::HashMap::new())),
        )
    }

    fn load_from(file: Option<&Path>, env: config::Environment) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .set_default("amqp_url", "amqp://guest:guest@127.0.0.1:5672/%2f")?
            .set_default(
                "database_url",
                "postgres://postgres@127.0.0.1:5432/orderflow",
            )?
            .set_default("http_addr", "127.0.0.1:8080")?
            .set_default("namespace", "")?
            .set_default("generate_info_timeout_secs", 300)?
            .set_default("payment_timeout_secs", 300)?
            .set_default("flow_timeout_secs", 3600)?
            .set_default("log", "info")?
            .set_default("log_format", "text")?
            .set_default("prefetch", 1024)?
            .set_default("concurrency", 32)?
            .set_default("db_pool_size", 6)?
            .set_default("http_request_timeout_ms", 10_000)?
            .set_default("http_max_concurrency", 256)?
            .set_default("http_max_waiters", 1024)?
            .set_default("http_db_pool_size", 4)?
            .set_default("publish_timeout_ms", 10_000)?
            .set_default("gateway_latency_ms", 20)?
            .set_default("gateway_failure_rate", 0.0)?
            .set_default("gateway_retries", 3)?
            .set_default("retention_days", DEFAULT_RETENTION_DAYS)?
            .set_default("pause_check_ms", 1000)?
            .set_default("management_url", "http://127.0.0.1:15672")?;
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(false));
        }
        let settings: Self = builder
            .add_source(env.try_parsing(true))
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what deserializing cannot: the ranges outside of which a
    /// setting would panic a worker, overflow a deadline or silently mean
    /// something else (a prefetch of 0 is "unlimited" to the broker, a NaN
    /// failure rate never fails). [`load`](Self::load) calls it; so does a
    /// service given settings built in code. The error names the setting,
    /// its `ORDERFLOW_*` variable, the accepted range and the value found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let timeout = format!("1 to {MAX_TIMEOUT_SECS} (365 days)");
        let timeout_ok = |secs: u64| (1..=MAX_TIMEOUT_SECS).contains(&secs);
        let at_least_one = |field, value: u64| {
            (
                field,
                value >= 1,
                "at least 1".to_owned(),
                value.to_string(),
            )
        };
        let failure_rate = self.gateway_failure_rate;
        // (setting, whether its value is accepted, what is, the value).
        #[rustfmt::skip]
        let checks = [
            ("generate_info_timeout_secs", timeout_ok(self.generate_info_timeout_secs), timeout.clone(), self.generate_info_timeout_secs.to_string()),
            ("payment_timeout_secs", timeout_ok(self.payment_timeout_secs), timeout.clone(), self.payment_timeout_secs.to_string()),
            ("flow_timeout_secs", timeout_ok(self.flow_timeout_secs), timeout, self.flow_timeout_secs.to_string()),
            // A prefetch of 0 would be "no limit" to the broker.
            ("prefetch", self.prefetch >= 1, format!("1 to {}", u16::MAX), self.prefetch.to_string()),
            // More can never be busy: each invocation holds a delivery.
            ("concurrency", (1..=MAX_CONCURRENCY).contains(&self.concurrency), format!("1 to {MAX_CONCURRENCY}"), self.concurrency.to_string()),
            at_least_one("db_pool_size", self.db_pool_size.into()),
            at_least_one("http_request_timeout_ms", self.http_request_timeout_ms),
            at_least_one("http_max_concurrency", self.http_max_concurrency.try_into().unwrap_or(u64::MAX)),
            at_least_one("http_max_waiters", self.http_max_waiters.try_into().unwrap_or(u64::MAX)),
            at_least_one("http_db_pool_size", self.http_db_pool_size.into()),
            // 0 would time out every publish before its confirm.
            at_least_one("publish_timeout_ms", self.publish_timeout_ms),
            at_least_one("pause_check_ms", self.pause_check_ms),
            ("gateway_latency_ms", self.gateway_latency_ms <= MAX_GATEWAY_LATENCY_MS, format!("0 to {MAX_GATEWAY_LATENCY_MS} (a minute)"), self.gateway_latency_ms.to_string()),
            // False for NaN too.
            ("gateway_failure_rate", (0.0..=1.0).contains(&failure_rate), "a number from 0 to 1".to_owned(), failure_rate.to_string()),
        ];
        if let Some((field, _, accepted, value)) = checks.into_iter().find(|(_, ok, _, _)| !ok) {
            let variable = format!("ORDERFLOW_{}", field.to_uppercase());
            return Err(invalid(format!(
                "{field} ({variable}) must be {accepted}, not {value}"
            )));
        }
        if let Some(token) = &self.operator_token
            && token.expose_secret().chars().count() < MIN_OPERATOR_TOKEN_CHARS
        {
            return Err(invalid(format!(
                "operator_token (ORDERFLOW_OPERATOR_TOKEN) must be at least \
                 {MIN_OPERATOR_TOKEN_CHARS} characters, not {}",
                token.expose_secret().chars().count()
            )));
        }
        if self.retention_days == 0 {
            return Err(invalid(format!(
                "retention_days (ORDERFLOW_RETENTION_DAYS) must be at least 1 day, not 0: inbox \
                 rows must outlive every redelivery and dead-letter replay (default \
                 {DEFAULT_RETENTION_DAYS})"
            )));
        }
        if self.retention().as_secs() <= self.flow_timeout_secs {
            return Err(invalid(format!(
                "retention_days (ORDERFLOW_RETENTION_DAYS) is {} day(s), not longer than the flow \
                 timeout of {} s (ORDERFLOW_FLOW_TIMEOUT_SECS): the inbox rows and state of a saga \
                 still running would be pruned; raise the retention",
                self.retention_days, self.flow_timeout_secs
            )));
        }
        Ok(())
    }

    /// How long inbox rows and finished sagas are kept (`retention_days`).
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.retention_days) * 86_400)
    }

    /// How often a consumer looks whether its service is paused.
    pub fn pause_check(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.pause_check_ms)
    }

    /// The broker URL of operator actions: `ORDERFLOW_OPERATOR_AMQP_URL`,
    /// else the service's own.
    pub fn operator_amqp_url(&self) -> &SecretString {
        self.operator_amqp_url.as_ref().unwrap_or(&self.amqp_url)
    }

    /// The AMQP URL with its password masked, for logs and error messages.
    pub fn amqp_url_redacted(&self) -> String {
        redact_url(self.amqp_url.expose_secret())
    }

    /// The database URL with its password masked, for logs and error messages.
    pub fn database_url_redacted(&self) -> String {
        redact_url(self.database_url.expose_secret())
    }
}

/// `scheme://user:secret@host/..` → `scheme://user:***@host/..`; each URL
/// of a comma-separated list (the nodes of a broker cluster).
pub fn redact_url(url: &str) -> String {
    // A list of broker nodes (comma-separated): each redacted.
    if url.contains(',') {
        return url
            .split(',')
            .map(redact_one_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(url)
}

fn redact_one_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> config::Environment {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        config::Environment::with_prefix("ORDERFLOW").source(Some(map))
    }

    #[test]
    fn defaults_are_those_of_the_design() {
        let settings = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(
            settings.amqp_url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(settings.http_addr, "127.0.0.1:8080");
        assert_eq!(settings.namespace, "");
        assert_eq!(settings.generate_info_timeout_secs, 300);
        assert_eq!(settings.payment_timeout_secs, 300);
        assert_eq!(settings.flow_timeout_secs, 3600);
        assert!(settings.token_keys.is_none());
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(settings.http_request_timeout_ms, 10_000);
        assert_eq!(settings.http_max_concurrency, 256);
        assert_eq!(settings.http_max_waiters, 1024);
        assert_eq!(settings.http_db_pool_size, 4);
        assert_eq!(settings.retention_days, 30);
        assert_eq!(
            settings.retention(),
            std::time::Duration::from_hours(30 * 24)
        );
    }

    #[test]
    fn the_retention_comes_from_the_environment_and_is_at_least_a_day() {
        let settings =
            Settings::load_from(None, env(&[("ORDERFLOW_RETENTION_DAYS", "90")])).unwrap();
        assert_eq!(settings.retention_days, 90);
        let err = Settings::load_from(None, env(&[("ORDERFLOW_RETENTION_DAYS", "0")])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ORDERFLOW_RETENTION_DAYS") && text.contains("at least 1 day"),
            "{text}"
        );
        // A saga may run as long as the flow timeout: its rows must outlive it.
        let err = Settings::load_from(
            None,
            env(&[
                ("ORDERFLOW_RETENTION_DAYS", "1"),
                ("ORDERFLOW_FLOW_TIMEOUT_SECS", "172800"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ORDERFLOW_FLOW_TIMEOUT_SECS") && text.contains("raise the retention"),
            "{text}"
        );
    }

    #[test]
    fn the_http_bounds_come_from_the_environment() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("ORDERFLOW_HTTP_REQUEST_TIMEOUT_MS", "250"),
                ("ORDERFLOW_HTTP_MAX_CONCURRENCY", "8"),
                ("ORDERFLOW_HTTP_MAX_WAITERS", "16"),
                ("ORDERFLOW_HTTP_DB_POOL_SIZE", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.http_request_timeout_ms, 250);
        assert_eq!(settings.http_max_concurrency, 8);
        assert_eq!(settings.http_max_waiters, 16);
        assert_eq!(settings.http_db_pool_size, 2);
    }

    #[test]
    fn a_zero_http_bound_is_a_clear_error() {
        for (variable, field) in [
            (
                "ORDERFLOW_HTTP_REQUEST_TIMEOUT_MS",
                "http_request_timeout_ms",
            ),
            ("ORDERFLOW_HTTP_MAX_CONCURRENCY", "http_max_concurrency"),
            ("ORDERFLOW_HTTP_MAX_WAITERS", "http_max_waiters"),
            ("ORDERFLOW_HTTP_DB_POOL_SIZE", "http_db_pool_size"),
        ] {
            let err = Settings::load_from(None, env(&[(variable, "0")])).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(field) && text.contains(variable) && text.contains("at least 1"),
                "{text}"
            );
        }
        let err =
            Settings::load_from(None, env(&[("ORDERFLOW_HTTP_MAX_WAITERS", "-1")])).unwrap_err();
        assert!(err.to_string().contains("http_max_waiters"), "{err}");
    }

    #[test]
    fn every_bounded_setting_names_its_variable_and_range() {
        for (variable, value, field, range) in [
            (
                "ORDERFLOW_GENERATE_INFO_TIMEOUT_SECS",
                "0",
                "generate_info_timeout_secs",
                "1 to 31536000",
            ),
            (
                "ORDERFLOW_PAYMENT_TIMEOUT_SECS",
                "31536001",
                "payment_timeout_secs",
                "1 to 31536000",
            ),
            (
                "ORDERFLOW_FLOW_TIMEOUT_SECS",
                "18446744073709551615",
                "flow_timeout_secs",
                "1 to 31536000",
            ),
            ("ORDERFLOW_PREFETCH", "0", "prefetch", "1 to 65535"),
            ("ORDERFLOW_CONCURRENCY", "0", "concurrency", "1 to 65535"),
            (
                "ORDERFLOW_CONCURRENCY",
                "18446744073709551615",
                "concurrency",
                "1 to 65535",
            ),
            ("ORDERFLOW_DB_POOL_SIZE", "0", "db_pool_size", "at least 1"),
            (
                "ORDERFLOW_PUBLISH_TIMEOUT_MS",
                "0",
                "publish_timeout_ms",
                "at least 1",
            ),
            (
                "ORDERFLOW_GATEWAY_LATENCY_MS",
                "60001",
                "gateway_latency_ms",
                "0 to 60000",
            ),
            (
                "ORDERFLOW_GATEWAY_FAILURE_RATE",
                "NaN",
                "gateway_failure_rate",
                "from 0 to 1",
            ),
            (
                "ORDERFLOW_GATEWAY_FAILURE_RATE",
                "-0.1",
                "gateway_failure_rate",
                "from 0 to 1",
            ),
            (
                "ORDERFLOW_GATEWAY_FAILURE_RATE",
                "1.5",
                "gateway_failure_rate",
                "from 0 to 1",
            ),
        ] {
            let err = Settings::load_from(None, env(&[(variable, value)])).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(field) && text.contains(variable) && text.contains(range),
                "{variable}={value}: {text}"
            );
        }
    }

    #[test]
    fn the_ends_of_every_range_are_accepted() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("ORDERFLOW_GENERATE_INFO_TIMEOUT_SECS", "1"),
                ("ORDERFLOW_PAYMENT_TIMEOUT_SECS", "31536000"),
                ("ORDERFLOW_PREFETCH", "65535"),
                ("ORDERFLOW_CONCURRENCY", "65535"),
                ("ORDERFLOW_PUBLISH_TIMEOUT_MS", "1"),
                ("ORDERFLOW_GATEWAY_LATENCY_MS", "0"),
                ("ORDERFLOW_GATEWAY_FAILURE_RATE", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.payment_timeout_secs, MAX_TIMEOUT_SECS);
        assert_eq!(settings.concurrency, MAX_CONCURRENCY);
        assert!((settings.gateway_failure_rate - 1.0).abs() < f64::EPSILON);
        // The defaults are within every range (load checks them too).
        Settings::defaults().unwrap().validate().unwrap();
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        let dir = std::env::temp_dir().join(format!("orderflow-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("orderflow.toml");
        std::fs::write(
            &file,
            "namespace = \"from-file\"\nhttp_addr = \"0.0.0.0:1\"\n",
        )
        .unwrap();
        let settings = Settings::load_from(
            Some(&file),
            env(&[
                ("ORDERFLOW_NAMESPACE", "from-env"),
                ("ORDERFLOW_PAYMENT_TIMEOUT_SECS", "7"),
                ("ORDERFLOW_LOG_FORMAT", "json"),
                ("ORDERFLOW_TOKEN_KEYS", "k1:s3cret"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.namespace, "from-env");
        assert_eq!(settings.http_addr, "0.0.0.0:1");
        assert_eq!(settings.payment_timeout_secs, 7);
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(
            settings.token_keys.as_ref().unwrap().expose_secret(),
            "k1:s3cret"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_operator_token_is_a_secret_of_sixteen_characters_or_more() {
        let settings = Settings::load_from(None, env(&[])).unwrap();
        assert!(settings.operator_token.is_none());
        assert_eq!(settings.pause_check_ms, 1000);
        let err = Settings::load_from(None, env(&[("ORDERFLOW_OPERATOR_TOKEN", "short")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ORDERFLOW_OPERATOR_TOKEN")
                && err.contains("16")
                && !err.contains("short"),
            "{err}"
        );
        let settings = Settings::load_from(
            None,
            env(&[(
                "ORDERFLOW_OPERATOR_TOKEN",
                "an-operator-token-of-some-length",
            )]),
        )
        .unwrap();
        assert!(!format!("{settings:?}").contains("an-operator-token"));
        assert_eq!(
            settings.operator_amqp_url().expose_secret(),
            settings.amqp_url.expose_secret()
        );
    }

    #[test]
    fn secrets_are_never_printed() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("ORDERFLOW_TOKEN_KEYS", "k1:topsecretkey"),
                ("ORDERFLOW_AMQP_URL", "amqp://svc:hunter2@broker:5672/%2f"),
            ]),
        )
        .unwrap();
        let printed = format!("{settings:?}");
        assert!(!printed.contains("topsecretkey"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert_eq!(
            settings.amqp_url_redacted(),
            "amqp://svc:***@broker:5672/%2f"
        );
    }

    #[test]
    fn every_node_of_a_broker_list_is_redacted() {
        let settings = Settings::load_from(
            None,
            env(&[(
                "ORDERFLOW_AMQP_URL",
                "amqp://svc:hunter2@n1:5701/%2f,amqp://svc:hunter3@n2:5702/%2f",
            )]),
        )
        .unwrap();
        assert_eq!(
            settings.amqp_url_redacted(),
            "amqp://svc:***@n1:5701/%2f,amqp://svc:***@n2:5702/%2f"
        );
        assert!(!format!("{settings:?}").contains("hunter3"));
    }

    #[test]
    fn a_bad_number_is_a_clear_error() {
        let err =
            Settings::load_from(None, env(&[("ORDERFLOW_FLOW_TIMEOUT_SECS", "soon")])).unwrap_err();
        assert!(err.to_string().contains("flow_timeout_secs"), "{err}");
    }
}
