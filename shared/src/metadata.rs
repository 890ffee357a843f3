//! Business metadata from `config/`: merchants (which payment methods each
//! accepts), the catalogue (server-side prices) and the payment providers
//! (discounts). The repository's files are compiled in as defaults, so a binary
//! works from any directory; `ORDERFLOW_CONFIG_DIR` points at other files.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use serde::Deserialize;

const EMBEDDED_MERCHANTS: &str = include_str!("../../config/merchants.toml");
const EMBEDDED_CATALOGUE: &str = include_str!("../../config/catalogue.toml");
const EMBEDDED_PROVIDERS: &str = include_str!("../../config/providers.toml");

#[derive(Clone, Debug, Deserialize)]
pub struct Merchant {
    #[serde(default)]
    pub display_name: Option<String>,
    pub payment_methods: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct MerchantsFile {
    default: Merchant,
    #[serde(default)]
    merchants: BTreeMap<String, Merchant>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Product {
    pub name: String,
    pub price_cents: i64,
}

#[derive(Clone, Debug, Deserialize)]
struct CatalogueFile {
    products: BTreeMap<String, Product>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Provider {
    pub display_name: String,
    /// Share of the server-side amount that is charged, in percent.
    pub discount_percent: i64,
}

#[derive(Clone, Debug, Deserialize)]
struct ProvidersFile {
    // A Vec of pairs keeps the file's order (toml's preserve_order).
    providers: toml::Table,
}

/// Merchants, catalogue and providers, validated against each other.
#[derive(Clone, Debug)]
pub struct Metadata {
    default_merchant: Merchant,
    merchants: BTreeMap<String, Merchant>,
    products: BTreeMap<String, Product>,
    /// In file order.
    providers: Vec<(String, Provider)>,
}

/// Why an order cannot be priced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PricingError {
    #[error("the order has no products")]
    NoProducts,
    #[error("unknown sku `{0}`")]
    UnknownSku(String),
    #[error("quantity of `{0}` must be at least 1")]
    BadQuantity(String),
    #[error("the amount is too large")]
    Overflow,
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, name: &str) -> anyhow::Result<T> {
    toml::from_str(text).with_context(|| format!("invalid {name}"))
}

/// The `[providers.<method>]` entries of a providers.toml text, in file
/// order, validated (method names become part of routing keys).
fn parse_providers(text: &str) -> anyhow::Result<Vec<(String, Provider)>> {
    let file: ProvidersFile = parse(text, "providers.toml")?;
    let mut providers = Vec::new();
    for (method, entry) in file.providers {
        ensure!(
            is_valid_method(&method),
            "providers.toml: method `{method}` must use lowercase letters, digits, `-`, `_` \
             (it becomes part of a routing key)"
        );
        let provider: Provider = entry
            .try_into()
            .with_context(|| format!("providers.toml: [providers.{method}]"))?;
        ensure!(
            (1..=100).contains(&provider.discount_percent),
            "providers.toml: discount_percent of `{method}` must be 1..=100"
        );
        providers.push((method, provider));
    }
    ensure!(
        !providers.is_empty(),
        "providers.toml: no payment provider configured"
    );
    Ok(providers)
}

fn is_valid_method(method: &str) -> bool {
    !method.is_empty()
        && method
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The payment methods of a providers.toml text, in file order.
pub fn payment_methods(providers_toml: &str) -> anyhow::Result<Vec<String>> {
    Ok(parse_providers(providers_toml)?
        .into_iter()
        .map(|(method, _)| method)
        .collect())
}

impl Metadata {
    /// The repository's `config/` files, compiled in.
    pub fn embedded() -> anyhow::Result<Self> {
        Self::from_texts(EMBEDDED_MERCHANTS, EMBEDDED_CATALOGUE, EMBEDDED_PROVIDERS)
    }

    /// `merchants.toml`, `catalogue.toml` and `providers.toml` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))
        };
        Self::from_texts(
            &read("merchants.toml")?,
            &read("catalogue.toml")?,
            &read("providers.toml")?,
        )
        .with_context(|| format!("in the metadata of {}", dir.display()))
    }

    /// `ORDERFLOW_CONFIG_DIR` when set, the compiled-in files otherwise.
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var_os("ORDERFLOW_CONFIG_DIR") {
            Some(dir) => Self::load(Path::new(&dir)),
            None => Self::embedded(),
        }
    }

    pub fn from_texts(merchants: &str, catalogue: &str, providers: &str) -> anyhow::Result<Self> {
        let merchants: MerchantsFile = parse(merchants, "merchants.toml")?;
        let catalogue: CatalogueFile = parse(catalogue, "catalogue.toml")?;
        let providers = parse_providers(providers)?;
        for (product, entry) in &catalogue.products {
            ensure!(
                entry.price_cents > 0,
                "catalogue.toml: price of `{product}` must be positive"
            );
        }
        let metadata = Self {
            default_merchant: merchants.default,
            merchants: merchants.merchants,
            products: catalogue.products,
            providers,
        };
        let merchant_rules = std::iter::once(("default", &metadata.default_merchant))
            .chain(metadata.merchants.iter().map(|(k, v)| (k.as_str(), v)));
        for (merchant, rule) in merchant_rules {
            ensure!(
                !rule.payment_methods.is_empty(),
                "merchants.toml: `{merchant}` accepts no payment method"
            );
            for method in &rule.payment_methods {
                if metadata.provider(method).is_none() {
                    bail!(
                        "merchants.toml: `{merchant}` accepts `{method}`, which has no entry in providers.toml"
                    );
                }
            }
        }
        Ok(metadata)
    }

    /// The payment methods `supplier` accepts (the default set for unknown suppliers).
    pub fn payment_methods_for(&self, supplier: &str) -> &[String] {
        &self
            .merchants
            .get(supplier)
            .unwrap_or(&self.default_merchant)
            .payment_methods
    }

    /// The merchants with their own entry, by name.
    pub fn merchants(&self) -> impl Iterator<Item = (&str, &Merchant)> {
        self.merchants.iter().map(|(name, m)| (name.as_str(), m))
    }

    /// The catalogue, by sku.
    pub fn products(&self) -> impl Iterator<Item = (&str, &Product)> {
        self.products.iter().map(|(sku, p)| (sku.as_str(), p))
    }

    pub fn merchant(&self, supplier: &str) -> Option<&Merchant> {
        self.merchants.get(supplier)
    }

    pub fn product(&self, sku: &str) -> Option<&Product> {
        self.products.get(sku)
    }

    pub fn provider(&self, method: &str) -> Option<&Provider> {
        self.providers
            .iter()
            .find(|(name, _)| name == method)
            .map(|(_, provider)| provider)
    }

    /// Every configured payment method, in file order.
    pub fn methods(&self) -> Vec<String> {
        self.providers
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The server-side amount of `products` in cents.
    pub fn price<'a>(
        &self,
        products: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> Result<i64, PricingError> {
        let mut total: i64 = 0;
        let mut any = false;
        for (sku, quantity) in products {
            any = true;
            let product = self
                .product(sku)
                .ok_or_else(|| PricingError::UnknownSku(sku.to_owned()))?;
            if quantity < 1 {
                return Err(PricingError::BadQuantity(sku.to_owned()));
            }
            total = product
                .price_cents
                .checked_mul(quantity)
                .and_then(|line| total.checked_add(line))
                .ok_or(PricingError::Overflow)?;
        }
        if any {
            Ok(total)
        } else {
            Err(PricingError::NoProducts)
        }
    }

    /// What `method` charges for `amount_cents` (its discount applied, rounded half up).
    pub fn charge_for(&self, method: &str, amount_cents: i64) -> Option<i64> {
        let provider = self.provider(method)?;
        let scaled = i128::from(amount_cents) * i128::from(provider.discount_percent);
        i64::try_from((scaled + 50) / 100).ok()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::strategies;

    fn sku() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("hotpot-set".to_owned()),
            Just("tea".to_owned()),
            strategies::text(),
        ]
    }

    fn method() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("zhifubao".to_owned()),
            Just("weixin".to_owned()),
            Just("unionpay".to_owned()),
            strategies::text(),
        ]
    }

    fn quantity() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::from(u32::MAX)),
            1..=i64::from(u32::MAX),
            strategies::extreme_i64(),
        ]
    }

    proptest! {
        /// Any lines, quantities at the extremes: a positive total that is
        /// the exact sum, or the reason there is none.
        #[test]
        fn pricing_never_overflows(lines in prop::collection::vec((sku(), quantity()), 0..8)) {
            let metadata = Metadata::embedded().unwrap();
            let priced = metadata.price(lines.iter().map(|(sku, q)| (sku.as_str(), *q)));
            if let Ok(total) = priced {
                let exact: i128 = lines
                    .iter()
                    .map(|(sku, q)| {
                        i128::from(metadata.product(sku).unwrap().price_cents) * i128::from(*q)
                    })
                    .sum();
                prop_assert!(total > 0);
                prop_assert_eq!(i128::from(total), exact);
            }
        }

        /// Any method, any amount (`i64::MIN`, `i64::MAX`): the discounted
        /// charge, or `None` for an unknown method; never an overflow.
        #[test]
        fn charging_never_overflows(method in method(), amount in strategies::extreme_i64()) {
            let metadata = Metadata::embedded().unwrap();
            let exact = metadata.provider(&method).map(|provider| {
                (i128::from(amount) * i128::from(provider.discount_percent) + 50) / 100
            });
            prop_assert_eq!(metadata.charge_for(&method, amount).map(i128::from), exact);
        }
    }

    #[test]
    fn the_repository_metadata_is_valid_and_follows_the_design() {
        let metadata = Metadata::embedded().unwrap();
        assert_eq!(
            metadata.payment_methods_for("haidilao"),
            ["zhifubao", "weixin"]
        );
        assert_eq!(
            metadata.payment_methods_for("some-other-shop"),
            ["zhifubao", "weixin", "unionpay"]
        );
        assert_eq!(metadata.methods(), ["zhifubao", "weixin", "unionpay"]);
        assert_eq!(metadata.charge_for("zhifubao", 10_000), Some(8_000));
        assert_eq!(metadata.charge_for("weixin", 10_000), Some(5_000));
        assert_eq!(metadata.charge_for("unionpay", 10_000), Some(7_000));
        assert_eq!(metadata.charge_for("bitcoin", 10_000), None);
    }

    #[test]
    fn prices_come_from_the_catalogue() {
        let metadata = Metadata::embedded().unwrap();
        assert_eq!(
            metadata.price([("hotpot-set", 2), ("tea", 1)]),
            Ok(2 * 12_800 + 900)
        );
        assert_eq!(
            metadata.price([("caviar", 1)]),
            Err(PricingError::UnknownSku("caviar".into()))
        );
        assert_eq!(
            metadata.price([("tea", 0)]),
            Err(PricingError::BadQuantity("tea".into()))
        );
        assert_eq!(metadata.price([]), Err(PricingError::NoProducts));
        assert_eq!(
            metadata.price([("tea", i64::MAX)]),
            Err(PricingError::Overflow)
        );
    }

    #[test]
    fn a_merchant_method_without_a_provider_is_rejected() {
        let error = Metadata::from_texts(
            "[default]\npayment_methods = [\"zhifubao\", \"paypal\"]\n",
            EMBEDDED_CATALOGUE,
            EMBEDDED_PROVIDERS,
        )
        .unwrap_err();
        assert!(format!("{error:#}").contains("paypal"), "{error:#}");
    }
}
