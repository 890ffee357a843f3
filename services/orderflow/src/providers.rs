//! Loading the payment methods from `config/providers.toml`: the topology has one
//! `payment-provider-<method>` queue per method, so the CLI reads that file to
//! build the model.

use std::path::Path;

use anyhow::Context;

/// Where the payment providers are configured, relative to the repository root.
pub const DEFAULT_PROVIDERS_PATH: &str = "config/providers.toml";

/// The payment methods of `config/providers.toml` (the keys of its
/// `[providers.<method>]` tables), in the order they appear in the file.
///
/// A method name becomes part of queue names and of the routing key
/// `payment.selected.<method>`, so it must be non-empty and use only lowercase
/// ASCII letters, digits, `-` and `_` (a `.`, `*` or `#` would change what the
/// topic bindings match). A missing, unreadable or malformed file, a file without
/// any method, or a bad method name is an error that names the file.
pub fn load_payment_methods(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the payment providers file {} (run from the repository root or pass --providers)",
            path.display()
        )
    })?;
    parse_payment_methods(&text)
        .with_context(|| format!("invalid payment providers file {}", path.display()))
}

/// [`load_payment_methods`] on text already read: the same parser the
/// services use (orderflow_shared::metadata), so the CLI and the workers
/// cannot disagree on which methods exist.
fn parse_payment_methods(text: &str) -> anyhow::Result<Vec<String>> {
    orderflow_shared::metadata::payment_methods(text)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A file in a fresh per-test directory, removed when dropped.
    struct TempFile {
        dir: PathBuf,
        path: PathBuf,
    }

    impl TempFile {
        fn new(test: &str, contents: Option<&str>) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "orderflow-cli-{test}-{}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            let path = dir.join("providers.toml");
            if let Some(contents) = contents {
                std::fs::write(&path, contents).expect("write temp file");
            }
            Self { dir, path }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn methods_keep_the_file_order() {
        let file = TempFile::new(
            "order",
            Some(
                "# comment\n\
                 [providers.zhifubao]\ndisplay_name = \"Z\"\ndiscount_percent = 90\n\n\
                 [providers.weixin]\ndisplay_name = \"W\"\ndiscount_percent = 90\n\n\
                 [other]\nkey = 1\n\n\
                 [providers.alpha]\ndisplay_name = \"A\"\ndiscount_percent = 90\n\n\
                 [providers.unionpay]\ndisplay_name = \"U\"\ndiscount_percent = 90\n",
            ),
        );
        let methods = load_payment_methods(&file.path).expect("valid file");
        assert_eq!(methods, ["zhifubao", "weixin", "alpha", "unionpay"]);
    }

    #[test]
    fn the_repository_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/providers.toml");
        let methods = load_payment_methods(&path).expect("config/providers.toml is valid");
        assert!(!methods.is_empty());
    }

    #[test]
    fn a_bad_file_is_an_error_naming_the_file() {
        let cases = [
            ("malformed", Some("[providers.zhifubao\ndisplay_name = 1\n")),
            ("no-providers", Some("[merchants.acme]\nname = \"x\"\n")),
            ("not-a-table", Some("[providers]\nzhifubao = \"yes\"\n")),
            (
                "bad-name",
                Some("[providers.\"pay.pal\"]\ndisplay_name = \"x\"\ndiscount_percent = 90\n"),
            ),
            ("empty", Some("[providers]\n")),
            ("missing", None),
        ];
        for (case, contents) in cases {
            let file = TempFile::new(case, contents);
            let error = load_payment_methods(&file.path).expect_err(case);
            let message = format!("{error:#}");
            assert!(
                message.contains(&file.path.display().to_string()),
                "{case}: {message}"
            );
        }
    }
}
