//! The integration tests, one binary (as ripgrep does): each module is one area, all against the
//! real sandbox over 127.0.0.1. One link instead of twelve, and one process shares the compiled
//! test support.

mod cli;
mod config;
mod daemon;
mod gateway;
mod hostile;
mod logs;
mod metrics;
mod mistakes;
mod native;
mod package;
mod partitions;
mod reconcile;
mod sandbox_api;
mod support;
mod suppression;
mod systemd;
