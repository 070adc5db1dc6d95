//! `hostd daemon`: one host API for guests and functions, reconciled from declared
//! state (a fleet file), with each VM its own jailed process under supervision.
//!
//! - [`server`]: the socket, readiness, the run loop.
//! - [`api`]: the REST routes and their OpenAPI document.
//! - [`guests`]: supervision of each guest's `hostd run` process.
//! - [`reconcile`]: applying a [`fleet::Fleet`].
//! - [`store`], [`images`]: the state database and the image store.
//! - [`client`]: the CLI's side of the socket.

pub mod api;
pub mod body;
pub mod client;
pub mod error;
pub mod fleet;
pub mod functions;
pub mod guests;
pub mod images;
pub mod metrics;
pub mod reconcile;
pub mod server;
pub mod store;
pub mod units;
pub use hyper;
