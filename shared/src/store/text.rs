//! Enums stored as PostgreSQL `text`: [`text_enum!`](crate::text_enum)
//! declares one with its one spelling (kebab case: `as_str`, `FromStr`,
//! `Display`, serde) and [`text_column!`](crate::text_column) gives it the
//! sqlx traits, so it binds and reads as itself, arrays included, while the
//! schema keeps its text columns.

/// Declares a fieldless enum spelled in kebab case everywhere: `as_str`,
/// `FromStr` and `Display` (strum), JSON (serde), and PostgreSQL `text`
/// ([`text_column!`](crate::text_column)); `VARIANTS` lists them in
/// declaration order. Attributes given (docs, more derives) are kept. The
/// caller depends on `serde`, `strum` and `sqlx`.
#[macro_export]
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Clone,
            Copy,
            Debug,
            PartialEq,
            Eq,
            ::serde::Serialize,
            ::serde::Deserialize,
            ::strum::EnumString,
            ::strum::IntoStaticStr,
            ::strum::Display,
            ::strum::VariantArray,
        )]
        #[serde(rename_all = "kebab-case")]
        #[strum(serialize_all = "kebab-case")]
        $vis enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        impl $name {
            /// Its one spelling, as JSON and the tables have it.
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }

        $crate::text_column!($name);
    };
}

/// Implements sqlx's `Type`, `PgHasArrayType`, `Encode` and `Decode` for
/// `$ty` as `text`: encoded as `$ty::as_str`, decoded with `$ty`'s `FromStr`
/// (a value it does not know is a decode error, never a panic). The caller
/// depends on `sqlx`.
#[macro_export]
macro_rules! text_column {
    ($ty:ty) => {
        impl ::sqlx::Type<::sqlx::Postgres> for $ty {
            fn type_info() -> ::sqlx::postgres::PgTypeInfo {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &::sqlx::postgres::PgTypeInfo) -> bool {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::compatible(ty)
            }
        }

        impl ::sqlx::postgres::PgHasArrayType for $ty {
            fn array_type_info() -> ::sqlx::postgres::PgTypeInfo {
                <&str as ::sqlx::postgres::PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &::sqlx::postgres::PgTypeInfo) -> bool {
                <&str as ::sqlx::postgres::PgHasArrayType>::array_compatible(ty)
            }
        }

        impl ::sqlx::Encode<'_, ::sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut ::sqlx::postgres::PgArgumentBuffer,
            ) -> Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                <&str as ::sqlx::Encode<'_, ::sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> ::sqlx::Decode<'r, ::sqlx::Postgres> for $ty {
            fn decode(
                value: ::sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, ::sqlx::error::BoxDynError> {
                Ok(<&str as ::sqlx::Decode<'r, ::sqlx::Postgres>>::decode(value)?.parse()?)
            }
        }
    };
}
