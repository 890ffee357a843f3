//! What clients send (`POST /orders`, `POST /orders/{id}/payment`, the
//! `limit` of a paged query), its validation, and the idempotency hash of a
//! new order. Fields not listed here, such as a client's price, are
//! ignored: prices come from the catalogue.

use std::fmt::Write as _;
use std::ops::RangeInclusive;

use orderflow_shared::events::{OrderStarted, ProductLine};
use orderflow_shared::metadata::Metadata;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

pub const MAX_SUPPLIER_CHARS: usize = 100;
pub const MAX_ADDRESS_CHARS: usize = 500;
pub const MAX_PRODUCT_LINES: usize = 100;
pub const MAX_SKU_CHARS: usize = 100;
pub const MAX_QUANTITY: i64 = 10_000;
pub const MAX_ORDER_ID_CHARS: usize = 100;
pub const MAX_TOKEN_CHARS: usize = 4096;
pub const MAX_METHOD_CHARS: usize = 50;

/// `POST /orders` body.
#[derive(Debug, Deserialize)]
pub struct NewOrder {
    #[serde(default)]
    pub order_id: Option<String>,
    pub supplier: String,
    pub products: Vec<NewLine>,
    pub address: String,
}

/// One product line as sent. The quantity is signed so that `0` and `-1`
/// get the same clear message.
#[derive(Debug, Deserialize)]
pub struct NewLine {
    pub sku: String,
    pub quantity: i64,
}

/// `POST /orders/{id}/payment` body.
#[derive(Debug, Deserialize)]
pub struct PaymentSubmission {
    pub token: String,
    pub method: String,
}

/// A validated new order: the event to start it with, and the hash of what
/// the client asked for.
#[derive(Debug)]
pub struct ValidOrder {
    pub started: OrderStarted,
    pub request_hash: String,
}

/// `value` has 1..=`max` characters and is not blank.
fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if value.trim().is_empty() || chars > max {
        return Err(ApiError::unprocessable(format!(
            "{field} must be 1 to {max} characters and not blank"
        )));
    }
    Ok(())
}

/// 1..=100 characters of `A-Z a-z 0-9 . _ : -`.
pub fn check_order_id(id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ORDER_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::unprocessable(format!(
            "order_id must be 1 to {MAX_ORDER_ID_CHARS} characters of A-Z a-z 0-9 . _ : -"
        )))
    }
}

/// The hex SHA-256 of the canonical JSON of what decides an order: supplier,
/// product lines (in the order sent) and address. Serialised from structs, so
/// the key order is fixed whatever serde_json's map features are.
fn request_hash(order: &OrderStarted) -> String {
    #[derive(Serialize)]
    struct Line<'a> {
        quantity: u32,
        sku: &'a str,
    }
    #[derive(Serialize)]
    struct Canonical<'a> {
        address: &'a str,
        products: Vec<Line<'a>>,
        supplier: &'a str,
    }
    let canonical = Canonical {
        address: &order.address,
        products: order
            .products
            .iter()
            .map(|line| Line {
                quantity: line.quantity,
                sku: &line.sku,
            })
            .collect(),
        supplier: &order.supplier,
    };
    // Serialising strings and integers cannot fail.
    let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
    let mut hex = String::with_capacity(64);
    for byte in Sha256::digest(&bytes) {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

impl NewOrder {
    /// Checks every field, prices the products against the catalogue (an
    /// unknown sku is rejected here, so such an order never starts) and
    /// gives the order an id (a new UUID v7 unless the client chose one).
    pub fn validate(self, metadata: &Metadata) -> Result<ValidOrder, ApiError> {
        if let Some(id) = &self.order_id {
            check_order_id(id)?;
        }
        check_text("supplier", &self.supplier, MAX_SUPPLIER_CHARS)?;
        check_text("address", &self.address, MAX_ADDRESS_CHARS)?;
        if self.products.is_empty() || self.products.len() > MAX_PRODUCT_LINES {
            return Err(ApiError::unprocessable(format!(
                "products must have 1 to {MAX_PRODUCT_LINES} lines"
            )));
        }
        let mut products = Vec::with_capacity(self.products.len());
        for (i, line) in self.products.into_iter().enumerate() {
            check_text(&format!("products[{i}].sku"), &line.sku, MAX_SKU_CHARS)?;
            let quantity = u32::try_from(line.quantity)
                .ok()
                .filter(|q| (1..=MAX_QUANTITY).contains(&i64::from(*q)))
                .ok_or_else(|| {
                    ApiError::unprocessable(format!(
                        "products[{i}].quantity must be 1 to {MAX_QUANTITY}, got {}",
                        line.quantity
                    ))
                })?;
            products.push(ProductLine {
                sku: line.sku,
                quantity,
            });
        }
        metadata
            .price(
                products
                    .iter()
                    .map(|line| (line.sku.as_str(), i64::from(line.quantity))),
            )
            .map_err(|error| ApiError::unprocessable(error.to_string()))?;
        let started = OrderStarted {
            order_id: self
                .order_id
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
            supplier: self.supplier,
            products,
            address: self.address,
        };
        let request_hash = request_hash(&started);
        Ok(ValidOrder {
            started,
            request_hash,
        })
    }
}

impl PaymentSubmission {
    pub fn validate(&self) -> Result<(), ApiError> {
        check_text("token", &self.token, MAX_TOKEN_CHARS)?;
        check_text("method", &self.method, MAX_METHOD_CHARS)
    }
}

/// A query's `limit` (`default` when absent); outside `range` it is a 400
/// that says the range and the value.
pub fn query_limit<T>(limit: Option<T>, default: T, range: RangeInclusive<T>) -> Result<T, ApiError>
where
    T: PartialOrd + Copy + std::fmt::Display,
{
    let limit = limit.unwrap_or(default);
    if range.contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request(format!(
            "limit must be between {} and {}, not {limit}",
            range.start(),
            range.end()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> Metadata {
        Metadata::embedded().unwrap()
    }

    fn order(json: serde_json::Value) -> Result<ValidOrder, ApiError> {
        serde_json::from_value::<NewOrder>(json)
            .unwrap()
            .validate(&metadata())
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "order_id": "o-1",
            "supplier": "haidilao",
            "products": [{"sku": "tea", "quantity": 2}, {"sku": "tofu", "quantity": 1}],
            "address": "1 Harbour Road",
        })
    }

    #[test]
    fn the_hash_covers_what_decides_the_order_and_ignores_prices() {
        let plain = order(base()).unwrap();
        let mut priced = base();
        priced["products"][0]["price"] = 1.into();
        priced["amount_cents"] = 1.into();
        assert_eq!(order(priced).unwrap().request_hash, plain.request_hash);
        let mut reordered = base();
        reordered["products"] =
            serde_json::json!([{"sku": "tofu", "quantity": 1}, {"sku": "tea", "quantity": 2}]);
        assert_ne!(order(reordered).unwrap().request_hash, plain.request_hash);
        let mut other_address = base();
        other_address["address"] = "2 Harbour Road".into();
        assert_ne!(
            order(other_address).unwrap().request_hash,
            plain.request_hash
        );
        assert_eq!(plain.request_hash.len(), 64);
    }

    #[test]
    fn every_limit_is_a_422() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("supplier", serde_json::json!("")),
            ("supplier", serde_json::json!("x".repeat(101))),
            ("address", serde_json::json!("   ")),
            ("products", serde_json::json!([])),
            (
                "products",
                serde_json::json!([{"sku": "tea", "quantity": 0}]),
            ),
            (
                "products",
                serde_json::json!([{"sku": "tea", "quantity": -3}]),
            ),
            (
                "products",
                serde_json::json!([{"sku": "tea", "quantity": 10_001}]),
            ),
            ("products", serde_json::json!([{"sku": "", "quantity": 1}])),
            (
                "products",
                serde_json::json!([{"sku": "caviar", "quantity": 1}]),
            ),
            ("order_id", serde_json::json!("has space")),
            ("order_id", serde_json::json!("x".repeat(101))),
            ("order_id", serde_json::json!("")),
        ];
        for (field, value) in cases {
            let mut body = base();
            body[field] = value.clone();
            let error = order(body).unwrap_err();
            assert_eq!(error.status, 422, "{field} = {value}: {}", error.message);
        }
        let mut body = base();
        body["products"] = serde_json::json!([{"sku": "caviar", "quantity": 1}]);
        assert_eq!(order(body).unwrap_err().message, "unknown sku `caviar`");
    }

    #[test]
    fn an_order_without_id_gets_a_uuid_v7() {
        let mut body = base();
        body.as_object_mut().unwrap().remove("order_id");
        let id = order(body).unwrap().started.order_id;
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
        let ok = order(base()).unwrap();
        assert_eq!(ok.started.order_id, "o-1");
        assert_eq!(ok.started.products[0].quantity, 2);
    }
}
