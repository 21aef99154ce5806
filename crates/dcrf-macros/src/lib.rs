//! Procedural macros for [dcrf](https://docs.rs/dcrf). Use them through the `dcrf` crate:
//! `#[dcrf::consumer]`.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{
    Attribute, FnArg, ImplItem, ImplItemFn, ItemImpl, LitStr, Meta, Token, Type, parse_macro_input,
};

/// Registers the `#[action]` methods of an `impl` block as the consumer's actions.
///
/// See `dcrf::consumer` for the documentation.
#[proc_macro_attribute]
pub fn consumer(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = parse_macro_input!(attr as ConsumerArgs);
    let mut block = parse_macro_input!(item as ItemImpl);
    match expand(&args, &mut block) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// `#[dcrf::consumer]` or `#[dcrf::consumer(model)]`.
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
                    "unknown option: expected `model`",
                ));
            }
        }
        Ok(ConsumerArgs { model })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Normal,
    Detached,
    Blocking,
}

struct ActionSpec {
    name: String,
    kind: Kind,
}

fn parse_action_attr(attr: &Attribute) -> syn::Result<ActionSpec> {
    let mut spec = ActionSpec {
        name: String::new(),
        kind: Kind::Normal,
    };
    if let Meta::List(_) = &attr.meta {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let lit: LitStr = meta.value()?.parse()?;
                spec.name = lit.value();
                Ok(())
            } else if meta.path.is_ident("detached") {
                spec.kind = Kind::Detached;
                Ok(())
            } else if meta.path.is_ident("blocking") {
                spec.kind = Kind::Blocking;
                Ok(())
            } else {
                Err(meta.error("expected `name = \"...\"`, `detached` or `blocking`"))
            }
        })?;
    }
    Ok(spec)
}

/// The last path segment of a type, looking through one reference.
fn type_name(ty: &Type) -> Option<String> {
    match ty {
        Type::Reference(r) => type_name(&r.elem),
        Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    }
}

enum Param {
    Ctx { by_ref: bool },
    Frame,
    Args(Box<Type>),
}

fn classify(ty: &Type) -> Param {
    let by_ref = matches!(ty, Type::Reference(_));
    match type_name(ty).as_deref() {
        Some("Ctx") => Param::Ctx { by_ref },
        Some("Frame") if by_ref => Param::Frame,
        _ => Param::Args(Box::new(ty.clone())),
    }
}

fn expand(args: &ConsumerArgs, block: &mut ItemImpl) -> syn::Result<proc_macro2::TokenStream> {
    if let Some((_, path, _)) = &block.trait_ {
        return Err(syn::Error::new(
            path.span(),
            "#[dcrf::consumer] goes on an inherent impl block (`impl MyConsumer { ... }`)",
        ));
    }
    let self_ty = block.self_ty.clone();
    let (impl_generics, _, where_clause) = block.generics.split_for_impl();
    let mut arms = Vec::new();
    let mut names: Vec<(String, Span)> = Vec::new();

    for item in &mut block.items {
        let ImplItem::Fn(method) = item else { continue };
        let Some(pos) = method
            .attrs
            .iter()
            .position(|a| a.path().is_ident("action"))
        else {
            continue;
        };
        let attr = method.attrs.remove(pos);
        let mut spec = parse_action_attr(&attr)?;
        if spec.name.is_empty() {
            spec.name = method.sig.ident.to_string();
        }
        if let Some((_, span)) = names.iter().find(|(n, _)| *n == spec.name) {
            let mut e = syn::Error::new(
                method.sig.ident.span(),
                format!("two actions are named \"{}\"", spec.name),
            );
            e.combine(syn::Error::new(*span, "first defined here"));
            return Err(e);
        }
        names.push((spec.name.clone(), method.sig.ident.span()));
        arms.push(action_arm(&spec, method)?);
    }

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
    let mounted = args.model.then(|| {
        quote! {
            fn mounted(&self) {
                ::dcrf::__private::register_observers(self);
            }
        }
    });

    Ok(quote! {
        #block

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
        }
    })
}

fn action_arm(spec: &ActionSpec, method: &ImplItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let name = &spec.name;
    let ident = &method.sig.ident;
    let mut receiver = None;
    let mut params = Vec::new();
    for input in &method.sig.inputs {
        match input {
            FnArg::Receiver(r) => receiver = Some(r),
            FnArg::Typed(t) => params.push(classify(&t.ty)),
        }
    }
    let is_async = method.sig.asyncness.is_some();
    let args_count = params
        .iter()
        .filter(|p| matches!(p, Param::Args(_)))
        .count();
    if args_count > 1 {
        return Err(syn::Error::new(
            method.sig.inputs.span(),
            "an action takes at most one argument type (a struct deserialized from the message); \
             put the fields in one struct",
        ));
    }
    let args_ty = params.iter().find_map(|p| match p {
        Param::Args(t) => Some((**t).clone()),
        _ => None,
    });

    match spec.kind {
        Kind::Normal => {
            if !is_async {
                return Err(syn::Error::new(
                    method.sig.fn_token.span(),
                    "an action is an `async fn`; use #[action(blocking)] for a blocking `fn`",
                ));
            }
            let Some(_) = receiver else {
                return Err(syn::Error::new(
                    method.sig.ident.span(),
                    "an action takes `&mut self` or `&self`; detached actions take no receiver: \
                     #[action(detached)]",
                ));
            };
            let call_args: Vec<_> = params
                .iter()
                .map(|p| match p {
                    Param::Ctx { by_ref: true } => quote! { ctx },
                    Param::Ctx { by_ref: false } => quote! { ctx.clone() },
                    Param::Frame => quote! { frame },
                    Param::Args(_) => quote! { __args },
                })
                .collect();
            let parse = args_ty.as_ref().map(|ty| {
                quote! {
                    let __args: #ty = match frame.args::<#ty>() {
                        Ok(a) => a,
                        Err(e) => {
                            let _ = ctx.send_error(&e, Some(action), frame.request_id()).await;
                            return ::dcrf::__private::Dispatched::Handled;
                        }
                    };
                }
            });
            Ok(quote! {
                #name => {
                    #parse
                    let __result = self.#ident(#(#call_args),*).await;
                    ctx.finish(action, frame.request_id(), __result).await;
                    ::dcrf::__private::Dispatched::Handled
                }
            })
        }
        Kind::Detached | Kind::Blocking => {
            let what = if spec.kind == Kind::Detached {
                "detached"
            } else {
                "blocking"
            };
            if receiver.is_some() {
                return Err(syn::Error::new(
                    method.sig.ident.span(),
                    format!(
                        "a {what} action runs beside the connection and cannot borrow it: \
                         take `ctx: Ctx` (detached) or `ctx: &Ctx` (blocking) instead of `self`"
                    ),
                ));
            }
            if params.iter().any(|p| matches!(p, Param::Frame)) {
                return Err(syn::Error::new(
                    method.sig.inputs.span(),
                    format!("a {what} action takes owned arguments, not `&Frame`"),
                ));
            }
            if spec.kind == Kind::Detached && !is_async {
                return Err(syn::Error::new(
                    method.sig.fn_token.span(),
                    "a detached action is an `async fn`",
                ));
            }
            if spec.kind == Kind::Blocking && is_async {
                return Err(syn::Error::new(
                    method.sig.fn_token.span(),
                    "a blocking action is a plain `fn` (it runs on the blocking pool)",
                ));
            }
            let blocking_ctx = format_ident!("__ctx");
            let call_args: Vec<_> = params
                .iter()
                .map(|p| match (p, spec.kind) {
                    (Param::Ctx { by_ref: true }, Kind::Blocking) => quote! { #blocking_ctx },
                    (Param::Ctx { by_ref: false }, Kind::Blocking) => {
                        quote! { #blocking_ctx.clone() }
                    }
                    (Param::Ctx { by_ref: false }, _) => quote! { ctx.clone() },
                    (Param::Ctx { by_ref: true }, _) => quote! { &ctx.clone() },
                    (_, _) => quote! { __args },
                })
                .collect();
            let parse = match &args_ty {
                Some(ty) => quote! {
                    let __args: #ty = match frame.args::<#ty>() {
                        Ok(a) => a,
                        Err(e) => {
                            let _ = ctx.send_error(&e, Some(action), frame.request_id()).await;
                            return ::dcrf::__private::Dispatched::Handled;
                        }
                    };
                },
                None => quote! {},
            };
            if spec.kind == Kind::Detached {
                if params
                    .iter()
                    .any(|p| matches!(p, Param::Ctx { by_ref: true }))
                {
                    return Err(syn::Error::new(
                        method.sig.inputs.span(),
                        "a detached action owns its context: take `ctx: Ctx`, not `&Ctx`",
                    ));
                }
                Ok(quote! {
                    #name => {
                        #parse
                        ctx.spawn_action(action, frame.request_id(), Self::#ident(#(#call_args),*));
                        ::dcrf::__private::Dispatched::Handled
                    }
                })
            } else {
                Ok(quote! {
                    #name => {
                        #parse
                        match ctx.run_blocking(move |#blocking_ctx: &::dcrf::Ctx| Self::#ident(#(#call_args),*)).await {
                            Ok(__result) => ctx.finish(action, frame.request_id(), __result).await,
                            Err(e) => { let _ = ctx.send_error(&e, Some(action), frame.request_id()).await; }
                        }
                        ::dcrf::__private::Dispatched::Handled
                    }
                })
            }
        }
    }
}
