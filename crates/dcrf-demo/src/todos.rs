//! `/ws/todos/`: a model consumer over the `todo` table.

use dcrf::model::{Db, LimitOffset, ModelConsumer};
use dcrf::prelude::*;
use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// The `todo` table.
pub mod todo {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// One todo: `{"id": 1, "title": "...", "done": false, "owner": ""}`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
    #[sea_orm(table_name = "todo")]
    pub struct Model {
        /// Primary key.
        #[sea_orm(primary_key)]
        pub id: i32,
        /// Up to 200 characters, required.
        pub title: String,
        /// Default false.
        pub done: bool,
        /// Default "".
        pub owner: String,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What clients may write.
#[derive(Debug, Deserialize, Serialize, garde::Validate, DeriveIntoActiveModel)]
#[sea_orm(active_model = "todo::ActiveModel")]
pub struct TodoInput {
    /// Required, 1 to 200 characters.
    #[garde(custom(title_rules))]
    pub title: String,
    /// Default false.
    #[garde(skip)]
    #[serde(default)]
    pub done: bool,
    /// Default "".
    #[garde(skip)]
    #[serde(default)]
    pub owner: String,
}

/// DRF's messages for a `CharField(max_length=200)`.
fn title_rules(value: &str, _: &()) -> garde::Result {
    if value.trim().is_empty() {
        return Err(garde::Error::new("This field may not be blank."));
    }
    if value.chars().count() > 200 {
        return Err(garde::Error::new(
            "Ensure this field has no more than 200 characters.",
        ));
    }
    Ok(())
}

/// list / retrieve / create / update / patch / delete over `todo`, open to anyone.
#[derive(Debug, Clone)]
pub struct Todos {
    /// The database.
    pub db: Db,
}

impl ModelConsumer for Todos {
    type Entity = todo::Entity;
    type Output = todo::Model;
    type Input = TodoInput;

    fn db(&self) -> &Db {
        &self.db
    }

    fn pagination(&self) -> Option<LimitOffset> {
        Some(LimitOffset::new(100).max_limit(1000))
    }

    fn filter_fields(&self) -> &'static [&'static str] {
        &["done", "owner"]
    }

    fn ordering_fields(&self) -> &'static [&'static str] {
        &["id", "title", "done", "owner"]
    }
}

#[dcrf::consumer(model)]
impl Todos {}

impl Consumer for Todos {
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(AllowAny))
    }
}

/// Creates the table and inserts `n` todos titled `Todo 1`, `Todo 2`, ...
pub async fn setup(db: &Db, seed: u64) -> Result<(), dcrf::Error> {
    db.create_table(todo::Entity).await?;
    let mut next = 1;
    while next <= seed {
        let end = (next + 499).min(seed);
        let rows = (next..=end).map(|i| todo::ActiveModel {
            title: sea_orm::Set(format!("Todo {i}")),
            done: sea_orm::Set(false),
            owner: sea_orm::Set(String::new()),
            ..Default::default()
        });
        todo::Entity::insert_many(rows).exec(db.conn()).await?;
        next = end + 1;
    }
    Ok(())
}
