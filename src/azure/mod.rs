//! What every Azure adapter shares: the Entra ID identity of the process.

pub mod identity;
