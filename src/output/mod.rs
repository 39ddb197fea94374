//! Capturing what commands and the daemons they start write to stdout and stderr.
//!
//! A command never appends to a file itself: its stdout and stderr are the write ends of
//! two pipes whose read ends the **output keeper** holds, a small process of its own per
//! state directory ([`keeper`]) that outlives agent restarts. The keeper stamps each line as
//! it reads it ([`record`]: `<time> out|err <text>`), appends it to the process's file
//! `STATE/output/<stem>.log` and rotates that file before it would pass
//! `store.output_file_bytes`, keeping `store.output_files` files ([`rotate`]): a process's
//! captured output is within `output_file_bytes × output_files` at every moment, however
//! fast it writes (a writer faster than the disk waits on its full pipe).
//!
//! The agent asks for pipes over a unix socket and gets their write ends by `SCM_RIGHTS`
//! ([`wire`]), from one thread of its own ([`client`]). A command's result carries the last
//! `store.max_output_bytes` it wrote: after the command's shell exits, the keeper reads what
//! its pipes hold at that moment (never waiting for their end, which a daemon holding the
//! pipe would postpone forever) and answers its kept tail.

pub mod client;
pub mod keeper;
pub mod record;
pub mod rotate;
pub mod wire;

pub use client::{Capture, OutputClient, OutputError, Pipes, Settings};
pub use rotate::Limits;
