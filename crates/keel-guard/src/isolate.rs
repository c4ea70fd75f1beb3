//! Run code so that a panic inside it becomes `Err(Panicked)` instead of an unwind.
//!
//! The code runs under a [`Scope`], so the panic hook reports it under the right component.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;

use crate::panic::{last_panic_location, payload_message};
use crate::scope::{self, Scope};

/// A panic caught by [`isolate`] or [`isolate_async`]. The hook has already logged and counted it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("panic in {component}: {message}")]
pub struct Panicked {
    /// The component the code ran under.
    pub component: String,
    /// The panic message (or a placeholder when the payload was not a string).
    pub message: String,
    /// `file:line:column` of the panic, when the hook saw it.
    pub location: Option<String>,
}

impl Panicked {
    fn from_payload(scope: &Scope, payload: &(dyn std::any::Any + Send)) -> Self {
        Self {
            component: scope.component.to_string(),
            message: payload_message(payload),
            location: last_panic_location(),
        }
    }
}

/// Runs `f` under `scope`; a panic inside it is returned as `Err(Panicked)`.
///
/// `AssertUnwindSafe` is deliberate: keel's shared state is behind `parking_lot` locks (no
/// poisoning) or atomics, and the callers treat a panicked item as failed, not half-done.
pub fn isolate<T>(scope: impl Into<Scope>, f: impl FnOnce() -> T) -> Result<T, Panicked> {
    let scope = scope.into();
    let guard = scope::enter(scope.clone());
    let result = catch_unwind(AssertUnwindSafe(f));
    drop(guard);
    result.map_err(|payload| Panicked::from_payload(&scope, payload.as_ref()))
}

/// Runs the future under `scope` (set around every poll); a panic while it is polled is
/// returned as `Err(Panicked)`.
pub async fn isolate_async<F: Future>(
    scope: impl Into<Scope>,
    future: F,
) -> Result<F::Output, Panicked> {
    let scope = scope.into();
    let tagged = InScope {
        scope: scope.clone(),
        future,
    };
    AssertUnwindSafe(tagged)
        .catch_unwind()
        .await
        .map_err(|payload| Panicked::from_payload(&scope, payload.as_ref()))
}

pin_project_lite::pin_project! {
    /// A future that sets its scope on the thread around each poll.
    pub struct InScope<F> {
        scope: Scope,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for InScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _guard = scope::enter(this.scope.clone());
        this.future.poll(cx)
    }
}

impl From<&str> for Scope {
    fn from(component: &str) -> Self {
        Scope::new(component)
    }
}

impl From<String> for Scope {
    fn from(component: String) -> Self {
        Scope::new(component)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_component_and_message() {
        crate::panic::install_hook();
        let result: Result<(), _> = isolate("test-sync", || panic!("boom {}", 7));
        let err = result.unwrap_err();
        assert_eq!(err.component, "test-sync");
        assert_eq!(err.message, "boom 7");
        assert!(err.location.unwrap().contains("isolate.rs"));
    }

    #[test]
    fn a_value_passes_through() {
        assert_eq!(isolate("test-ok", || 41 + 1).unwrap(), 42);
    }

    #[tokio::test]
    async fn a_panicking_future_becomes_an_error_and_the_scope_is_restored() {
        crate::panic::install_hook();
        let err = isolate_async("test-async", async {
            tokio::task::yield_now().await;
            panic!("async boom")
        })
        .await
        .unwrap_err();
        assert_eq!(err.component, "test-async");
        assert_eq!(err.message, "async boom");
        assert_eq!(scope::current(), None);
    }

    #[test]
    fn the_scope_is_visible_inside_and_restored_after() {
        let inner = isolate(Scope::new("outer").with_context("GET /x"), || {
            scope::current()
        })
        .unwrap()
        .unwrap();
        assert_eq!(&*inner.component, "outer");
        assert_eq!(inner.context.as_deref(), Some("GET /x"));
        assert_eq!(scope::current(), None);
    }
}
