//! immich-backup: encrypted, incremental, offsite backups of a self-hosted Immich server.
//!
//! The data path reads top to bottom: [`dump`] and [`collect`] are the sources, [`crypto`] seals
//! what they produce, [`store`] keeps it, [`snapshot`] records what a backup holds, and
//! [`restore`] runs the same path backwards. [`backup`] ties the sources to the store.
//!
//! Around it: [`lock`] keeps backups and [`prune`] (forget and prune, with [`retention`]) apart, and
//! [`agent`] runs backups on a [`schedule`] with a [`health`] endpoint.

pub mod agent;
pub mod backup;
pub mod cloud;
pub mod collect;
pub mod config;
pub mod crypto;
pub mod db;
pub mod demo;
pub mod directio;
pub mod dump;
pub mod dumpcheck;
pub mod early;
pub mod error;
pub mod health;
pub mod localstore;
pub mod lock;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod retention;
pub mod sample;
pub mod schedule;
pub mod seal;
pub mod sign;
pub mod snapshot;
pub mod store;
pub mod storecheck;
pub mod target;
pub mod trust;
pub mod unseal;

pub use error::{Error, Result};
