//! From message values to column values.

use sea_orm::sea_query::ColumnType;
use sea_orm::{ColumnTrait, EntityTrait, Iterable, PrimaryKeyToColumn, Value};

/// The first primary-key column of an entity (DCRF's `pk`).
pub fn primary_key_column<E: EntityTrait>() -> E::Column {
    E::PrimaryKey::iter()
        .next()
        .map(|k| k.into_column())
        .unwrap_or_else(|| {
            E::Column::iter()
                .next()
                .expect("an entity has at least one column")
        })
}

/// A column by name (`"title"`), or `None`.
pub fn column_named<E: EntityTrait>(name: &str) -> Option<E::Column> {
    name.parse::<E::Column>().ok()
}

/// Converts a raw JSON value into a value of the column's type, as Django's lookups do:
/// integer columns accept numbers and numeric strings, text columns accept strings and numbers.
/// `None` when the value cannot be of this column (DCRF answers 404 for such lookups).
pub fn json_to_value<C: ColumnTrait>(column: C, raw: &str) -> Option<Value> {
    let json: serde_json::Value = serde_json::from_str(raw).ok()?;
    let def = column.def();
    match def.get_column_type() {
        ColumnType::TinyInteger
        | ColumnType::SmallInteger
        | ColumnType::Integer
        | ColumnType::BigInteger
        | ColumnType::TinyUnsigned
        | ColumnType::SmallUnsigned
        | ColumnType::Unsigned
        | ColumnType::BigUnsigned => {
            let n = match &json {
                serde_json::Value::Number(n) => n.as_i64()?,
                serde_json::Value::String(s) => s.trim().parse::<i64>().ok()?,
                _ => return None,
            };
            Some(Value::BigInt(Some(n)))
        }
        ColumnType::Float | ColumnType::Double | ColumnType::Decimal(_) => {
            let n = match &json {
                serde_json::Value::Number(n) => n.as_f64()?,
                serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
                _ => return None,
            };
            Some(Value::Double(Some(n)))
        }
        ColumnType::Boolean => match &json {
            serde_json::Value::Bool(b) => Some(Value::Bool(Some(*b))),
            _ => None,
        },
        _ => match json {
            serde_json::Value::String(s) => Some(Value::String(Some(s))),
            serde_json::Value::Number(n) => Some(Value::String(Some(n.to_string()))),
            _ => None,
        },
    }
}
