//! Procedural macros for [dcrf](https://docs.rs/dcrf). Use them through the `dcrf` crate:
//! `#[dcrf::consumer]`.
//!
//! The expansion names only `::dcrf::Ctx`, `::dcrf::Frame`, `::dcrf::Consumer` and the items of
//! `::dcrf::__private`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;
use syn::{
    Attribute, FnArg, ImplItem, ImplItemFn, Item, ItemImpl, Lifetime, LitStr, Meta, Receiver,
    Token, Type,
};

/// Turns an `impl` block's `#[action]` methods into a consumer's action table.
///
/// See `dcrf::consumer` for the documentation.
#[proc_macro_attribute]
pub fn consumer(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    // A bad option is reported, and the block still expands (with no option) so that it is the
    // only error.
    let args = syn::parse::<ConsumerArgs>(attr).unwrap_or_else(|e| {
        errors.push(e);
        ConsumerArgs::default()
    });
    let item = match syn::parse::<Item>(item) {
        Ok(item) => item,
        Err(e) => return e.to_compile_error().into(),
    };
    let tokens = match item {
        Item::Impl(block) => expand(&args, block, &mut errors),
        other => {
            errors.push(syn::Error::new(
                item_span(&other),
                "#[dcrf::consumer] goes on an `impl` block: `impl MyConsumer { ... }` or \
                 `impl Consumer for MyConsumer { ... }`",
            ));
            quote! { #other }
        }
    };
    let errors = errors.into_compile_errors();
    quote! { #tokens #errors }.into()
}

/// Where to point an error about a whole item: its name, or all of it.
fn item_span(item: &Item) -> Span {
    match item {
        Item::Struct(i) => i.ident.span(),
        Item::Enum(i) => i.ident.span(),
        Item::Union(i) => i.ident.span(),
        Item::Fn(i) => i.sig.ident.span(),
        Item::Trait(i) => i.ident.span(),
        Item::Mod(i) => i.ident.span(),
        other => other.span(),
    }
}

/// The errors of one expansion, all reported together.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    fn into_compile_errors(self) -> TokenStream2 {
        self.0.map(|e| e.to_compile_error()).unwrap_or_default()
    }
}

/// `#[dcrf::consumer]` or `#[dcrf::consumer(model)]`.
#[derive(Default)]
struct ConsumerArgs {
    model: bool,
}

impl Parse for ConsumerArgs {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut model = false;
        let idents = Punctuated::<syn::Ident, Token![,]>::parse_terminated(input)?;
        for ident in idents {
            if ident == "model" {
                model = true;
            } else {
                return Err(syn::Error::new(
                    ident.span(),
                    "unknown option: expected `model` (`#[dcrf::consumer(model)]`)",
                ));
            }
        }
        Ok(ConsumerArgs { model })
    }
}

/// Is `path` the `Consumer` trait: `Consumer`, `dcrf::Consumer` or `dcrf::consumer::Consumer`
/// (with or without a leading `::`)?
fn is_consumer_trait(path: &syn::Path) -> bool {
    if path.segments.iter().any(|s| !s.arguments.is_none()) {
        return false;
    }
    let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
        ["Consumer"] => path.leading_colon.is_none(),
        ["dcrf", "Consumer"] | ["dcrf", "consumer", "Consumer"] => true,
        _ => false,
    }
}

fn expand(args: &ConsumerArgs, mut block: ItemImpl, errors: &mut Errors) -> TokenStream2 {
    let one_block = match &block.trait_ {
        None => false,
        Some((negative, path, _)) => {
            if negative.is_some() || !is_consumer_trait(path) {
                errors.push(syn::Error::new_spanned(
                    path,
                    "#[dcrf::consumer] goes on `impl MyConsumer { ... }` or \
                     `impl Consumer for MyConsumer { ... }`, not on an impl of another trait",
                ));
                // The block as written, without the `#[action]` markers (not attributes rustc
                // knows).
                for item in &mut block.items {
                    if let ImplItem::Fn(method) = item {
                        method.attrs.retain(|a| !is_action_attr(a));
                    }
                }
                return quote! { #block };
            }
            true
        }
    };

    let mut arms = Vec::new();
    let mut names: Vec<(String, Span)> = Vec::new();
    let mut reads: Vec<String> = Vec::new();
    // Every item in its written order, with whether it is an action.
    let mut items = Vec::with_capacity(block.items.len());

    for item in std::mem::take(&mut block.items) {
        let ImplItem::Fn(mut method) = item else {
            items.push((false, item));
            continue;
        };
        let Some(pos) = method.attrs.iter().position(is_action_attr) else {
            items.push((false, ImplItem::Fn(method)));
            continue;
        };
        let attr = method.attrs.remove(pos);
        // A second `#[action]` on one method is an unknown attribute for rustc; drop it too.
        method.attrs.retain(|a| !is_action_attr(a));
        match action(&attr, &method, &mut names, &mut reads) {
            Ok(arm) => arms.push(arm),
            Err(e) => errors.push(e),
        }
        items.push((true, ImplItem::Fn(method)));
    }

    let self_ty = &block.self_ty;
    let (impl_generics, _, where_clause) = block.generics.split_for_impl();

    let blocks = if one_block {
        // The actions move to an inherent impl; the hooks stay in `impl Consumer`.
        let (actions, hooks): (Vec<_>, Vec<_>) = items.into_iter().partition(|(a, _)| *a);
        let inherent = ItemImpl {
            attrs: block.attrs.clone(),
            defaultness: None,
            unsafety: None,
            impl_token: block.impl_token,
            generics: block.generics.clone(),
            trait_: None,
            self_ty: block.self_ty.clone(),
            brace_token: block.brace_token,
            items: actions.into_iter().map(|(_, i)| i).collect(),
        };
        let trait_impl = ItemImpl {
            items: hooks.into_iter().map(|(_, i)| i).collect(),
            ..block.clone()
        };
        quote! { #inherent #trait_impl }
    } else {
        let inherent = ItemImpl {
            items: items.into_iter().map(|(_, i)| i).collect(),
            ..block.clone()
        };
        quote! { #inherent }
    };

    let fallback = if args.model {
        quote! { ::dcrf::__private::dispatch_model(self, ctx, action, frame).await }
    } else {
        quote! { ::dcrf::__private::Dispatched::Unknown }
    };
    let handle_event = if args.model {
        quote! {
            if !::dcrf::__private::handle_instance_event(self, ctx, event).await {
                <Self as ::dcrf::Consumer>::on_event(self, ctx, event).await;
            }
        }
    } else {
        quote! { <Self as ::dcrf::Consumer>::on_event(self, ctx, event).await; }
    };
    let reads_fallback = if args.model {
        quote! { ::dcrf::__private::model_action_reads(self, action) }
    } else {
        quote! { false }
    };
    let reads_fn = quote! {
        fn reads(&self, action: &str) -> bool {
            match action {
                #(#reads)|* => true,
                _ => #reads_fallback,
            }
        }
    };
    let reads_fn = if reads.is_empty() && !args.model {
        quote! {}
    } else if reads.is_empty() {
        quote! {
            fn reads(&self, action: &str) -> bool {
                #reads_fallback
            }
        }
    } else {
        reads_fn
    };
    let mounted = args.model.then(|| {
        quote! {
            fn mounted(&self) {
                ::dcrf::__private::register_observers(self);
            }
        }
    });

    quote! {
        #blocks

        impl #impl_generics ::dcrf::__private::ActionTable for #self_ty #where_clause {
            #[allow(clippy::manual_async_fn)]
            fn dispatch<'a>(
                &'a mut self,
                ctx: &'a ::dcrf::Ctx,
                action: &'a str,
                frame: &'a ::dcrf::Frame<'a>,
            ) -> impl ::std::future::Future<Output = ::dcrf::__private::Dispatched> + Send + 'a {
                async move {
                    match action {
                        #(#arms)*
                        _ => #fallback,
                    }
                }
            }

            #[allow(clippy::manual_async_fn)]
            fn handle_event<'a>(
                &'a mut self,
                ctx: &'a ::dcrf::Ctx,
                event: &'a ::dcrf::__private::Event<'a>,
            ) -> impl ::std::future::Future<Output = ()> + Send + 'a {
                async move { #handle_event }
            }

            #mounted

            #reads_fn
        }
    }
}

fn is_action_attr(attr: &Attribute) -> bool {
    attr.path().is_ident("action")
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Normal,
    Detached,
    Blocking,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Normal => "normal",
            Kind::Detached => "detached",
            Kind::Blocking => "blocking",
        }
    }
}

/// What `#[action(...)]` says.
struct ActionSpec {
    name: Option<String>,
    kind: Kind,
    /// `#[action(read)]`: the action only reads (permissions see `Frame::reads`).
    read: bool,
}

fn parse_action_attr(attr: &Attribute) -> syn::Result<ActionSpec> {
    let mut spec = ActionSpec {
        name: None,
        kind: Kind::Normal,
        read: false,
    };
    if let Meta::Path(_) = &attr.meta {
        return Ok(spec);
    }
    // `#[action(...)]`; syn rejects `#[action = ...]` here.
    attr.parse_nested_meta(|meta| {
        let kind = if meta.path.is_ident("name") {
            let lit: LitStr = meta.value()?.parse()?;
            spec.name = Some(lit.value());
            return Ok(());
        } else if meta.path.is_ident("read") {
            spec.read = true;
            return Ok(());
        } else if meta.path.is_ident("detached") {
            Kind::Detached
        } else if meta.path.is_ident("blocking") {
            Kind::Blocking
        } else {
            return Err(meta.error(
                "unknown action option: expected `name = \"...\"`, `read`, `detached` or `blocking`",
            ));
        };
        if spec.kind != Kind::Normal && spec.kind != kind {
            return Err(meta.error(
                "an action is either `detached` (an `async fn` run concurrently) or `blocking` \
                 (a plain `fn` run on the blocking pool), not both",
            ));
        }
        spec.kind = kind;
        Ok(())
    })?;
    Ok(spec)
}

/// One `#[action]` method: checks it and writes its `match` arm.
fn action(
    attr: &Attribute,
    method: &ImplItemFn,
    names: &mut Vec<(String, Span)>,
    reads: &mut Vec<String>,
) -> syn::Result<TokenStream2> {
    let spec = parse_action_attr(attr)?;
    let name = spec.name.unwrap_or_else(|| method.sig.ident.to_string());
    if spec.read {
        reads.push(name.clone());
    }
    if let Some((_, first)) = names.iter().find(|(n, _)| *n == name) {
        let mut e = syn::Error::new(
            method.sig.ident.span(),
            format!("two actions are named \"{name}\""),
        );
        e.combine(syn::Error::new(*first, "first defined here"));
        return Err(e);
    }
    names.push((name.clone(), method.sig.ident.span()));

    let sig = &method.sig;
    let receiver = sig.receiver();
    match spec.kind {
        Kind::Normal => {
            if sig.asyncness.is_none() {
                return Err(syn::Error::new(
                    sig.fn_token.span(),
                    "an action is an `async fn`; use #[action(blocking)] for a blocking `fn`",
                ));
            }
            match receiver {
                None => {
                    return Err(syn::Error::new(
                        sig.ident.span(),
                        "an action takes `&mut self` or `&self` first; an action without a \
                         receiver is #[action(detached)] (an `async fn`) or #[action(blocking)] \
                         (a plain `fn`)",
                    ));
                }
                Some(r) if !borrows_self(r) => {
                    return Err(syn::Error::new_spanned(
                        r,
                        "an action borrows its consumer: take `&mut self` or `&self`",
                    ));
                }
                Some(_) => {}
            }
        }
        Kind::Detached | Kind::Blocking => {
            let what = spec.kind.word();
            if let Some(r) = receiver {
                return Err(syn::Error::new_spanned(
                    r,
                    format!(
                        "a {what} action runs beside the connection and cannot borrow the \
                         consumer: remove `self` and take owned parameters (`ctx: Ctx`, an \
                         arguments struct, ...)"
                    ),
                ));
            }
            if spec.kind == Kind::Detached && sig.asyncness.is_none() {
                return Err(syn::Error::new(
                    sig.fn_token.span(),
                    "a detached action is an `async fn`; use #[action(blocking)] for a \
                     blocking `fn`",
                ));
            }
            if spec.kind == Kind::Blocking
                && let Some(a) = sig.asyncness
            {
                return Err(syn::Error::new(
                    a.span(),
                    "a blocking action is a plain `fn` (it runs on the blocking pool); \
                     use #[action(detached)] for an `async fn` that runs concurrently",
                ));
            }
        }
    }

    // The method's own lifetimes are not in scope in `dispatch`: there they are inferred.
    let method_lifetimes: Vec<syn::Ident> = sig
        .generics
        .lifetimes()
        .map(|l| l.lifetime.ident.clone())
        .collect();
    let mut extract = Vec::new();
    let mut send_checks = Vec::new();
    let mut vars = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(param) = input else { continue };
        let mut ty = (*param.ty).clone();
        InferLifetimes(&method_lifetimes).visit_type_mut(&mut ty);
        let var = format_ident!("__dcrf_param_{}", i);
        // A trait error points at the whole parameter type: rustc spans an expression from its
        // first token to its last.
        let (first, last) = span_range(&param.ty);
        let close = quote_spanned! {last=> > };
        let extraction = if spec.kind == Kind::Normal {
            let open = quote_spanned! {first=> < };
            quote! {
                #open #ty as ::dcrf::__private::FromFrame<'_, _ #close>::from_frame(ctx, frame)
            }
        } else {
            // Built before the action is spawned, and owned (see `owned_parameters`). Both
            // paths span the whole type, so that when the type is no parameter at all rustc
            // reports only the owned bound (which implies `FromFrame`).
            let helper = quote_spanned! {first=> __dcrf_owned_parameter };
            let root = quote_spanned! {first=> :: };
            let call = quote_spanned! {last=> from_frame(ctx, frame) };
            quote! {
                #helper::<#ty, _, _ #close(#root dcrf::__private::FromFrame::#call)
            }
        };
        extract.push(quote! {
            let #var = match #extraction {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(e) => {
                    let _ = ctx
                        .send_error(&e, ::core::option::Option::Some(action), frame.request_id())
                        .await;
                    return ::dcrf::__private::Dispatched::Handled;
                }
            };
        });
        if spec.kind != Kind::Normal {
            let send = quote_spanned! {first=> __dcrf_parameter_must_be_send };
            let arg = quote_spanned! {last=> (&#var) };
            send_checks.push(quote! { #send::<#ty #close #arg; });
        }
        vars.push(var);
    }

    let ident = &sig.ident;
    // A return type that is not an action result is reported once, at the return type.
    let ret_span = match &sig.output {
        syn::ReturnType::Default => sig.ident.span(),
        syn::ReturnType::Type(_, ty) => ty.span(),
    };
    let finish = quote_spanned! {ret_span=>
        ctx.finish(action, frame.request_id(), __dcrf_result).await
    };
    Ok(match spec.kind {
        Kind::Normal => quote! {
            #name => {
                #(#extract)*
                let __dcrf_result = self.#ident(#(#vars),*).await;
                #finish;
                ::dcrf::__private::Dispatched::Handled
            }
        },
        Kind::Detached => {
            let helpers = owned_parameters(spec.kind, ident);
            // What the checks above do not catch is reported at the action's name.
            let spawn = quote_spanned! {ident.span()=>
                ctx.start_detached(action, frame.request_id(), Self::#ident(#(#vars),*)).await
            };
            quote! {
                #name => {
                    #helpers
                    #(#extract)*
                    #(#send_checks)*
                    #spawn;
                    ::dcrf::__private::Dispatched::Handled
                }
            }
        }
        Kind::Blocking => {
            let helpers = owned_parameters(spec.kind, ident);
            let run = quote_spanned! {ident.span()=>
                ctx.run_blocking(move |_: &::dcrf::Ctx| Self::#ident(#(#vars),*))
            };
            quote! {
                #name => {
                    #helpers
                    #(#extract)*
                    #(#send_checks)*
                    match #run.await {
                        ::core::result::Result::Ok(__dcrf_result) => {
                            #finish
                        }
                        ::core::result::Result::Err(e) => {
                            let _ = ctx
                                .send_error(&e, ::core::option::Option::Some(action), frame.request_id())
                                .await;
                        }
                    }
                    ::dcrf::__private::Dispatched::Handled
                }
            }
        }
    })
}

/// The spans of the first and last tokens of a type.
fn span_range(ty: &Type) -> (Span, Span) {
    let mut tokens = quote! { #ty }.into_iter();
    let first = tokens.next().map_or_else(Span::call_site, |t| t.span());
    let last = tokens.last().map_or(first, |t| t.span());
    (first, last)
}

/// Is the receiver `&self`, `&mut self` or `self: &[mut] Self`?
fn borrows_self(r: &Receiver) -> bool {
    matches!(&*r.ty, Type::Reference(_))
}

/// Replaces the given lifetimes with `'_`.
struct InferLifetimes<'a>(&'a [syn::Ident]);

impl VisitMut for InferLifetimes<'_> {
    fn visit_lifetime_mut(&mut self, lifetime: &mut Lifetime) {
        if self.0.contains(&lifetime.ident) {
            *lifetime = Lifetime::new("'_", lifetime.span());
        }
    }
}

/// The helpers that build a detached or blocking action's parameters and check they are owned.
///
/// An owned parameter is built the same way for every lifetime of the connection and the frame
/// (`for<'x> FromFrame<'x, _>`) and is `Send`. A reference, however it is spelled (type aliases
/// included), or a type that borrows from the frame is not owned and fails a bound whose message
/// says so, at the parameter's type; so does a type that is no parameter at all. The items are
/// local to the action's arm, prefixed so they shadow nothing the parameter types name.
fn owned_parameters(kind: Kind, ident: &syn::Ident) -> TokenStream2 {
    let what = kind.word();
    let message = format!(
        "`{{Self}}` cannot be a parameter of {what} action `{ident}`: its parameters must be owned"
    );
    let label = "not an owned parameter".to_owned();
    let note = format!(
        "a {what} action runs after the frame is handled: its parameters are `Ctx` (not `&Ctx`), \
         `serde::Deserialize` structs of the message's fields, or extractors \
         (`dcrf::extract::FromFrame`) that own their data"
    );
    quote! {
        #[diagnostic::on_unimplemented(message = #message, label = #label, note = #note)]
        trait __DcrfOwnedParameter<M>: for<'x> ::dcrf::__private::FromFrame<'x, M> {}
        #[diagnostic::do_not_recommend]
        impl<T, M> __DcrfOwnedParameter<M> for T where
            T: for<'x> ::dcrf::__private::FromFrame<'x, M>
        {
        }
        fn __dcrf_owned_parameter<T, M, E>(
            built: ::core::result::Result<T, E>,
        ) -> ::core::result::Result<T, E>
        where
            T: __DcrfOwnedParameter<M>,
        {
            built
        }
        fn __dcrf_parameter_must_be_send<T: Send>(_: &T) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expansion of `block` as one line of tokens, and its errors.
    fn expand_str(model: bool, block: ItemImpl) -> (String, String) {
        let mut errors = Errors::default();
        let tokens = expand(&ConsumerArgs { model }, block, &mut errors);
        (tokens.to_string(), errors.into_compile_errors().to_string())
    }

    #[test]
    fn the_consumer_trait_is_recognised_in_every_spelling_and_only_it() {
        for path in [
            quote!(Consumer),
            quote!(dcrf::Consumer),
            quote!(::dcrf::Consumer),
            quote!(dcrf::consumer::Consumer),
            quote!(::dcrf::consumer::Consumer),
        ] {
            assert!(
                is_consumer_trait(&syn::parse2(path.clone()).unwrap()),
                "{path}"
            );
        }
        for path in [
            quote!(::Consumer),
            quote!(other::Consumer),
            quote!(Consumer<T>),
            quote!(Permission),
        ] {
            assert!(
                !is_consumer_trait(&syn::parse2(path.clone()).unwrap()),
                "{path}"
            );
        }
    }

    #[test]
    fn actions_become_one_match_through_the_private_paths() {
        let (out, errors) = expand_str(
            false,
            syn::parse_quote! {
                impl Greeter {
                    #[action]
                    async fn greet(&mut self, args: Greet) -> Result<Reply<String>, ApiError> { todo() }
                    #[action(name = "count", read)]
                    async fn count_them(&self) -> Result<Reply<u64>, ApiError> { todo() }
                    fn helper(&self) {}
                }
            },
        );
        assert_eq!(errors, "");
        assert!(out.contains("\"greet\" =>"), "{out}");
        assert!(out.contains("\"count\" =>"), "{out}");
        assert!(
            out.contains(":: dcrf :: __private :: ActionTable for Greeter"),
            "{out}"
        );
        assert!(out.contains(":: dcrf :: __private :: FromFrame"), "{out}");
        // Only the read action reads; without `model` nothing else does.
        assert!(out.contains("\"count\" => true"), "{out}");
        assert!(out.contains("_ => false"), "{out}");
        // The helper stays, the `#[action]` attributes are gone, no public model path is named.
        assert!(out.contains("fn helper"), "{out}");
        assert!(!out.contains("# [action"), "{out}");
        assert!(!out.contains(":: dcrf :: model"), "{out}");
        // The inherent form writes no `impl Consumer`.
        assert!(!out.contains("Consumer for Greeter"), "{out}");
    }

    #[test]
    fn the_model_option_falls_back_to_the_model_actions() {
        let (out, errors) = expand_str(true, syn::parse_quote! { impl Todos {} });
        assert_eq!(errors, "");
        assert!(
            out.contains(":: dcrf :: __private :: dispatch_model"),
            "{out}"
        );
        assert!(
            out.contains(":: dcrf :: __private :: handle_instance_event"),
            "{out}"
        );
        assert!(
            out.contains(":: dcrf :: __private :: register_observers"),
            "{out}"
        );
        assert!(
            out.contains(":: dcrf :: __private :: model_action_reads"),
            "{out}"
        );
    }

    #[test]
    fn the_one_block_form_splits_actions_from_hooks() {
        let (out, errors) = expand_str(
            false,
            syn::parse_quote! {
                impl Consumer for Greeter {
                    fn permissions(&self) -> Option<Permissions> { None }
                    #[action]
                    async fn greet(&mut self) -> Result<Reply<()>, ApiError> { todo() }
                }
            },
        );
        assert_eq!(errors, "");
        let inherent = out.find("impl Greeter").expect("an inherent impl");
        let hooks = out
            .find("impl Consumer for Greeter")
            .expect("the hooks' impl");
        let greet = out.find("fn greet").unwrap();
        let permissions = out.find("fn permissions").unwrap();
        assert!(
            inherent < greet && greet < hooks,
            "the action moves to `impl Greeter`: {out}"
        );
        assert!(
            hooks < permissions,
            "the hook stays in `impl Consumer`: {out}"
        );
    }

    #[test]
    fn every_error_of_a_block_is_reported_together() {
        let (_, errors) = expand_str(
            false,
            syn::parse_quote! {
                impl Greeter {
                    #[action]
                    fn not_async(&mut self) -> Result<(), ApiError> { Ok(()) }
                    #[action(detached)]
                    async fn borrows(&self) -> Result<(), ApiError> { Ok(()) }
                }
            },
        );
        assert!(errors.contains("an action is an `async fn`"), "{errors}");
        assert!(errors.contains("cannot borrow the consumer"), "{errors}");
    }
}
