//! Pure decisions, no I/O: which snapshots a retention policy keeps ([`retention`]) and when the
//! agent runs next ([`schedule`]).
//!
//! A leaf, so that the config can check its `[retention]` and `[schedule]` sections with the very
//! code that applies them, and maintenance and the agent share one reading of both.

pub mod retention;
pub mod schedule;
