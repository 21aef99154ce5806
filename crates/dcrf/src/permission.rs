//! Permissions: who may connect, and who may run which action.
//!
//! A [`Permission`] answers two questions, both async so they may query a database:
//! - [`can_connect`](Permission::can_connect), at the handshake (false → HTTP 403);
//! - [`has_permission`](Permission::has_permission), before every action, *before* the action
//!   name is even looked up, as in DCRF (false → a 403 frame, also for unknown actions).
//!
//! Permissions compose with `&`, `|` and `!`:
//!
//! ```
//! use dcrf::permission::{AllowAny, IsAuthenticated, Permission};
//!
//! let p = IsAuthenticated | !AllowAny;   // any expression of built-in permissions
//! # let _ = p;
//! ```
//!
//! Your own permission is a type implementing [`Permission`]; call
//! [`impl_permission_ops!`](crate::impl_permission_ops) on it to get the operators too.

use std::future::Future;
use std::sync::Arc;

use crate::auth::BoxFuture;
use crate::protocol::Frame;
use crate::scope::Scope;

/// Decides whether a connection may open and whether an action may run.
///
/// ```
/// use dcrf::{Frame, Scope, permission::Permission};
///
/// /// Only users whose name starts with "admin".
/// struct IsAdmin;
///
/// impl Permission for IsAdmin {
///     async fn has_permission(&self, scope: &Scope, _action: &str, _args: &Frame<'_>) -> bool {
///         scope.user.as_ref().is_some_and(|u| u.username.starts_with("admin"))
///     }
/// }
/// dcrf::impl_permission_ops!(IsAdmin);
///
/// let p = IsAdmin | dcrf::permission::AllowAny;
/// # let _ = p;
/// ```
pub trait Permission: Send + Sync + 'static {
    /// May this action run? `action` is the requested name (it may be unknown); `args` is the
    /// whole frame.
    fn has_permission(
        &self,
        scope: &Scope,
        action: &str,
        args: &Frame<'_>,
    ) -> impl Future<Output = bool> + Send;

    /// May this connection open? Default: yes (as DCRF's `BasePermission`).
    fn can_connect(&self, scope: &Scope) -> impl Future<Output = bool> + Send {
        let _ = scope;
        async { true }
    }
}

/// A permission behind a pointer: what consumers and the application store.
#[derive(Clone)]
pub struct Permissions(Arc<dyn ErasedPermission>, bool);

impl std::fmt::Debug for Permissions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permissions")
    }
}

impl Permissions {
    /// Wraps any permission (or composition of permissions).
    pub fn new<P: Permission>(p: P) -> Self {
        let allow_any = std::any::TypeId::of::<P>() == std::any::TypeId::of::<AllowAny>();
        Permissions(Arc::new(p), allow_any)
    }

    /// Is this [`AllowAny`], which needs no asking (the push path skips building a frame)?
    pub(crate) fn allows_everything(&self) -> bool {
        self.1
    }

    /// See [`Permission::has_permission`].
    pub async fn has_permission(&self, scope: &Scope, action: &str, args: &Frame<'_>) -> bool {
        self.0.has_permission_boxed(scope, action, args).await
    }

    /// See [`Permission::can_connect`].
    pub async fn can_connect(&self, scope: &Scope) -> bool {
        self.0.can_connect_boxed(scope).await
    }
}

impl Default for Permissions {
    /// [`AllowAny`], DCRF's default.
    fn default() -> Self {
        Permissions::new(AllowAny)
    }
}

trait ErasedPermission: Send + Sync + 'static {
    fn has_permission_boxed<'a>(
        &'a self,
        scope: &'a Scope,
        action: &'a str,
        args: &'a Frame<'a>,
    ) -> BoxFuture<'a, bool>;
    fn can_connect_boxed<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, bool>;
}

impl<P: Permission> ErasedPermission for P {
    fn has_permission_boxed<'a>(
        &'a self,
        scope: &'a Scope,
        action: &'a str,
        args: &'a Frame<'a>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.has_permission(scope, action, args))
    }
    fn can_connect_boxed<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, bool> {
        Box::pin(self.can_connect(scope))
    }
}

impl Permission for Permissions {
    async fn has_permission(&self, scope: &Scope, action: &str, args: &Frame<'_>) -> bool {
        Permissions::has_permission(self, scope, action, args).await
    }
    async fn can_connect(&self, scope: &Scope) -> bool {
        Permissions::can_connect(self, scope).await
    }
}

/// Everyone may do everything (DCRF's default).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAny;

impl Permission for AllowAny {
    async fn has_permission(&self, _: &Scope, _: &str, _: &Frame<'_>) -> bool {
        true
    }
}

/// Only authenticated users may run actions. Anonymous clients may still connect (as in DCRF);
/// combine with a `can_connect` check to refuse them at the handshake.
#[derive(Debug, Clone, Copy, Default)]
pub struct IsAuthenticated;

impl Permission for IsAuthenticated {
    async fn has_permission(&self, scope: &Scope, _: &str, _: &Frame<'_>) -> bool {
        scope.is_authenticated()
    }
}

/// Authenticated users may do everything; anonymous users may only read (DRF's
/// `IsAuthenticatedOrReadOnly`): actions whose [`Frame::reads`] is true — a model consumer's
/// `list`, `retrieve` and subscriptions, custom actions marked `#[action(read)]`, views mapped to
/// `GET` — and the pushes of their subscriptions.
///
/// ```
/// use dcrf::prelude::*;
/// use dcrf::permission::IsAuthenticatedOrReadOnly;
///
/// #[derive(Default)]
/// struct Books;
///
/// #[dcrf::consumer]
/// impl Consumer for Books {
///     fn permissions(&self) -> Option<Permissions> {
///         Some(Permissions::new(IsAuthenticatedOrReadOnly))
///     }
///
///     /// Anyone may ask.
///     #[action(read)]
///     async fn count(&mut self) -> Result<Reply<u64>, ApiError> {
///         Ok(Reply::ok(42))
///     }
///
///     /// Only signed-in users may write.
///     #[action]
///     async fn reset(&mut self) -> Result<Reply<()>, ApiError> {
///         Ok(Reply::no_content())
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct IsAuthenticatedOrReadOnly;

impl Permission for IsAuthenticatedOrReadOnly {
    async fn has_permission(&self, scope: &Scope, _: &str, args: &Frame<'_>) -> bool {
        args.reads() || scope.is_authenticated()
    }
}

/// Anonymous users may neither connect nor act.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyAnonymous;

impl Permission for DenyAnonymous {
    async fn has_permission(&self, scope: &Scope, _: &str, _: &Frame<'_>) -> bool {
        scope.is_authenticated()
    }
    async fn can_connect(&self, scope: &Scope) -> bool {
        scope.is_authenticated()
    }
}

/// Both must allow (short-circuit). Built by `a & b`.
#[derive(Debug, Clone, Copy)]
pub struct And<A, B>(pub A, pub B);
/// Either may allow (short-circuit). Built by `a | b`.
#[derive(Debug, Clone, Copy)]
pub struct Or<A, B>(pub A, pub B);
/// The opposite. Built by `!a`.
#[derive(Debug, Clone, Copy)]
pub struct Not<A>(pub A);

impl<A: Permission, B: Permission> Permission for And<A, B> {
    async fn has_permission(&self, scope: &Scope, action: &str, args: &Frame<'_>) -> bool {
        self.0.has_permission(scope, action, args).await
            && self.1.has_permission(scope, action, args).await
    }
    async fn can_connect(&self, scope: &Scope) -> bool {
        self.0.can_connect(scope).await && self.1.can_connect(scope).await
    }
}

impl<A: Permission, B: Permission> Permission for Or<A, B> {
    async fn has_permission(&self, scope: &Scope, action: &str, args: &Frame<'_>) -> bool {
        self.0.has_permission(scope, action, args).await
            || self.1.has_permission(scope, action, args).await
    }
    async fn can_connect(&self, scope: &Scope) -> bool {
        self.0.can_connect(scope).await || self.1.can_connect(scope).await
    }
}

impl<A: Permission> Permission for Not<A> {
    async fn has_permission(&self, scope: &Scope, action: &str, args: &Frame<'_>) -> bool {
        !self.0.has_permission(scope, action, args).await
    }
    async fn can_connect(&self, scope: &Scope) -> bool {
        !self.0.can_connect(scope).await
    }
}

/// Implements `&`, `|` and `!` for a permission type, so it composes like the built-in ones.
///
/// Generic types can list their parameters first: `impl_permission_ops!([A, B] And<A, B>)`.
#[macro_export]
macro_rules! impl_permission_ops {
    ([$($g:ident),*] $t:ty) => {
        impl<$($g: $crate::permission::Permission,)* Rhs: $crate::permission::Permission> ::std::ops::BitAnd<Rhs> for $t {
            type Output = $crate::permission::And<Self, Rhs>;
            fn bitand(self, rhs: Rhs) -> Self::Output { $crate::permission::And(self, rhs) }
        }
        impl<$($g: $crate::permission::Permission,)* Rhs: $crate::permission::Permission> ::std::ops::BitOr<Rhs> for $t {
            type Output = $crate::permission::Or<Self, Rhs>;
            fn bitor(self, rhs: Rhs) -> Self::Output { $crate::permission::Or(self, rhs) }
        }
        impl<$($g: $crate::permission::Permission,)*> ::std::ops::Not for $t {
            type Output = $crate::permission::Not<Self>;
            fn not(self) -> Self::Output { $crate::permission::Not(self) }
        }
    };
    ($t:ty) => { $crate::impl_permission_ops!([] $t); };
}

impl_permission_ops!(AllowAny);
impl_permission_ops!(IsAuthenticated);
impl_permission_ops!(DenyAnonymous);
impl_permission_ops!(IsAuthenticatedOrReadOnly);
impl_permission_ops!(Permissions);
impl_permission_ops!([A, B] And<A, B>);
impl_permission_ops!([A, B] Or<A, B>);
impl_permission_ops!([A] Not<A>);

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::scope::User;

    /// Fixed answers, and a count of how often either question was asked.
    #[derive(Clone)]
    struct Fixed {
        act: bool,
        connect: bool,
        asked: Arc<AtomicUsize>,
    }

    impl Fixed {
        fn new(act: bool, connect: bool) -> Self {
            Fixed {
                act,
                connect,
                asked: Arc::default(),
            }
        }
        fn asked(&self) -> usize {
            self.asked.load(Ordering::SeqCst)
        }
    }

    impl Permission for Fixed {
        async fn has_permission(&self, _: &Scope, _: &str, _: &Frame<'_>) -> bool {
            self.asked.fetch_add(1, Ordering::SeqCst);
            self.act
        }
        async fn can_connect(&self, _: &Scope) -> bool {
            self.asked.fetch_add(1, Ordering::SeqCst);
            self.connect
        }
    }
    impl_permission_ops!(Fixed);

    fn anonymous() -> Scope {
        Scope::default()
    }

    fn authenticated() -> Scope {
        Scope {
            user: Some(User::new("1", "ada")),
            ..Scope::default()
        }
    }

    /// `has_permission` for a `list` frame.
    async fn act(p: &impl Permission, scope: &Scope) -> bool {
        let frame = Frame::parse(r#"{"action":"list","request_id":1}"#).unwrap();
        p.has_permission(scope, "list", &frame).await
    }

    /// `(has_permission, can_connect)` on an anonymous and on an authenticated scope.
    async fn answers(p: &impl Permission) -> [(bool, bool); 2] {
        let (anon, user) = (anonymous(), authenticated());
        [
            (act(p, &anon).await, p.can_connect(&anon).await),
            (act(p, &user).await, p.can_connect(&user).await),
        ]
    }

    #[tokio::test]
    async fn built_in_permissions_on_anonymous_and_authenticated_scopes() {
        // [(act, connect) anonymous, (act, connect) authenticated]
        assert_eq!(answers(&AllowAny).await, [(true, true), (true, true)]);
        // Anonymous clients may connect, but not act.
        assert_eq!(
            answers(&IsAuthenticated).await,
            [(false, true), (true, true)]
        );
        assert_eq!(
            answers(&DenyAnonymous).await,
            [(false, false), (true, true)]
        );
        assert_eq!(
            answers(&!DenyAnonymous).await,
            [(true, true), (false, false)]
        );
    }

    #[tokio::test]
    async fn and_or_not_truth_tables_for_both_questions() {
        let scope = anonymous();
        for a in [false, true] {
            for b in [false, true] {
                // `connect` is the opposite of `act`, so a question answered with the other
                // one's result shows.
                let (x, y) = (Fixed::new(a, !a), Fixed::new(b, !b));
                let and = x.clone() & y.clone();
                assert_eq!(act(&and, &scope).await, a && b, "{a} & {b}");
                assert_eq!(and.can_connect(&scope).await, !a && !b, "{a} & {b}");
                let or = x.clone() | y.clone();
                assert_eq!(act(&or, &scope).await, a || b, "{a} | {b}");
                assert_eq!(or.can_connect(&scope).await, !a || !b, "{a} | {b}");
            }
            let not = !Fixed::new(a, !a);
            assert_eq!(act(&not, &scope).await, !a, "!{a}");
            assert_eq!(not.can_connect(&scope).await, a, "!{a}");
        }
        // Nested: (x & !y) | z.
        let scope = anonymous();
        for (x, y, z) in [
            (true, false, false),
            (true, true, false),
            (false, false, true),
            (false, true, false),
        ] {
            let p = (Fixed::new(x, x) & !Fixed::new(y, y)) | Fixed::new(z, z);
            let expected = (x && !y) || z;
            assert_eq!(act(&p, &scope).await, expected, "({x} & !{y}) | {z}");
            assert_eq!(p.can_connect(&scope).await, expected, "({x} & !{y}) | {z}");
        }
    }

    #[tokio::test]
    async fn and_and_or_short_circuit() {
        let scope = anonymous();
        for connect in [false, true] {
            let ask = async |p: &dyn ErasedPermission| {
                if connect {
                    p.can_connect_boxed(&scope).await
                } else {
                    let frame = Frame::parse(r#"{"action":"list"}"#).unwrap();
                    p.has_permission_boxed(&scope, "list", &frame).await
                }
            };
            // (first, operator, second) → (answer, times second was asked)
            for (first, and, expected, second_asked) in [
                (false, true, false, 0),
                (true, true, false, 1),
                (true, false, true, 0),
                (false, false, false, 1),
            ] {
                // The second one answers `false`, so it decides only when it is asked.
                let second = Fixed::new(false, false);
                let first = Fixed::new(first, first);
                let answer = if and {
                    ask(&(first.clone() & second.clone())).await
                } else {
                    ask(&(first.clone() | second.clone())).await
                };
                let op = if and { "&" } else { "|" };
                assert_eq!(
                    answer, expected,
                    "connect={connect}: {} {op} false",
                    first.act
                );
                assert_eq!(
                    second.asked(),
                    second_asked,
                    "connect={connect}: {} {op} false",
                    first.act
                );
            }
        }
    }

    #[tokio::test]
    async fn permissions_wraps_and_composes_like_what_it_wraps() {
        assert_eq!(
            answers(&Permissions::new(IsAuthenticated)).await,
            answers(&IsAuthenticated).await
        );
        assert_eq!(
            answers(&Permissions::new(DenyAnonymous)).await,
            [(false, false), (true, true)]
        );
        // The default is AllowAny, DCRF's default.
        assert_eq!(
            answers(&Permissions::default()).await,
            [(true, true), (true, true)]
        );
        // The module's example: anonymous clients connect but may not act.
        assert_eq!(
            answers(&Permissions::new(IsAuthenticated | !AllowAny)).await,
            [(false, true), (true, true)]
        );
        // Erased permissions compose with each other and with plain ones.
        assert_eq!(
            answers(&(Permissions::new(IsAuthenticated) | Permissions::new(AllowAny))).await,
            [(true, true), (true, true)]
        );
        assert_eq!(
            answers(&(Permissions::new(AllowAny) & DenyAnonymous)).await,
            [(false, false), (true, true)]
        );
        assert_eq!(
            answers(&!Permissions::new(AllowAny)).await,
            [(false, false), (false, false)]
        );
        // A clone shares the same permission.
        let fixed = Fixed::new(true, false);
        let p = Permissions::new(fixed.clone());
        let copy = p.clone();
        assert_eq!(answers(&copy).await, [(true, false), (true, false)]);
        assert_eq!(fixed.asked(), 4);
    }
}
