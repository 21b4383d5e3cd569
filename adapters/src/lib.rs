//! adapters: not implemented yet (see the open issues). This crate exports nothing.
