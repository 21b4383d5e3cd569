//! End-to-end test support. The tests arrive with the broker.
