//! Control plane: who may use it ([`auth`]), deploy checks ([`archive`],
//! [`multipart`], [`handler`], [`settings`]) and the request handling thread ([`plane`]).
pub mod archive;
pub mod auth;
pub mod handler;
pub mod multipart;
pub mod plane;
pub mod settings;

pub use plane::Control;
