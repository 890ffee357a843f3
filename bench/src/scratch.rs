//! Throwaway databases for benchmarks: created under a random name on the
//! server of a URL, dropped at the end (the store's own helpers do both).

use anyhow::Context as _;
use orderflow_shared::store;
use secrecy::SecretString;

/// A short random tag for the names of one run's throwaway resources.
pub fn tag() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 10..].to_owned()
}

/// A database that exists for one benchmark run.
#[derive(Debug)]
pub struct ScratchDatabase {
    url: SecretString,
    name: String,
}

impl ScratchDatabase {
    /// Creates `<prefix>_<tag>` on the server of `server_url`.
    pub async fn create(server_url: &SecretString, prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}_{}", tag());
        let url = store::url_with_database(server_url, &name)?;
        store::ensure_database(&url)
            .await
            .with_context(|| format!("creating the benchmark's database {name}"))?;
        Ok(Self { url, name })
    }

    /// The URL of this database.
    pub fn url(&self) -> &SecretString {
        &self.url
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops it, closing whatever is still connected.
    pub async fn drop_now(self) -> anyhow::Result<()> {
        store::drop_database(&self.url).await.with_context(|| {
            format!(
                "dropping the benchmark's database {}; drop it by hand",
                self.name
            )
        })
    }
}
