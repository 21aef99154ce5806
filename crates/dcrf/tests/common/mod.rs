//! Models shared by the integration tests (DCRF's test `User` and `TestModelWithCustomPK`),
//! and [`Counter`], a count tests wait on.

#![allow(dead_code, unused_macros, unused_imports)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dcrf::model::Db;
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use serde::Deserialize;

/// DCRF's tests use Django's `User` with fields id, username, email.
pub mod user {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
    #[sea_orm(table_name = "auth_user")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sea_orm(unique)]
        pub username: String,
        pub email: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// DCRF's `TestModelWithCustomPK(name primary_key, description nullable)`.
pub mod custom_pk {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
    #[sea_orm(table_name = "custom_pk")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub description: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// DCRF's `TestModel(name)`.
pub mod thing {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
    #[sea_orm(table_name = "thing")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What clients may write to a user.
#[derive(Debug, Deserialize, garde::Validate, DeriveIntoActiveModel)]
#[sea_orm(active_model = "user::ActiveModel")]
pub struct UserInput {
    #[garde(custom(username_rules))]
    pub username: String,
    #[garde(custom(email_rules))]
    #[serde(default)]
    pub email: String,
}

fn username_rules(v: &str, _: &()) -> garde::Result {
    if v.is_empty() {
        return Err(garde::Error::new("This field may not be blank."));
    }
    if v.len() > 150 {
        return Err(garde::Error::new(
            "Ensure this field has no more than 150 characters.",
        ));
    }
    Ok(())
}

fn email_rules(v: &str, _: &()) -> garde::Result {
    if !v.is_empty() && !v.contains('@') {
        return Err(garde::Error::new("Enter a valid email address."));
    }
    Ok(())
}

/// What clients may write to a thing.
#[derive(Debug, Deserialize, garde::Validate, DeriveIntoActiveModel)]
#[sea_orm(active_model = "thing::ActiveModel")]
pub struct ThingInput {
    #[garde(length(min = 1))]
    pub name: String,
}

/// Inserts a user without the framework (not observed).
pub async fn add_user(db: &Db, username: &str, email: &str) -> user::Model {
    user::ActiveModel {
        username: Set(username.into()),
        email: Set(email.into()),
        ..Default::default()
    }
    .insert(db.conn())
    .await
    .unwrap()
}

/// Inserts a user through a framework transaction (observed).
pub async fn create_user(db: &Db, username: &str) -> user::Model {
    let mut txn = db.begin().await.unwrap();
    let u = txn
        .insert(user::ActiveModel {
            username: Set(username.into()),
            email: Set("42@example.com".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    txn.commit().await.unwrap();
    u
}

/// Renames a user through a framework transaction (observed).
pub async fn rename_user(db: &Db, user: &user::Model, username: &str) -> user::Model {
    let mut txn = db.begin().await.unwrap();
    let mut am: user::ActiveModel = user.clone().into();
    am.username = Set(username.into());
    let u = txn.update(am).await.unwrap();
    txn.commit().await.unwrap();
    u
}

/// Deletes a user through a framework transaction (observed).
pub async fn delete_user(db: &Db, user: &user::Model) {
    let mut txn = db.begin().await.unwrap();
    txn.delete(user.clone()).await.unwrap();
    txn.commit().await.unwrap();
}

/// How long [`Counter::wait_for`] waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(10);

/// A count the code under test increments (`hit`) and a test waits on (`wait_for`): a
/// notification with memory, so a hit before the wait is not lost.
#[derive(Debug, Default)]
pub struct Counter {
    n: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Counter {
    /// Counts one more and wakes the waiters.
    pub fn hit(&self) {
        self.n.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// The count so far.
    pub fn get(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }

    /// Waits until the count reaches `n`; fails the test after [`WAIT`].
    pub async fn wait_for(&self, n: usize, what: &str) {
        self.wait_for_within(n, WAIT, what).await;
    }

    /// Waits until the count reaches `n`; fails the test after `limit`.
    pub async fn wait_for_within(&self, n: usize, limit: Duration, what: &str) {
        let reached = tokio::time::timeout(limit, async {
            loop {
                // Registered before the check, so a hit between the check and the await wakes
                // this waiter.
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.get() >= n {
                    return;
                }
                changed.await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "timed out after {limit:?} waiting for {what} (count {} of {n})",
            self.get()
        );
    }
}
