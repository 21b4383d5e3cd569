//! The StreamBus broker library.
//!
//! - [`storage`]: the durable partitioned log storage engine.

pub mod storage;
