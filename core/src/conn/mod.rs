//! Connection state machines: [`ClientConnection`](client::ClientConnection) and
//! [`ServerConnection`](server::ServerConnection).
//!
//! Both follow one shape: `handle_*` methods take input (bytes, the time), `poll_*` methods
//! hand out what to do next (bytes to write, events, the next deadline). Neither reads a clock
//! or touches a socket; `now` is always a parameter.

pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod time;
