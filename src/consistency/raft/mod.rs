//! The Raft-based modes (`sequential`, `linearizable`) on openraft `=0.9.25`:
//! log and vote storage, and (beside it) the type config, state machine and
//! network that wire a node's `Raft`.

pub mod log_store;
