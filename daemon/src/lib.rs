//! `hostd daemon`: one host API for guests and functions, reconciled from declared
//! state (a fleet file), with each VM its own jailed process under supervision.

pub mod fleet;
pub mod units;
