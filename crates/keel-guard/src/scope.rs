//! The component tag: which part of keel the code running on this thread belongs to.
//!
//! [`crate::isolate()`] sets the tag around the code it runs (around every poll, for futures), so
//! the panic hook can name the component of a panic without being told. The tag lives in a
//! `Cell`, never a `RefCell`: the hook reads it while the panicking code may be anywhere, and a
//! `Cell` cannot be "already borrowed".

use std::cell::Cell;
use std::sync::Arc;

/// Where a piece of code belongs: a component (`http`, `log`, `job:release-stuck`, ...) and an
/// optional context inside it (for `http`, the route).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The component name, as used in `keel_panics_total{component}`.
    pub component: Arc<str>,
    /// Extra detail, such as the HTTP route; shown in panic records, not used as a metric label.
    pub context: Option<Arc<str>>,
    /// The request being handled, if any: kept with the panic's group in the registry.
    pub request_id: Option<Arc<str>>,
}

impl Scope {
    /// A scope for `component` with no context.
    pub fn new(component: impl Into<Arc<str>>) -> Self {
        Self {
            component: component.into(),
            context: None,
            request_id: None,
        }
    }

    /// The same scope with a context (for example the HTTP route).
    pub fn with_context(mut self, context: impl Into<Arc<str>>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// The same scope with the id of the request it handles.
    pub fn with_request_id(mut self, request_id: impl Into<Arc<str>>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }
}

thread_local! {
    static CURRENT: Cell<Option<Scope>> = const { Cell::new(None) };
}

/// The scope of the code running on this thread, if any.
pub fn current() -> Option<Scope> {
    CURRENT
        .try_with(|cell| {
            let scope = cell.take();
            cell.set(scope.clone());
            scope
        })
        .ok()
        .flatten()
}

/// Sets the scope for as long as the returned guard lives; the previous one comes back on drop,
/// also when the code in between unwinds.
pub(crate) fn enter(scope: Scope) -> ScopeGuard {
    let previous = CURRENT
        .try_with(|cell| cell.replace(Some(scope)))
        .ok()
        .flatten();
    ScopeGuard { previous }
}

/// Restores the previous scope when dropped.
pub(crate) struct ScopeGuard {
    previous: Option<Scope>,
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        // `try_with` fails only while the thread is being torn down; nothing to restore then.
        let _ = CURRENT.try_with(|cell| cell.set(previous));
    }
}
