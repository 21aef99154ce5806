//! Limit/offset pagination, ordering and filters for `list`.

use sea_orm::{ColumnTrait, EntityTrait, Order, QueryFilter, QueryOrder, QuerySelect, Select};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Db, ModelConsumer, ModelOf, column_named, json_to_value};
use crate::error::ApiError;
use crate::protocol::Frame;

/// Limit/offset pagination (DCRF's `WebsocketLimitOffsetPagination`).
///
/// `list` then reads `limit` and `offset` from the message and answers
/// `{"count": N, "results": [...], "limit": L, "offset": O}`. As in DCRF: numeric strings are
/// accepted, a limit that is not a positive integer falls back to the default, a negative or
/// unreadable offset becomes 0, the limit is capped at `max_limit`, and an offset past the end
/// gives empty results. Where DCRF crashes (`limit: null`, no limit and no default) this
/// answers 400.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOffset {
    /// The page size when the message has no (valid) `limit`.
    pub default_limit: Option<u64>,
    /// The largest page a client may ask for.
    pub max_limit: Option<u64>,
}

impl LimitOffset {
    /// A default page size and no cap.
    pub fn new(default_limit: u64) -> Self {
        LimitOffset {
            default_limit: Some(default_limit),
            max_limit: None,
        }
    }

    /// Caps the page size.
    pub fn max_limit(mut self, max: u64) -> Self {
        self.max_limit = Some(max);
        self
    }

    /// Reads `limit` and `offset` from a message.
    pub fn limit_offset(&self, frame: &Frame<'_>) -> Result<(u64, u64), ApiError> {
        let limit = match frame.field("limit") {
            None => None,
            Some(raw) => match positive_int(raw.get(), "limit")? {
                Some(n) if n > 0 => Some(n),
                _ => None,
            },
        };
        let limit = limit
            .or(self.default_limit)
            .ok_or_else(|| ApiError::field("limit", "This field is required."))?;
        let limit = match self.max_limit {
            Some(max) => limit.min(max),
            None => limit,
        };
        let offset = match frame.field("offset") {
            None => 0,
            Some(raw) => positive_int(raw.get(), "offset")?.unwrap_or(0),
        };
        Ok((limit, offset))
    }
}

/// Python's `int(value)` as DCRF's `_positive_int` uses it: `Ok(None)` for values that fall
/// back to a default (negative, unreadable); 400 for `null` and containers, where DCRF crashes.
fn positive_int(raw: &str, field: &str) -> Result<Option<u64>, ApiError> {
    let value: Value = serde_json::from_str(raw)?;
    let n: Option<i64> = match &value {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f.trunc() as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        Value::Bool(b) => Some(i64::from(*b)),
        Value::Null | Value::Array(_) | Value::Object(_) => {
            return Err(ApiError::field(field, "A valid integer is required."));
        }
    };
    Ok(n.and_then(|n| u64::try_from(n).ok()))
}

/// One page of a paginated list, in DCRF's key order.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// Rows matching the query.
    pub count: u64,
    /// This page's rows.
    pub results: Vec<T>,
    /// The page size used.
    pub limit: u64,
    /// The offset used.
    pub offset: u64,
}

/// Counts, then fetches one page.
pub(crate) async fn fetch_page<C: ModelConsumer>(
    db: &Db,
    query: Select<C::Entity>,
    limit: u64,
    offset: u64,
    max_bytes: usize,
) -> Result<Page<Box<RawValue>>, ApiError> {
    let count = db.count(query.clone()).await?;
    let results = if count == 0 || offset > count {
        Vec::new()
    } else {
        fetch_rows::<C>(
            db,
            query.offset(offset).limit(limit),
            Some(limit),
            max_bytes,
        )
        .await?
    };
    Ok(Page {
        count,
        results,
        limit,
        offset,
    })
}

/// The rows of a query as their output's JSON, serialized one by one as they arrive. Once they
/// weigh more than `max_bytes` (a reply that could not be sent: the reply cap) the query stops
/// and the answer is 413, so a request over large rows holds at most that much, not every row.
///
/// `at_most` is the query's `LIMIT`, if it has one: a short enough query on a SQLite file
/// reads inline (see [`Db::read_one`]).
pub(crate) async fn fetch_rows<C: ModelConsumer>(
    db: &Db,
    query: Select<C::Entity>,
    at_most: Option<u64>,
    max_bytes: usize,
) -> Result<Vec<Box<RawValue>>, ApiError> {
    use futures_util::TryStreamExt;
    let mut rows = Rows::new(max_bytes);
    #[cfg(feature = "sqlite")]
    if let Some(reads) = db.sqlite_reads()
        && at_most.is_some_and(|n| n <= super::sqlite_reads::INLINE_ROWS)
    {
        let statement = sea_orm::QueryTrait::build(&query, sea_orm::DbBackend::Sqlite);
        let mut failed = None;
        let inline = reads.each::<C::Entity>(&statement, |model| match rows.push::<C>(model) {
            Ok(()) => std::ops::ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                std::ops::ControlFlow::Break(())
            }
        });
        if inline.is_ok() {
            return match failed {
                Some(e) => Err(e),
                None => Ok(rows.rows),
            };
        }
        rows = Rows::new(max_bytes);
    }
    #[cfg(not(feature = "sqlite"))]
    let _ = at_most;
    let mut stream = query.stream(db.conn()).await?;
    while let Some(model) = stream.try_next().await? {
        rows.push::<C>(model)?;
    }
    Ok(rows.rows)
}

/// Rows serialized so far, and their weight against the reply cap.
struct Rows {
    rows: Vec<Box<RawValue>>,
    total: usize,
    max_bytes: usize,
}

impl Rows {
    fn new(max_bytes: usize) -> Rows {
        Rows {
            rows: Vec::new(),
            total: 0,
            max_bytes,
        }
    }

    /// Serializes one more row (once, not parsed back); 413 once the rows outgrow the cap.
    fn push<C: ModelConsumer>(&mut self, model: ModelOf<C>) -> Result<(), ApiError> {
        let row =
            serde_json::value::to_raw_value(&C::Output::from(model)).map_err(ApiError::internal)?;
        self.total += row.get().len() + 1;
        if self.total > self.max_bytes {
            return Err(crate::guard::reply_too_large(None, self.max_bytes));
        }
        self.rows.push(row);
        Ok(())
    }
}

/// Equality filters: a column and its value (`None`: `IS NULL`).
pub(crate) type Filters<E> = Vec<(<E as EntityTrait>::Column, Option<sea_orm::Value>)>;

/// Reads `{"filters": {"field": value}}`: allowed fields only; `None` stands for `null`.
pub(crate) fn parse_filters<E: EntityTrait>(
    frame: &Frame<'_>,
    allowed: &[&str],
) -> Result<Filters<E>, ApiError> {
    let Some(raw) = frame.field("filters") else {
        return Ok(Vec::new());
    };
    let filters: serde_json::Map<String, Value> = serde_json::from_str(raw.get())
        .map_err(|_| ApiError::field("filters", "Expected an object of field: value."))?;
    let mut out = Vec::with_capacity(filters.len());
    for (name, value) in filters {
        let column = allowed
            .contains(&name.as_str())
            .then(|| column_named::<E>(&name))
            .flatten()
            .ok_or_else(|| ApiError::field("filters", format!("Cannot filter by \"{name}\".")))?;
        if value.is_null() {
            out.push((column, None));
            continue;
        }
        let v = json_to_value(column, &value.to_string())
            .ok_or_else(|| ApiError::field("filters", format!("Invalid value for \"{name}\".")))?;
        out.push((column, Some(v)));
    }
    Ok(out)
}

/// Applies `{"filters": {"field": value}}`: equality on allowed fields, `null` as `IS NULL`.
pub(crate) fn apply_filters<E: EntityTrait>(
    mut query: Select<E>,
    frame: &Frame<'_>,
    allowed: &[&str],
) -> Result<Select<E>, ApiError> {
    for (column, value) in parse_filters::<E>(frame, allowed)? {
        query = match value {
            None => query.filter(column.is_null()),
            Some(v) => query.filter(column.eq(v)),
        };
    }
    Ok(query)
}

/// Applies `{"ordering": "-title"}` / `["done", "-id"]` on allowed fields.
pub(crate) fn apply_ordering<E: EntityTrait>(
    mut query: Select<E>,
    frame: &Frame<'_>,
    allowed: &[&str],
) -> Result<Select<E>, ApiError> {
    let Some(raw) = frame.field("ordering") else {
        return Ok(query);
    };
    let fields: Vec<String> = match serde_json::from_str::<Value>(raw.get())? {
        Value::String(s) => s.split(',').map(|f| f.trim().to_owned()).collect(),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::field("ordering", "Expected field names.")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::field("ordering", "Expected field names.")),
    };
    for field in fields.iter().filter(|f| !f.is_empty()) {
        let (name, order) = match field.strip_prefix('-') {
            Some(name) => (name, Order::Desc),
            None => (field.as_str(), Order::Asc),
        };
        let column = allowed
            .contains(&name)
            .then(|| column_named::<E>(name))
            .flatten()
            .ok_or_else(|| ApiError::field("ordering", format!("Cannot order by \"{name}\".")))?;
        query = query.order_by(column, order);
    }
    Ok(query)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// `limit_offset` of a `list` frame with these extra fields (`r#","limit":5"#`).
    fn read(p: LimitOffset, fields: &str) -> Result<(u64, u64), ApiError> {
        let text = format!(r#"{{"action":"list","request_id":1{fields}}}"#);
        let frame = Frame::parse(&text).unwrap();
        p.limit_offset(&frame)
    }

    /// The status and `errors` of a refusal.
    fn refusal(r: Result<(u64, u64), ApiError>) -> (u16, Vec<Value>) {
        let e = r.expect_err("a 400");
        (e.status().as_u16(), e.errors().to_vec())
    }

    #[test]
    fn constructors() {
        assert_eq!(
            LimitOffset::new(5),
            LimitOffset {
                default_limit: Some(5),
                max_limit: None
            }
        );
        assert_eq!(
            LimitOffset::new(5).max_limit(9),
            LimitOffset {
                default_limit: Some(5),
                max_limit: Some(9)
            }
        );
        assert_eq!(
            LimitOffset::default(),
            LimitOffset {
                default_limit: None,
                max_limit: None
            }
        );
    }

    #[test]
    fn limit_numbers_and_numeric_strings() {
        let p = LimitOffset::new(10);
        assert_eq!(read(p, "").unwrap(), (10, 0));
        assert_eq!(read(p, r#","limit":5"#).unwrap(), (5, 0));
        assert_eq!(read(p, r#","limit":"5""#).unwrap(), (5, 0));
        assert_eq!(read(p, r#","limit":" 7 ""#).unwrap(), (7, 0));
        // Python's int() of a float truncates; of a bool is 0 or 1.
        assert_eq!(read(p, r#","limit":2.9"#).unwrap(), (2, 0));
        assert_eq!(read(p, r#","limit":true"#).unwrap(), (1, 0));
        // Larger than the default is fine without a cap.
        assert_eq!(read(p, r#","limit":500"#).unwrap(), (500, 0));
    }

    #[test]
    fn a_limit_that_is_not_a_positive_integer_falls_back_to_the_default() {
        let p = LimitOffset::new(10);
        for limit in [
            "0", r#""0""#, "-3", r#""-3""#, r#""abc""#, r#""2.5""#, r#""""#, "false", "0.5",
        ] {
            assert_eq!(
                read(p, &format!(r#","limit":{limit}"#)).unwrap(),
                (10, 0),
                "limit {limit}"
            );
        }
    }

    #[test]
    fn offsets() {
        let p = LimitOffset::new(10);
        assert_eq!(read(p, r#","offset":4"#).unwrap(), (10, 4));
        assert_eq!(read(p, r#","offset":"4""#).unwrap(), (10, 4));
        assert_eq!(read(p, r#","offset":3.7"#).unwrap(), (10, 3));
        assert_eq!(read(p, r#","offset":0"#).unwrap(), (10, 0));
        // Past the end is not an error here (the page is empty).
        assert_eq!(read(p, r#","offset":1000000"#).unwrap(), (10, 1_000_000));
        // Negative or unreadable: 0.
        for offset in ["-1", r#""-1""#, r#""x""#, r#""1.5""#] {
            assert_eq!(
                read(p, &format!(r#","offset":{offset}"#)).unwrap(),
                (10, 0),
                "offset {offset}"
            );
        }
        assert_eq!(read(p, r#","limit":"3","offset":"6""#).unwrap(), (3, 6));
    }

    #[test]
    fn max_limit_caps_the_requested_and_the_default_limit() {
        let p = LimitOffset::new(2).max_limit(3);
        assert_eq!(read(p, "").unwrap(), (2, 0));
        assert_eq!(read(p, r#","limit":1"#).unwrap(), (1, 0));
        assert_eq!(read(p, r#","limit":3"#).unwrap(), (3, 0));
        assert_eq!(read(p, r#","limit":5"#).unwrap(), (3, 0));
        assert_eq!(read(p, r#","limit":"50""#).unwrap(), (3, 0));
        assert_eq!(read(p, r#","limit":18446744073709551615"#).unwrap(), (3, 0));
        // An invalid limit falls back to the default, which is within the cap.
        assert_eq!(read(p, r#","limit":0"#).unwrap(), (2, 0));
        // A default above the cap is capped too.
        assert_eq!(read(LimitOffset::new(10).max_limit(3), "").unwrap(), (3, 0));
    }

    #[test]
    fn null_and_containers_are_400_where_dcrf_crashes() {
        let invalid = |field: &str| {
            (
                400,
                vec![json!({ field: ["A valid integer is required."] })],
            )
        };
        for p in [LimitOffset::new(10), LimitOffset::default()] {
            for value in ["null", "[]", "[5]", "{}", r#"{"n":5}"#] {
                assert_eq!(
                    refusal(read(p, &format!(r#","limit":{value}"#))),
                    invalid("limit"),
                    "limit {value}"
                );
                assert_eq!(
                    refusal(read(p, &format!(r#","limit":5,"offset":{value}"#))),
                    invalid("offset"),
                    "offset {value}"
                );
            }
            // The limit is read first.
            assert_eq!(
                refusal(read(p, r#","limit":null,"offset":null"#)),
                invalid("limit")
            );
        }
    }

    #[test]
    fn no_limit_and_no_default_is_400() {
        let required = (400, vec![json!({"limit": ["This field is required."]})]);
        let p = LimitOffset::default();
        assert_eq!(refusal(read(p, "")), required);
        assert_eq!(refusal(read(p, r#","offset":3"#)), required);
        // A limit that falls back to the (missing) default.
        assert_eq!(refusal(read(p, r#","limit":0"#)), required);
        assert_eq!(refusal(read(p, r#","limit":"abc""#)), required);
        assert_eq!(refusal(read(p.max_limit(5), "")), required);
        // A valid limit needs no default.
        assert_eq!(read(p, r#","limit":"5""#).unwrap(), (5, 0));
        assert_eq!(read(p.max_limit(3), r#","limit":5"#).unwrap(), (3, 0));
    }

    #[test]
    fn positive_int_reads_like_python_int() {
        let read = |raw: &str| positive_int(raw, "limit").unwrap();
        assert_eq!(read("3"), Some(3));
        assert_eq!(read("0"), Some(0));
        assert_eq!(read("-1"), None);
        assert_eq!(read("-0.5"), Some(0));
        assert_eq!(read(r#""12""#), Some(12));
        assert_eq!(read(r#""1e3""#), None);
        assert_eq!(read("1e3"), Some(1000));
        assert_eq!(read("true"), Some(1));
        assert_eq!(read("false"), Some(0));
        assert_eq!(read(r#""""#), None);
    }
}
