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
    // The value must have the column's exact type: PostgreSQL binds parameters by type, and a
    // cached statement prepared for an INT4 parameter cannot take an INT8.
    let integer = || -> Option<i64> {
        match &json {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        }
    };
    let float = || -> Option<f64> {
        match &json {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        }
    };
    match def.get_column_type() {
        ColumnType::TinyInteger => Some(Value::TinyInt(Some(integer()?.try_into().ok()?))),
        ColumnType::SmallInteger => Some(Value::SmallInt(Some(integer()?.try_into().ok()?))),
        ColumnType::Integer => Some(Value::Int(Some(integer()?.try_into().ok()?))),
        ColumnType::BigInteger => Some(Value::BigInt(Some(integer()?))),
        ColumnType::TinyUnsigned => Some(Value::TinyUnsigned(Some(integer()?.try_into().ok()?))),
        ColumnType::SmallUnsigned => Some(Value::SmallUnsigned(Some(integer()?.try_into().ok()?))),
        ColumnType::Unsigned => Some(Value::Unsigned(Some(integer()?.try_into().ok()?))),
        ColumnType::BigUnsigned => Some(Value::BigUnsigned(Some(integer()?.try_into().ok()?))),
        ColumnType::Float => Some(Value::Float(Some(float()? as f32))),
        ColumnType::Double | ColumnType::Decimal(_) => Some(Value::Double(Some(float()?))),
        ColumnType::Boolean => match &json {
            serde_json::Value::Bool(b) => Some(Value::Bool(Some(*b))),
            _ => None,
        },
        _ => match json {
            // No stored text holds NUL (writes refuse it, PostgreSQL cannot store it).
            serde_json::Value::String(s) if s.contains('\0') => None,
            serde_json::Value::String(s) => Some(Value::String(Some(s))),
            serde_json::Value::Number(n) => Some(Value::String(Some(n.to_string()))),
            _ => None,
        },
    }
}
